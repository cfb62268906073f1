"""The training loop: recipe -> data -> model -> optimisation (with checkpoints) -> held-out eval -> the PEFT
adapter, the training record and the loss curve.

Checkpoints carry the optimizer, scheduler and RNG states, so ``resume=True`` continues from the saved
step as if training had never stopped. Under data parallelism (``torchrun`` / ``accelerate launch``, see
`distributed`) every process trains; only the main one writes, evaluates and shows progress.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterhub_lite import __version__
from adapterhub_lite.base import base_name, fingerprint, load_tokenizer, resolve_base_dir
from adapterhub_lite.errors import TrainingError
from adapterhub_lite.evaluation import evaluate, negative_transfer, transfer_gain
from adapterhub_lite.training.allocator import low_memory_wanted, return_large_blocks_to_os
from adapterhub_lite.training.checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint
from adapterhub_lite.training.distributed import Processes, processes
from adapterhub_lite.training.loop import (  # noqa: F401 - lr_lambda/micro_batches: the transfer study's
    PreparedData,
    lr_lambda,
    micro_batches,
    optimizer_step,
    prepare_data,
    total_steps,
)
from adapterhub_lite.training.model import build_model, check_layers, resolve_device, resolve_dtype
from adapterhub_lite.training.recipe import Recipe
from adapterhub_lite.training.record import (
    RECORD_SCHEMA,
    loss_points,
    peak_rss_mb,
    plot_loss_curve,
    write_json_atomic,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_record.json", "loss_curve.png")


class NegativeTransferWarning(UserWarning):
    """The adapter does worse than the base alone on its own held-out set."""


@dataclass
class TrainResult:
    output_dir: Path
    record: dict
    main: bool = True  # False in the other processes of a data-parallel run (they write nothing)

    @property
    def negative_transfer(self) -> bool:
        return bool(self.record.get("negative_transfer"))


def _prepare_output(out: Path, resume: bool, overwrite: bool) -> bool:
    """Make ``out`` ready; returns whether this run created it."""
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
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created


def _clean_failed(out: Path, created: bool) -> None:
    """After a failure: no half-written checkpoint or adapter is left; complete checkpoints stay."""
    ckpt_dir = out / "checkpoints"
    for tmp in [*ckpt_dir.glob(".step-*.tmp"), out / ".adapter.tmp"]:
        shutil.rmtree(tmp, ignore_errors=True)
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _check_settings(recipe: Recipe, state: dict, path: Path) -> None:
    saved, now = state.get("settings", {}), recipe.lora_settings()
    diffs = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in now if saved.get(k) != now.get(k)]
    if diffs:
        raise TrainingError(
            f"checkpoint {path} was made with other settings: " + "; ".join(diffs),
            hint="resume with the recipe it was made with (only max_steps/epochs and eval/output fields "
            "may change), or start over with --overwrite",
        )


def _check_resume_early(recipe: Recipe, ckpt_dir: Path) -> None:
    """Refuse a resume that cannot work before anything is loaded (the base model takes seconds)."""
    found = list_checkpoints(ckpt_dir)
    if not found:
        raise TrainingError(f"nothing to resume: no checkpoint in {ckpt_dir}", hint="run without --resume")
    _check_settings(recipe, found[-1].state, found[-1].path)


def _check_resumable(recipe: Recipe, state: dict, path: Path, world: int) -> None:
    _check_settings(recipe, state, path)
    procs = state.get("processes", {"world_size": 1, "per_process_batch": recipe.batch_size})
    then = procs["world_size"] * procs["per_process_batch"]
    if then != world * recipe.batch_size:
        fits = then // world if then % world == 0 else None
        raise TrainingError(
            f"checkpoint {path} was made by {procs['world_size']} process(es) x batch_size "
            f"{procs['per_process_batch']} = {then} a micro-batch; now {world} x {recipe.batch_size} "
            f"= {world * recipe.batch_size}, which would change the batches it continues with",
            hint=(
                f"resume with --batch-size {fits}" if fits else f"resume with a process count dividing {then}"
            )
            + " (the global micro-batch must stay the same)",
        )


def _save_adapter(model, out: Path, name: str) -> None:
    """Save the PEFT adapter into ``out`` file by file through a temporary directory (atomic per file)."""
    import os

    # The base's name, not a local path (meaningless elsewhere) nor "None" (what a 4-bit load leaves).
    for config in model.peft_config.values():
        config.base_model_name_or_path = name
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # save_embedding_layers=False: "auto" would look the base's name up on a model hub.
    model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def train(
    recipe: Recipe, *, resume: bool = False, progress: bool = True, overwrite: bool = False
) -> TrainResult:
    """Train the adapter a recipe describes and write it, with its record and loss curve, to output_dir.

    ``resume=True`` continues from the newest checkpoint in ``output_dir/checkpoints``. Started by
    torchrun or ``accelerate launch``, each process trains on its share of every global batch.
    """
    t_start = time.time()
    out = recipe.resolved_output_dir.resolve()
    if resume:
        _check_resume_early(recipe, out / "checkpoints")
    base_dir = resolve_base_dir(recipe.base)
    device = resolve_device(recipe)
    dtype = resolve_dtype(recipe, device)
    tokenizer = load_tokenizer(base_dir)
    data = prepare_data(recipe, tokenizer)  # dataset errors surface before any model is loaded
    check_layers(recipe, base_dir)
    procs = processes(device)
    created = False
    try:
        error = None
        if procs.main:
            try:
                created = _prepare_output(out, resume, overwrite)
            except TrainingError as exc:
                error = exc
        error = procs.share(error)
        if error is not None:
            raise error
        result = _train(
            recipe, out, base_dir, device, dtype, tokenizer, data, procs, resume, progress, t_start
        )
    except BaseException:
        if procs.main:
            _clean_failed(out, created)
        raise
    finally:
        procs.close()
    return result


def _train(recipe, out, base_dir, device, dtype, tokenizer, data: PreparedData, procs: Processes,
           resume, progress, t_start) -> TrainResult:  # fmt: skip
    from tqdm.auto import tqdm

    show = progress and procs.main

    def log(msg: str) -> None:
        if show:
            tqdm.write(msg)

    ckpt_dir = out / "checkpoints"
    low_memory = low_memory_wanted(recipe.low_memory, recipe.method, device)
    if low_memory:
        return_large_blocks_to_os()  # before loading: the 4-bit load churns large blocks too
    torch.manual_seed(recipe.seed)
    model = build_model(recipe, base_dir, device, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    procs.broadcast_(trainable)  # the same LoRA start everywhere, whatever each process's RNG did
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    steps = total_steps(recipe, len(data.train), procs.world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps))

    start_step, losses, tokens_seen, train_seconds = 0, [], 0, 0.0
    if resume:
        found = procs.share(str(list_checkpoints(ckpt_dir)[-1].path) if list_checkpoints(ckpt_dir) else None)
        if found is None:
            raise TrainingError(
                f"nothing to resume: no checkpoint in {ckpt_dir}", hint="run without --resume"
            )
        ckpt = next(c for c in list_checkpoints(ckpt_dir) if str(c.path) == found)
        _check_resumable(recipe, ckpt.state, ckpt.path, procs.world)
        load_checkpoint(ckpt, model, optimizer, scheduler, rank=procs.rank)
        start_step = ckpt.step
        losses = [tuple(x) for x in ckpt.state["losses"]]
        tokens_seen, train_seconds = ckpt.state["tokens_seen"], ckpt.state["train_seconds"]
        log(f"resuming from {ckpt.path.name} (step {start_step} of {steps})")
    else:
        # The same dropout masks whether or not the base load used the RNG; each process its own.
        torch.manual_seed(recipe.seed + procs.rank)
    world = {
        "world_size": procs.world,
        "per_process_batch": recipe.batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "global_batch": recipe.batch_size * procs.world * recipe.gradient_accumulation_steps,
    }
    log(
        f"{recipe.method} on {base_dir.name} ({device}, {str(dtype).removeprefix('torch.')}"
        + (f", {procs.world} processes" if procs.distributed else "")
        + f"): {n_trainable:,} trainable of {n_total:,} parameters; {len(data.train)} training sequences, "
        f"{len(data.eval_examples)} held-out examples; {steps} steps"
    )
    data_warnings = _data_warnings(data)
    for w in data_warnings:
        log(f"WARNING: {w}")

    def checkpoint(step: int) -> None:
        rng = procs.gather(rng_state())
        if procs.main:
            state = {
                "losses": losses,
                "tokens_seen": tokens_seen,
                "train_seconds": train_seconds,
                "total_steps": steps,
                "settings": recipe.lora_settings(),
                "processes": world,
            }
            save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, state, recipe.keep_checkpoints, rng)

    model.train()
    bar = tqdm(total=steps, initial=start_step, desc=f"train {recipe.name}", unit="step", disable=not show)
    comm_at_start = procs.comm_seconds
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        step_loss, step_tokens = optimizer_step(
            model, data, tokenizer, recipe, step, optimizer, scheduler, trainable, device, procs=procs
        )
        tokens_seen += step_tokens
        train_seconds += time.perf_counter() - t0
        losses.append((step + 1, step_loss))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == steps:
            checkpoint(step + 1)
    bar.close()
    comm_seconds = procs.comm_seconds - comm_at_start
    if not procs.main:
        return TrainResult(output_dir=out, record={}, main=False)

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

    name = base_name(base_dir)
    _save_adapter(model, out, name)
    record = {
        "schema": RECORD_SCHEMA,
        "tool_version": __version__,
        "name": recipe.name,
        "recipe": recipe.model_dump(mode="json"),
        "method": recipe.method,
        "base": {
            "name": name,
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
            "skipped_lines": data.n_skipped,
            "skipped": data.skipped,
            "overlong": data.lengths.to_dict(),
        },
        "steps": steps,
        "epochs": round(steps * world["global_batch"] / len(data.train), 3),
        "processes": world,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "low_memory": low_memory,
        "metrics": {"adapter": adapted.metrics(), "base": alone.metrics(), "transfer_gain": gain},
        "negative_transfer": bool(reasons),
        "warnings": data_warnings + [f"negative transfer: {r}" for r in reasons],
        "final_train_loss": losses[-1][1] if losses else None,
        "losses": loss_points(losses),  # per step, bounded; the hub's adapter page plots it
        "wall_seconds": round(time.time() - t_start, 2),
        "train_seconds": round(train_seconds, 2),
        "allreduce_seconds": round(comm_seconds, 3),
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
        warnings.warn(message, NegativeTransferWarning, stacklevel=3)
    return TrainResult(output_dir=out, record=record)


def _data_warnings(data: PreparedData) -> list[str]:
    out = []
    if data.n_skipped:
        shown = "; ".join(data.skipped[:3]) + ("; ..." if data.n_skipped > 3 else "")
        out.append(f"{data.n_skipped} bad record(s) skipped (skip_bad_lines): {shown}")
    too_long = data.lengths.warning()
    if too_long:
        out.append(too_long)
    return out
