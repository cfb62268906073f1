"""The metrics of an eval set: token loss and perplexity, and exact match of greedy generation.

This one module is what the trainer's held-out eval and `adapterhub eval` both run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from adapterhub_lite.data import (
    IGNORE_INDEX,
    Example,
    Features,
    GenerationCase,
    collate,
    generation_case,
    tokenize_examples,
)

# Generation stops at the first of these in the decoded text (besides the EOS token itself).
STOP_STRINGS = ("\n", "<|end|>")


@dataclass
class EvalResult:
    """Metrics of one model on one eval set; ``exact_match`` is None where answers are not short."""

    loss: float
    perplexity: float
    exact_match: float | None
    n_examples: int
    n_tokens: int
    predictions: list[dict] = field(default_factory=list)

    def metrics(self) -> dict:
        """The three numbers the training record stores."""
        return {"loss": self.loss, "perplexity": self.perplexity, "exact_match": self.exact_match}

    def to_dict(self, *, with_predictions: bool = False) -> dict:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return d


def _device_of(model) -> torch.device:
    return next(p for p in model.parameters()).device


@torch.no_grad()
def token_loss(model, features: list[Features], pad_token_id: int, batch_size: int = 16) -> tuple[float, int]:
    """Mean cross-entropy over all label tokens of ``features`` (token-weighted) and the token count."""
    device = _device_of(model)
    total, count = 0.0, 0
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[i : i + batch_size], pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    return (total / count if count else float("nan")), count


def cut_at_stop(text: str, extra_stops: tuple[str, ...] = ()) -> str:
    """The generated text up to the first stop string (newline, ``<|end|>``, EOS text)."""
    cut = len(text)
    for stop in STOP_STRINGS + extra_stops:
        if stop and stop in text:
            cut = min(cut, text.index(stop))
    return text[:cut]


def _stop_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for s in STOP_STRINGS:
        tid = tokenizer.convert_tokens_to_ids(s)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 16, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of token-id prompts, cut at EOS, newline or ``<|end|>`` (left-padded batches)."""
    device = _device_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = _stop_token_ids(tokenizer)
    eos_text = tuple(t for t in (tokenizer.eos_token,) if t)
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            input_ids[row, width - len(p) :] = torch.tensor(p)
            attention_mask[row, width - len(p) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids or None,
            pad_token_id=pad,
            stop_strings=["\n"],
            tokenizer=tokenizer,
        )
        for row in generated[:, width:].tolist():
            text = tokenizer.decode(row, skip_special_tokens=False)
            out.append(cut_at_stop(text, eos_text))
    return out


def answers_are_short(cases: list[GenerationCase], tokenizer, max_new_tokens: int) -> bool:
    """Whether exact match makes sense: every answer is one line of at most ``max_new_tokens`` tokens."""
    return bool(cases) and all(
        "\n" not in c.answer.strip()
        and len(tokenizer.encode(c.answer, add_special_tokens=False)) < max_new_tokens
        for c in cases
    )


def evaluate(
    model,
    tokenizer,
    examples: list[Example],
    *,
    max_seq_len: int = 512,
    train_on_prompt: bool = False,
    exact_match: bool | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> EvalResult:
    """Loss and perplexity on the examples' label tokens, and exact match of greedy answers.

    ``exact_match=None`` decides by the data: on for prompt/completion and chat sets whose answers are
    short, off (None in the result) for raw text. Answers are compared after stripping whitespace.
    """
    was_training = model.training
    model.eval()
    try:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        features = tokenize_examples(examples, tokenizer, max_seq_len, train_on_prompt=train_on_prompt)
        loss, n_tokens = token_loss(model, features, pad, batch_size)
        cases = [c for c in (generation_case(ex, tokenizer) for ex in examples) if c is not None]
        if exact_match is None:
            exact_match = answers_are_short(cases, tokenizer, max_new_tokens)
        em: float | None = None
        predictions: list[dict] = []
        if exact_match and cases:
            got = greedy_answers(
                model,
                tokenizer,
                [c.prompt_ids for c in cases],
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            for c, g in zip(cases, got, strict=True):
                ok = g.strip() == c.answer.strip()
                predictions.append({"line": c.line, "expected": c.answer, "got": g, "correct": ok})
            em = sum(p["correct"] for p in predictions) / len(predictions)
    finally:
        model.train(was_training)
    return EvalResult(
        loss=loss,
        perplexity=math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf"),
        exact_match=em,
        n_examples=len(examples),
        n_tokens=n_tokens,
        predictions=predictions,
    )


def transfer_gain(adapter: dict, base: dict) -> dict:
    """Gain of the adapter over the base: loss drop (base - adapter) and exact-match rise (adapter - base)."""
    em = None
    if adapter.get("exact_match") is not None and base.get("exact_match") is not None:
        em = adapter["exact_match"] - base["exact_match"]
    return {"loss": base["loss"] - adapter["loss"], "exact_match": em}


def negative_transfer(gain: dict) -> list[str]:
    """Why the adapter is worse than the base on its own eval set (empty list: it is not)."""
    reasons = []
    if gain.get("exact_match") is not None and gain["exact_match"] < 0:
        reasons.append(f"exact match is {-gain['exact_match']:.3f} lower than the base's")
    if gain["loss"] < 0:
        reasons.append(f"eval loss is {-gain['loss']:.4f} higher than the base's")
    return reasons
