"""The optimisation loop's pieces: data prepared from a recipe, the batches of each step, one step.

The order of batches is a function of (seed, epoch), so a resumed run sees the batches it would have
seen. Under data parallelism every optimizer step takes the same global micro-batches (``batch_size`` x
processes examples each) and each process trains on its contiguous share of them; gradients and the
loss are normalised by the label tokens of the whole global step and summed over processes, so one
process with ``batch_size`` B x N computes the same step as N processes with B (up to the order of
floating-point sums).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterhub_lite.data import (
    Dataset,
    Features,
    LengthReport,
    collate,
    load_dataset,
    tokenize_dataset,
    train_eval_split,
)
from adapterhub_lite.errors import TrainingError
from adapterhub_lite.training.distributed import Processes
from adapterhub_lite.training.recipe import Recipe


@dataclass
class PreparedData:
    """A recipe's dataset, tokenized for training, with the held-out examples kept raw for generation."""

    dataset: Dataset
    train: list[Features]
    eval_examples: list
    n_train_examples: int
    eval_path: Path
    lengths: LengthReport
    skipped: list[str]
    n_skipped: int


def prepare_data(recipe: Recipe, tokenizer) -> PreparedData:
    """Load, split and tokenize a recipe's data (the transfer study's other strategies use it too)."""
    dataset = load_dataset(recipe.data, recipe.format, skip_bad_lines=recipe.skip_bad_lines)
    skipped, n_skipped = list(dataset.skipped), dataset.n_skipped
    if recipe.eval_data is not None:
        train_examples = dataset.examples
        held = load_dataset(recipe.eval_data, dataset.format, skip_bad_lines=recipe.skip_bad_lines)
        eval_examples, eval_path = held.examples, recipe.eval_data
        skipped += held.skipped
        n_skipped += held.n_skipped
    else:
        train_examples, eval_examples = train_eval_split(dataset.examples, recipe.eval_fraction, recipe.seed)
        eval_path = recipe.data
    train, lengths = tokenize_dataset(
        train_examples,
        tokenizer,
        recipe.max_seq_len,
        train_on_prompt=recipe.train_on_prompt,
        overlong=recipe.overlong,
    )
    return PreparedData(
        dataset, train, eval_examples, len(train_examples), Path(eval_path), lengths, skipped, n_skipped
    )


@functools.lru_cache(maxsize=4)
def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global micro-batches of one epoch: a permutation fixed by (seed, epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def micro_batches(n: int, recipe: Recipe, step: int, world: int = 1) -> list[list[int]]:
    """The global micro-batches of optimizer step ``step`` (0-based): epochs are walked in order."""
    global_batch = recipe.batch_size * world
    per_epoch = math.ceil(n / global_batch)
    out = []
    for k in range(
        step * recipe.gradient_accumulation_steps, (step + 1) * recipe.gradient_accumulation_steps
    ):
        epoch, pos = divmod(k, per_epoch)
        out.append(_epoch_batches(n, global_batch, recipe.seed, epoch)[pos])
    return out


def _share(indices: list[int], procs: Processes) -> list[int]:
    """This process's contiguous share of a global micro-batch (the last may be short or empty)."""
    per = math.ceil(len(indices) / procs.world)
    return indices[procs.rank * per : (procs.rank + 1) * per]


def optimizer_step(
    model,
    data: PreparedData,
    tokenizer,
    recipe: Recipe,
    step: int,
    optimizer: torch.optim.Optimizer,
    scheduler,
    params: list[torch.nn.Parameter],
    device: str | torch.device,
    what: str = "",
    procs: Processes | None = None,
) -> tuple[float, int]:
    """One optimizer step (its micro-batches accumulated); returns (loss, tokens processed by all).

    Shared by the trainer and the transfer study's full/head-only fine-tuning, so every strategy is
    optimised the same way. `what` names the run in the error a diverging loss raises.
    """
    procs = procs or Processes(device=str(device))
    shares = [_share(idx, procs) for idx in micro_batches(len(data.train), recipe, step, procs.world)]
    micro = [collate([data.train[i] for i in idx], tokenizer.pad_token_id) for idx in shares if idx]
    # Normalise by the label tokens of the whole (global) optimizer step, so accumulation and data
    # parallelism both equal one big batch.
    local_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    step_labels = int(procs.sum_(torch.tensor([local_labels], dtype=torch.float64)).item())
    step_loss, tokens = 0.0, 0
    for batch in micro:
        batch = {k: v.to(device) for k, v in batch.items()}
        n_labels = int((batch["labels"][:, 1:] != -100).sum())
        if n_labels == 0:
            continue
        loss = model(**batch, use_cache=False).loss * (n_labels / step_labels)  # no KV cache to build
        loss.backward()
        step_loss += loss.item()
        tokens += int(batch["attention_mask"].sum())
    step_loss, total_tokens = procs.sum_grads(params, [step_loss, float(tokens)])
    if not math.isfinite(step_loss):
        raise TrainingError(
            f"the loss became {step_loss} at step {step + 1}{what}", hint="lower learning_rate in the recipe"
        )
    if recipe.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, int(total_tokens)


def total_steps(recipe: Recipe, n_train: int, world: int = 1) -> int:
    """``max_steps`` if set, else enough optimizer steps to see the training set ``epochs`` times."""
    if recipe.max_steps is not None:
        return recipe.max_steps
    per_epoch = math.ceil(n_train / (recipe.batch_size * world))
    return max(1, math.ceil(recipe.epochs * per_epoch / recipe.gradient_accumulation_steps))


def lr_lambda(recipe: Recipe, steps: int) -> Callable[[int], float]:
    """The recipe's learning-rate schedule as a LambdaLR factor (warmup, then cosine/linear/constant)."""

    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / (recipe.warmup_steps + 1)
        progress = min(1.0, (step - recipe.warmup_steps) / max(1, steps - recipe.warmup_steps))
        if recipe.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if recipe.lr_scheduler == "linear":
            return 1.0 - progress
        return 1.0

    return factor
