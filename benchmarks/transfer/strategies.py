"""The adaptation strategies the study compares, and how one run of one of them is carried out.

LoRA and QLoRA runs go through the project's trainer (`adapterhub_lite.training.train`), exactly as
`adapterhub train` would run them; full fine-tuning and the head-only probe go through `finetune`, which
shares the trainer's optimisation; every score comes from `adapterhub_lite.evaluation.evaluate`.
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterhub_lite.base import load_base, load_tokenizer
from adapterhub_lite.data import load_dataset
from adapterhub_lite.evaluation import evaluate, evaluate_file
from adapterhub_lite.training import NegativeTransferWarning, recipe_from_dict, train
from benchmarks.transfer.finetune import finetune
from benchmarks.transfer.forgetting import adapter_source_loss, source_loss
from benchmarks.transfer.tasks import Task, write_split

STRATEGIES: dict[str, str] = {
    "zero-shot": "the base alone, no training",
    "head-only": "linear probe: an untied copy of the output head trained, the body frozen",
    "lora": "LoRA on every linear layer (the project's trainer)",
    "qlora": "LoRA on the 4-bit NF4 base (the project's trainer)",
    "full": "full fine-tuning of every weight",
    "lora-random-init": "the same LoRA on a never-pretrained model of the same shape",
    "full-random-init": "every weight of a never-pretrained model trained (from scratch)",
}
RANDOM_INIT = ("lora-random-init", "full-random-init")


@dataclass(frozen=True)
class RunSpec:
    """One training (or zero-shot) run: which task, strategy, seed, rank, layers and data budget."""

    task: str
    strategy: str
    seed: int
    rank: int | None = None
    layers: tuple[int, ...] | None = None
    n_train: int | None = None  # None: the task's whole train pool
    check_warning: bool = False

    @property
    def method(self) -> str:
        """The training code the strategy uses: lora, qlora, full, head-only or none."""
        return {"lora-random-init": "lora", "full-random-init": "full", "zero-shot": "none"}.get(
            self.strategy, self.strategy
        )

    @property
    def id(self) -> str:
        parts = [self.task, self.strategy, f"s{self.seed}"]
        if self.rank is not None:
            parts.append(f"r{self.rank}")
        if self.layers is not None:
            parts.append("L" + "-".join(map(str, self.layers)))
        if self.n_train is not None:
            parts.append(f"n{self.n_train}")
        return "_".join(parts)


@dataclass
class RunContext:
    """What every run of one study shares."""

    base_dir: Path
    random_dirs: dict[int, Path]  # seed -> the random-init control's directory
    work_dir: Path
    tasks: dict[str, Task]
    blocks: torch.Tensor  # held-out source-corpus blocks (forgetting)
    base_source_loss: float
    base_parameters: int
    linear_modules: list[str]  # what "all-linear" means on this base, for runs that pick layers
    steps: int
    batch_size: int
    learning_rates: dict[str, float]
    max_new_tokens: int = 16
    lr_scheduler: str = "constant"
    keep_runs: bool = False
    recipe_overrides: dict[str, dict] = field(default_factory=dict)  # per task, e.g. the control's lr


def _row(spec: RunSpec, **values) -> dict:
    row = {
        "id": spec.id,
        "task": spec.task,
        "strategy": spec.strategy,
        "start": "random" if spec.strategy in RANDOM_INIT else "pretrained",
        "seed": spec.seed,
        "rank": spec.rank,
        "layers": list(spec.layers) if spec.layers is not None else None,
        "n_train": None,
        "n_eval": None,
        "steps": 0,
        "learning_rate": None,
        "trainable_parameters": 0,
        "total_parameters": None,
        "exact_match": None,
        "loss": None,
        "base_exact_match": None,
        "base_loss": None,
        "source_loss": None,
        "warning_fired": None,
        "record_negative_transfer": None,
        "eval_negative_transfer": None,
        "train_seconds": 0.0,
    }
    row.update(values)
    return row


def _recipe(spec: RunSpec, ctx: RunContext, task: Task, split, out_dir: Path):
    values = {
        "name": spec.id.replace("_", "-"),
        "base": str(ctx.random_dirs[spec.seed] if spec.strategy in RANDOM_INIT else ctx.base_dir),
        "method": "qlora" if spec.method == "qlora" else "lora",
        "data": str(split.train_path),
        "eval_data": str(split.eval_path),
        "max_seq_len": task.max_seq_len,
        "rank": spec.rank or 8,
        "alpha": 2.0 * (spec.rank or 8),  # alpha/rank fixed at 2, so the rank sweep changes capacity only
        "dropout": 0.0,
        # peft accepts layers_to_transform only with target modules named one by one.
        "target_modules": ctx.linear_modules if spec.layers is not None else "all-linear",
        "layers_to_transform": list(spec.layers) if spec.layers is not None else None,
        "learning_rate": ctx.learning_rates[spec.method],
        "max_steps": ctx.steps,
        "lr_scheduler": ctx.lr_scheduler,
        "batch_size": ctx.batch_size,
        "seed": spec.seed,
        "device": "cpu",
        "precision": "fp32",
        "max_new_tokens": ctx.max_new_tokens,
        "output_dir": str(out_dir),
        "checkpoint_every": ctx.steps,
        "keep_checkpoints": 1,
    }
    values.update(ctx.recipe_overrides.get(spec.task, {}))
    return recipe_from_dict(values, source=f"transfer study run {spec.id}")


def run_spec(spec: RunSpec, ctx: RunContext) -> dict:
    """Carry out one run and return its row of results (scores, parameter counts, forgetting, warning)."""
    t0 = time.time()
    task = ctx.tasks[spec.task]
    split = write_split(task, spec.seed, ctx.work_dir, spec.n_train)
    common = {"n_train": split.n_train, "n_eval": split.n_eval}
    if spec.method == "none":
        row = _zero_shot(spec, ctx, task, split.eval_path, common)
    elif spec.method in ("lora", "qlora"):
        row = _adapter_run(spec, ctx, task, split, common)
    else:
        row = _finetune_run(spec, ctx, task, split, common)
    row["wall_seconds"] = round(time.time() - t0, 2)
    return row


def _zero_shot(spec: RunSpec, ctx: RunContext, task: Task, eval_path: Path, common: dict) -> dict:
    tokenizer = load_tokenizer(ctx.base_dir)
    model = load_base(ctx.base_dir, dtype=torch.float32, device="cpu")
    result = evaluate(
        model,
        tokenizer,
        load_dataset(eval_path).examples,
        max_seq_len=task.max_seq_len,
        max_new_tokens=ctx.max_new_tokens,
    )
    return _row(
        spec,
        **common,
        total_parameters=ctx.base_parameters,
        exact_match=result.exact_match,
        loss=result.loss,
        base_exact_match=result.exact_match,
        base_loss=result.loss,
        source_loss=ctx.base_source_loss,
    )


def _adapter_run(spec: RunSpec, ctx: RunContext, task: Task, split, common: dict) -> dict:
    out_dir = ctx.work_dir / "runs" / spec.id
    recipe = _recipe(spec, ctx, task, split, out_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NegativeTransferWarning)
        result = train(recipe, progress=False, overwrite=True)
    record = result.record
    fired = any(issubclass(w.category, NegativeTransferWarning) for w in caught)
    metrics = record["metrics"]
    row = _row(
        spec,
        **common,
        steps=record["steps"],
        learning_rate=recipe.learning_rate,
        trainable_parameters=record["trainable_parameters"],
        # peft's total counts the LoRA weights and 4-bit weights packed two to a byte: use the base's own.
        total_parameters=ctx.base_parameters,
        exact_match=metrics["adapter"]["exact_match"],
        loss=metrics["adapter"]["loss"],
        base_exact_match=metrics["base"]["exact_match"],
        base_loss=metrics["base"]["loss"],
        warning_fired=fired,
        record_negative_transfer=record["negative_transfer"],
        train_seconds=record["train_seconds"],
    )
    if spec.strategy not in RANDOM_INIT:
        row["source_loss"] = adapter_source_loss(ctx.base_dir, result.output_dir, ctx.blocks)
    if spec.check_warning:
        # An independent second opinion: `adapterhub eval`'s code path, from the adapter saved on disk.
        report = evaluate_file(
            split.eval_path,
            base=recipe.base,
            adapter=result.output_dir,
            max_seq_len=task.max_seq_len,
            max_new_tokens=ctx.max_new_tokens,
        )
        row["eval_negative_transfer"] = report["negative_transfer"]
        row["eval_metrics"] = {k: report["metrics"][k] for k in ("adapter", "base", "transfer_gain")}
    if not ctx.keep_runs:
        shutil.rmtree(out_dir, ignore_errors=True)
    return row


def _finetune_run(spec: RunSpec, ctx: RunContext, task: Task, split, common: dict) -> dict:
    recipe = _recipe(spec, ctx, task, split, ctx.work_dir / "runs" / spec.id)
    result = finetune(recipe, spec.method)  # type: ignore[arg-type]
    row = _row(
        spec,
        **common,
        steps=result.steps,
        learning_rate=recipe.learning_rate,
        trainable_parameters=result.trainable_parameters,
        total_parameters=result.total_parameters,
        exact_match=result.eval.exact_match,
        loss=result.eval.loss,
        train_seconds=result.train_seconds,
    )
    if spec.strategy not in RANDOM_INIT:
        row["source_loss"] = source_loss(result.model, ctx.blocks)
    return row
