"""Training without an adapter, for the study's controls: full fine-tuning and the output-head-only probe.

The trainer (`adapterhub_lite.training`) trains LoRA/QLoRA adapters only. These two strategies need the
weights themselves to train, so this module runs the same optimisation as the trainer (its data
preparation, batch order, learning-rate schedule, token-weighted loss, gradient clipping) and scores with
the same `evaluate`, on a plain model instead of a peft one. Only what is trainable differs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from adapterhub_lite.base import load_base, load_tokenizer, resolve_base_dir
from adapterhub_lite.errors import TrainingError
from adapterhub_lite.evaluation import EvalResult, evaluate
from adapterhub_lite.training import Recipe, total_steps
from adapterhub_lite.training.trainer import lr_lambda, optimizer_step, prepare_data

Mode = Literal["full", "head-only"]


@dataclass
class FinetuneResult:
    """The trained model (kept for the forgetting measurement) and its held-out metrics."""

    model: torch.nn.Module
    eval: EvalResult
    trainable_parameters: int
    total_parameters: int
    steps: int
    train_seconds: float
    losses: list[float]


def untie_output_head(model) -> torch.nn.Parameter:
    """Give the model its own copy of the output head and return it.

    With tied embeddings the head *is* the input embedding matrix; training it in place would also move
    every input embedding, which is no longer feature extraction. A separate copy keeps the features the
    frozen body computes exactly as pretrained and makes the head a linear probe on the final hidden state.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise TrainingError(f"{type(model).__name__} has no output head to probe")
    if head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return head.weight


def trainable_parameters(model, mode: Mode) -> list[torch.nn.Parameter]:
    """Freeze what ``mode`` keeps fixed and return the parameters it trains (each shared tensor once)."""
    if mode == "full":
        params = list(model.parameters())  # parameters() yields a tied tensor once
    elif mode == "head-only":
        head = untie_output_head(model)
        for p in model.parameters():
            p.requires_grad_(False)
        head.requires_grad_(True)
        params = [head]
    else:
        raise TrainingError(f"unknown fine-tuning mode {mode!r}", hint="use 'full' or 'head-only'")
    for p in params:
        p.requires_grad_(True)
    return params


def finetune(recipe: Recipe, mode: Mode, *, progress: bool = False) -> FinetuneResult:
    """Train the weights ``mode`` selects on the recipe's data and evaluate on its held-out examples.

    Reads the recipe's data, base, seed, optimisation and eval fields; ``method``/``rank``/``alpha`` and
    the output fields are ignored (nothing is written to disk).
    """
    from tqdm.auto import tqdm

    base_dir = resolve_base_dir(recipe.base)
    tokenizer = load_tokenizer(base_dir)
    data = prepare_data(recipe, tokenizer)
    torch.manual_seed(recipe.seed)
    model = load_base(base_dir, dtype=torch.float32, device="cpu")
    n_total = sum(p.numel() for p in model.parameters())  # the base's count, before any untying
    params = trainable_parameters(model, mode)
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    steps = total_steps(recipe, len(data.train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps))
    torch.manual_seed(recipe.seed)

    model.train()
    losses: list[float] = []
    train_seconds = 0.0
    for step in tqdm(range(steps), desc=f"{mode} {recipe.name}", unit="step", disable=not progress):
        t0 = time.perf_counter()
        step_loss, _ = optimizer_step(
            model,
            data,
            tokenizer,
            recipe,
            step,
            optimizer,
            scheduler,
            params,
            "cpu",
            what=f" ({mode} fine-tuning)",
        )
        train_seconds += time.perf_counter() - t0
        losses.append(step_loss)

    result = evaluate(
        model,
        tokenizer,
        data.eval_examples,
        max_seq_len=recipe.max_seq_len,
        train_on_prompt=recipe.train_on_prompt,
        exact_match=None if recipe.eval_exact_match == "auto" else recipe.eval_exact_match,
        max_new_tokens=recipe.max_new_tokens,
        batch_size=recipe.eval_batch_size,
    )
    return FinetuneResult(model, result, n_trainable, n_total, steps, round(train_seconds, 2), losses)
