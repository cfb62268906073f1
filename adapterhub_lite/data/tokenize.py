"""Turning examples into token ids and labels, with the loss on the completion/assistant tokens only.

An example becomes a list of text *segments*, each marked trainable or not; every segment is encoded on
its own and the ids are concatenated. Encoding the prompt on its own is exactly what generation sees at
eval time (the prompt's ids, then the model's continuation), so training and exact-match agree on where
the answer starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from adapterhub_lite.data.formats import MAX_REPORTED, Example
from adapterhub_lite.errors import DatasetError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass(frozen=True)
class Features:
    """Model inputs for one training/eval sequence; ``labels`` is IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    line: int  # the dataset line it came from

    @property
    def n_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _render_chat(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            "the base model's tokenizer has no chat template, so 'messages' records cannot be rendered",
            hint="use prompt/completion records, or a base whose tokenizer_config has a chat_template",
        )


def chat_segments(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_assistant_reply) segments.

    Each assistant reply is the difference between the conversation rendered through that reply and the
    conversation before it with the generation prompt, so it includes the template's end-of-turn marker
    (the model learns to stop) but not the role header.
    """
    _check_chat_template(tokenizer)
    messages = example.messages
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not through.startswith(prefix):
            raise DatasetError(
                f"line {example.line}: the chat template does not render conversations prefix by prefix, "
                "so the assistant tokens cannot be located",
                hint="use prompt/completion records for this base",
            )
        segments.append((prefix[len(done) :], False))
        segments.append((through[len(prefix) :], True))
        done = through
    full = _render_chat(tokenizer, messages, add_generation_prompt=False)
    if full.startswith(done) and len(full) > len(done):
        segments.append((full[len(done) :], False))
    return [(text, trainable) for text, trainable in segments if text]


def segments(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """The (text, trainable) segments of an example; ``eos`` is appended by `tokenize_example`."""
    if example.format == "prompt_completion":
        return [(example.prompt, False), (example.completion, True)]
    if example.format == "chat":
        return chat_segments(example, tokenizer)
    return [(example.text, True)]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _start_ids(tokenizer) -> list[int]:
    # Our own BOS, rather than add_special_tokens=True per segment, which would repeat it.
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


Overlong = Literal["truncate", "drop"]


def _encode_example(example: Example, tokenizer, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    ids = _start_ids(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for i, (text, trainable) in enumerate(segments(example, tokenizer)):
        seg = _encode(tokenizer, text)
        if i == 0 and ids and seg[:1] == ids:
            seg = seg[1:]  # a chat template that writes the BOS itself
        ids.extend(seg)
        labels.extend(seg if (trainable or train_on_prompt) else [IGNORE_INDEX] * len(seg))
    # The chat template ends a reply with its own marker; the other formats learn to stop at EOS.
    if example.format != "chat" and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def _cut(example: Example, ids: list[int], labels: list[int], max_seq_len: int, overlong: Overlong):
    if example.format == "text" and len(ids) > max_seq_len:
        return [
            Features(ids[i : i + max_seq_len], labels[i : i + max_seq_len], example.line)
            for i in range(0, len(ids), max_seq_len)
            if len(ids[i : i + max_seq_len]) > 1
        ]
    if len(ids) > max_seq_len and overlong == "drop":
        return []
    feats = Features(ids[:max_seq_len], labels[:max_seq_len], example.line)
    return [feats] if feats.n_trainable > 0 else []


def tokenize_example(
    example: Example,
    tokenizer,
    max_seq_len: int,
    *,
    train_on_prompt: bool = False,
    overlong: Overlong = "truncate",
) -> list[Features]:
    """Token ids and labels of one example; raw text longer than ``max_seq_len`` becomes several windows.

    Prompt/completion and chat examples longer than ``max_seq_len`` are cut at the right (``truncate``)
    or dropped (``drop``); one left with no trainable token is dropped too (an empty list is returned).
    """
    ids, labels = _encode_example(example, tokenizer, train_on_prompt)
    return _cut(example, ids, labels, max_seq_len, overlong)


@dataclass
class LengthReport:
    """Examples longer than ``max_seq_len``: how many were cut or dropped, and the first lines of each."""

    policy: str
    max_seq_len: int
    truncated: int = 0
    dropped: int = 0
    lines: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "max_seq_len": self.max_seq_len,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "lines": self.lines,
        }

    def warning(self) -> str | None:
        """One line for the user and the training record, or None when nothing was too long."""
        if not (self.truncated or self.dropped):
            return None
        lines = ", ".join(map(str, self.lines)) + (
            ", ..." if self.truncated + self.dropped > len(self.lines) else ""
        )
        return (
            f"{self.truncated + self.dropped} example(s) longer than max_seq_len={self.max_seq_len}: "
            f"{self.truncated} truncated, {self.dropped} dropped (lines {lines}); "
            "raise max_seq_len, or set overlong: truncate|drop in the recipe"
        )


def tokenize_dataset(
    examples: list[Example],
    tokenizer,
    max_seq_len: int,
    *,
    train_on_prompt: bool = False,
    overlong: Overlong = "truncate",
) -> tuple[list[Features], LengthReport]:
    """Tokenize many examples, counting those longer than ``max_seq_len`` (raw text is windowed, not cut).

    Raises DatasetError if every example is cut away.
    """
    out: list[Features] = []
    report = LengthReport(overlong, max_seq_len)
    for ex in examples:
        ids, labels = _encode_example(ex, tokenizer, train_on_prompt)
        feats = _cut(ex, ids, labels, max_seq_len, overlong)
        if ex.format != "text" and len(ids) > max_seq_len:
            if feats:
                report.truncated += 1
            else:
                report.dropped += 1
            if len(report.lines) < MAX_REPORTED:
                report.lines.append(ex.line)
        out.extend(feats)
    if examples and not out:
        raise DatasetError(
            f"every example is longer than max_seq_len={max_seq_len}"
            + (" before its answer starts" if overlong == "truncate" else ""),
            hint="raise max_seq_len in the recipe",
        )
    return out, report


def tokenize_examples(
    examples: list[Example], tokenizer, max_seq_len: int, *, train_on_prompt: bool = False
) -> list[Features]:
    """Tokenize many examples (over-long ones truncated); raises DatasetError if every one is cut away."""
    return tokenize_dataset(examples, tokenizer, max_seq_len, train_on_prompt=train_on_prompt)[0]


@dataclass(frozen=True)
class GenerationCase:
    """What exact-match scores: the prompt's ids and the expected short answer."""

    prompt_ids: list[int]
    answer: str
    line: int


def generation_case(example: Example, tokenizer) -> GenerationCase | None:
    """The prompt and expected answer of an example (the last assistant reply for chat); None for text."""
    if example.format == "prompt_completion":
        prompt, answer = example.prompt, example.completion
    elif example.format == "chat":
        _check_chat_template(tokenizer)
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        prompt = _render_chat(tokenizer, example.messages[:last], add_generation_prompt=True)
        answer = example.messages[last]["content"]
    else:
        return None
    ids = _start_ids(tokenizer)
    seg = _encode(tokenizer, prompt)
    if ids and seg[:1] == ids:
        seg = seg[1:]
    return GenerationCase(ids + seg, answer, example.line)
