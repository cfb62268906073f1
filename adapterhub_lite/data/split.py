"""A deterministic train/eval split of a dataset's examples (lines), fixed by the seed."""

from __future__ import annotations

import math
import random
from typing import TypeVar

from adapterhub_lite.errors import DatasetError

T = TypeVar("T")


def train_eval_split(examples: list[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out ``ceil(eval_fraction * n)`` examples chosen by a seeded shuffle; both keep file order.

    The split is by line, before tokenization, so the windows of one long text never straddle it.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DatasetError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = math.ceil(eval_fraction * n) if eval_fraction > 0 else 0
    if n - n_eval < 1:
        raise DatasetError(
            f"{n} example(s) leave nothing to train on with eval_fraction={eval_fraction}",
            hint="add examples or lower eval_fraction",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    return train, evals
