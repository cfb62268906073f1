"""The study's tasks and their per-seed train/eval files.

A task is a list of JSONL records. For each seed it is split once into a train *pool* and a fixed eval set
(the trainer's own `train_eval_split`, so the held-out facts are the ones the trainer would hold out);
data-budget runs train on the first ``n`` records of a seeded shuffle of the pool, so a smaller budget is
always a subset of a larger one and every budget is scored on the same eval set.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from adapterhub_lite.atomic import write_text
from adapterhub_lite.base.world import source_documents
from adapterhub_lite.data import load_dataset, train_eval_split
from adapterhub_lite.errors import DatasetError, RecipeError
from adapterhub_lite.examples import EXAMPLES_DIR
from benchmarks.transfer.cipher import cipher_examples

CIPHER = "cipher"
SOURCE_TEXT = "source-text"


@dataclass(frozen=True)
class Task:
    """A named dataset and how much of it is held out for evaluation."""

    name: str
    rows: tuple[dict, ...]
    eval_fraction: float
    max_seq_len: int = 64

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the records (as JSONL), so results name the exact data they came from."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TaskSplit:
    """The files one run trains and evaluates on."""

    task: str
    seed: int
    train_path: Path
    eval_path: Path
    n_train: int
    n_eval: int
    pool_size: int


def example_task(name: str, adapters_dir: Path | None = None, eval_fraction: float = 0.25) -> Task:
    """One of the example tasks, ``<examples>/<name>/data.jsonl`` (validated by the data part)."""
    path = (adapters_dir or EXAMPLES_DIR) / name / "data.jsonl"
    if not path.is_file():
        raise DatasetError(
            f"the study's task {name!r} has no dataset at {path}",
            hint="run `python scripts/make_example_datasets.py`, or pass adapters_dir",
        )
    load_dataset(path)  # names file:line of any bad record before the study starts
    rows = tuple(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return Task(name, rows, eval_fraction)


def cipher_task(n: int, eval_fraction: float = 0.2) -> Task:
    """The far-from-source task (see `benchmarks.transfer.cipher`)."""
    return Task(CIPHER, tuple(cipher_examples(n, seed=0)), eval_fraction)


def source_text_task(n: int, eval_fraction: float) -> Task:
    """Raw source-corpus text from documents the base never saw (the negative-transfer warning's control)."""
    return Task(
        SOURCE_TEXT,
        tuple({"text": d} for d in source_documents(n, seed=20_000)),
        eval_fraction,
        max_seq_len=128,
    )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_split(task: Task, seed: int, work_dir: Path, n_train: int | None = None) -> TaskSplit:
    """Write (once) and return the train/eval files of ``task`` for ``seed`` and a train budget.

    ``n_train=None`` trains on the whole pool; a budget larger than the pool is an error.
    """
    pool, evals = train_eval_split(list(task.rows), task.eval_fraction, seed)
    if n_train is None:
        n_train = len(pool)
    if not 1 <= n_train <= len(pool):
        raise RecipeError(
            f"data budget {n_train} for task {task.name!r}: its train pool has {len(pool)} examples",
            hint=f"use budgets between 1 and {len(pool)}",
        )
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    train = [pool[i] for i in sorted(order[:n_train])]
    d = work_dir / "data" / task.name / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = d / f"train-{n_train}.jsonl", d / "eval.jsonl"
    if not train_path.exists():
        _write_jsonl(train_path, train)
    if not eval_path.exists():
        _write_jsonl(eval_path, evals)
    return TaskSplit(task.name, seed, train_path, eval_path, n_train, len(evals), len(pool))
