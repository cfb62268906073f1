"""The training loop: one readable function driven by a recipe, in the spirit of torchtune's recipes.

    load data -> split -> load base (4-bit for QLoRA) + LoRA -> optimise (gradient accumulation,
    checkpoints, progress bar) -> evaluate adapter and base on the held-out split -> save the PEFT
    adapter, the training record and the loss curve.

The order of batches is a function of (seed, epoch), and checkpoints carry the optimizer, scheduler and
RNG states, so ``resume=True`` continues from the saved step as if training had never stopped.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterhub_lite import __version__
from adapterhub_lite.base import fingerprint, load_tokenizer, resolve_base_dir
from adapterhub_lite.data import Dataset, Features, collate, load_dataset, tokenize_examples, train_eval_split
from adapterhub_lite.errors import TrainingError
from adapterhub_lite.evaluation import evaluate, negative_transfer, transfer_gain
from adapterhub_lite.training.allocator import low_memory_wanted, return_large_blocks_to_os
from adapterhub_lite.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from adapterhub_lite.training.model import build_model, check_layers, resolve_device, resolve_dtype
from adapterhub_lite.training.recipe import Recipe
from adapterhub_lite.training.record import RECORD_SCHEMA, peak_rss_mb, plot_loss_curve, write_json_atomic

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_record.json", "loss_curve.png")


class NegativeTransferWarning(UserWarning):
    """The adapter does worse than the base alone on its own held-out set."""


@dataclass
class TrainResult:
    output_dir: Path
    record: dict

    @property
    def negative_transfer(self) -> bool:
        return bool(self.record.get("negative_transfer"))


@dataclass
class PreparedData:
    """A recipe's dataset, tokenized for training, with the held-out examples kept raw for generation."""

    dataset: Dataset
    train: list[Features]
    eval_examples: list
    n_train_examples: int
    eval_path: Path


def prepare_data(recipe: Recipe, tokenizer) -> PreparedData:
    """Load, split and tokenize a recipe's data (the transfer study's other strategies use it too)."""
    dataset = load_dataset(recipe.data, recipe.format)
    if recipe.eval_data is not None:
        train_examples = dataset.examples
        eval_examples = load_dataset(recipe.eval_data, dataset.format).examples
        eval_path = recipe.eval_data
    else:
        train_examples, eval_examples = train_eval_split(dataset.examples, recipe.eval_fraction, recipe.seed)
        eval_path = recipe.data
    train = tokenize_examples(
        train_examples, tokenizer, recipe.max_seq_len, train_on_prompt=recipe.train_on_prompt
    )
    return PreparedData(dataset, train, eval_examples, len(train_examples), Path(eval_path))


@functools.lru_cache(maxsize=4)
def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a permutation fixed by (seed, epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def micro_batches(n: int, recipe: Recipe, step: int) -> list[list[int]]:
    """The micro-batches of optimizer step ``step`` (0-based): epochs are walked in order."""
    per_epoch = math.ceil(n / recipe.batch_size)
    out = []
    for k in range(
        step * recipe.gradient_accumulation_steps, (step + 1) * recipe.gradient_accumulation_steps
    ):
        epoch, pos = divmod(k, per_epoch)
        out.append(_epoch_batches(n, recipe.batch_size, recipe.seed, epoch)[pos])
    return out


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
) -> tuple[float, int]:
    """One optimizer step (its micro-batches accumulated); returns (loss, tokens processed).

    Shared by the trainer and the transfer study's full/head-only fine-tuning, so every strategy is
    optimised the same way. `what` names the run in the error a diverging loss raises.
    """
    micro = [
        collate([data.train[i] for i in idx], tokenizer.pad_token_id)
        for idx in micro_batches(len(data.train), recipe, step)
    ]
    # Normalise by the label tokens of the whole optimizer step, so accumulation equals one big batch.
    step_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
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
    if not math.isfinite(step_loss):
        raise TrainingError(
            f"the loss became {step_loss} at step {step + 1}{what}", hint="lower learning_rate in the recipe"
        )
    if recipe.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, tokens


def total_steps(recipe: Recipe, n_train: int) -> int:
    """``max_steps`` if set, else enough optimizer steps to see the training set ``epochs`` times."""
    if recipe.max_steps is not None:
        return recipe.max_steps
    per_epoch = math.ceil(n_train / recipe.batch_size)
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


def _prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    used = out.is_dir() and any((out / f).exists() for f in (*ADAPTER_FILES, "checkpoints"))
    if used and not resume:
        if not overwrite:
            raise TrainingError(
                f"output directory {out} already holds a training run",
                hint="pass --resume to continue it, --overwrite to start over, or another --output-dir",
            )
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for f in ADAPTER_FILES:
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _check_resumable(recipe: Recipe, state: dict, path: Path) -> None:
    saved, now = state.get("settings", {}), recipe.lora_settings()
    diffs = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in now if saved.get(k) != now.get(k)]
    if diffs:
        raise TrainingError(
            f"checkpoint {path} was made with other settings: " + "; ".join(diffs),
            hint="resume with the recipe it was made with (only max_steps/epochs and eval/output fields "
            "may change), or start over with --overwrite",
        )


def _save_adapter(model, out: Path) -> None:
    """Save the PEFT adapter into ``out`` file by file through a temporary directory (atomic per file)."""
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def train(
    recipe: Recipe, *, resume: bool = False, progress: bool = True, overwrite: bool = False
) -> TrainResult:
    """Train the adapter a recipe describes and write it, with its record and loss curve, to output_dir.

    ``resume=True`` continues from the newest checkpoint in ``output_dir/checkpoints``.
    """
    from tqdm.auto import tqdm

    t_start = time.time()

    def log(msg: str) -> None:
        if progress:
            tqdm.write(msg)

    out = recipe.resolved_output_dir.resolve()
    base_dir = resolve_base_dir(recipe.base)
    device = resolve_device(recipe)
    dtype = resolve_dtype(recipe, device)
    tokenizer = load_tokenizer(base_dir)
    data = prepare_data(recipe, tokenizer)  # dataset errors surface before any model is loaded
    check_layers(recipe, base_dir)
    _prepare_output(out, resume, overwrite)
    ckpt_dir = out / "checkpoints"

    low_memory = low_memory_wanted(recipe.low_memory, recipe.method, device)
    if low_memory:
        return_large_blocks_to_os()  # before loading: the 4-bit load churns large blocks too
    torch.manual_seed(recipe.seed)
    model = build_model(recipe, base_dir, device, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    steps = total_steps(recipe, len(data.train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps))

    start_step, losses, tokens_seen, train_seconds = 0, [], 0, 0.0
    if resume:
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise TrainingError(
                f"nothing to resume: no checkpoint in {ckpt_dir}", hint="run without --resume"
            )
        ckpt = found[-1]
        _check_resumable(recipe, ckpt.state, ckpt.path)
        load_checkpoint(ckpt, model, optimizer, scheduler)
        start_step = ckpt.step
        losses = [tuple(x) for x in ckpt.state["losses"]]
        tokens_seen, train_seconds = ckpt.state["tokens_seen"], ckpt.state["train_seconds"]
        log(f"resuming from {ckpt.path.name} (step {start_step} of {steps})")
    else:
        torch.manual_seed(recipe.seed)  # the same dropout masks whether or not the base load used the RNG
    log(
        f"{recipe.method} on {base_dir.name} ({device}, {str(dtype).removeprefix('torch.')}): "
        f"{n_trainable:,} trainable of {n_total:,} parameters; {len(data.train)} training sequences, "
        f"{len(data.eval_examples)} held-out examples; {steps} steps"
    )

    def checkpoint(step: int) -> None:
        state = {
            "losses": losses,
            "tokens_seen": tokens_seen,
            "train_seconds": train_seconds,
            "total_steps": steps,
            "settings": recipe.lora_settings(),
        }
        save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, state, recipe.keep_checkpoints)

    model.train()
    bar = tqdm(
        total=steps, initial=start_step, desc=f"train {recipe.name}", unit="step", disable=not progress
    )
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        step_loss, step_tokens = optimizer_step(
            model, data, tokenizer, recipe, step, optimizer, scheduler, trainable, device
        )
        tokens_seen += step_tokens
        train_seconds += time.perf_counter() - t0
        losses.append((step + 1, step_loss))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == steps:
            checkpoint(step + 1)
    bar.close()

    eval_kwargs = dict(
        max_seq_len=recipe.max_seq_len,
        train_on_prompt=recipe.train_on_prompt,
        exact_match=None if recipe.eval_exact_match == "auto" else recipe.eval_exact_match,
        max_new_tokens=recipe.max_new_tokens,
        batch_size=recipe.eval_batch_size,
    )
    log(f"evaluating adapter and base on {len(data.eval_examples)} held-out examples")
    adapted = evaluate(model, tokenizer, data.eval_examples, **eval_kwargs)
    with model.disable_adapter():
        alone = evaluate(model, tokenizer, data.eval_examples, **eval_kwargs)
    gain = transfer_gain(adapted.metrics(), alone.metrics())
    reasons = negative_transfer(gain)

    _save_adapter(model, out)
    record = {
        "schema": RECORD_SCHEMA,
        "tool_version": __version__,
        "name": recipe.name,
        "recipe": recipe.model_dump(mode="json"),
        "method": recipe.method,
        "base": {
            "name": base_dir.name,
            "path": str(base_dir),
            "fingerprint": fingerprint(base_dir),
            "quantization": "nf4" if recipe.method == "qlora" else "none",
        },
        "dataset": {
            "path": str(data.dataset.path),
            "format": data.dataset.format,
            "digest": data.dataset.digest,
            "train_examples": data.n_train_examples,
            "eval_examples": len(data.eval_examples),
            "eval_path": str(data.eval_path),
        },
        "steps": steps,
        "epochs": round(steps * recipe.gradient_accumulation_steps * recipe.batch_size / len(data.train), 3),
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "low_memory": low_memory,
        "metrics": {"adapter": adapted.metrics(), "base": alone.metrics(), "transfer_gain": gain},
        "negative_transfer": bool(reasons),
        "warnings": [f"negative transfer: {r}" for r in reasons],
        "final_train_loss": losses[-1][1] if losses else None,
        "wall_seconds": round(time.time() - t_start, 2),
        "train_seconds": round(train_seconds, 2),
        "peak_rss_mb": peak_rss_mb(),
        "tokens_per_second": round(tokens_seen / train_seconds, 1) if train_seconds > 0 else None,
        "predictions": {"adapter": adapted.predictions, "base": alone.predictions},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    plot_loss_curve(
        out / "loss_curve.png",
        losses,
        title=f"{recipe.name}: {recipe.method}, rank {recipe.rank}",
        eval_losses={"base": alone.loss, "adapter": adapted.loss},
    )
    write_json_atomic(out / "training_record.json", record)
    if reasons:
        message = (
            f"NEGATIVE TRANSFER: the adapter {recipe.name!r} is worse than the base alone on its held-out "
            f"set ({'; '.join(reasons)}). Recorded in {out / 'training_record.json'}."
        )
        log("!" * 78 + "\n" + message + "\n" + "!" * 78)
        warnings.warn(message, NegativeTransferWarning, stacklevel=2)
    return TrainResult(output_dir=out, record=record)
