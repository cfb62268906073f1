"""Adapters trained once per test session and shared by test_training.py and test_eval.py.

Both modules import the fixtures; the cache below makes the second import reuse the first run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub_lite.examples import EXAMPLES_DIR
from adapterhub_lite.training import TrainResult, load_recipe, train

ROOT = Path(__file__).resolve().parent.parent
_RUNS: dict[str, TrainResult] = {}


def train_example(task: str, out_root: Path, key: str | None = None, **overrides) -> TrainResult:
    """Train ``adapters/<task>/recipe.yaml`` (with overrides) once per session and key."""
    key = key or task
    if key not in _RUNS:
        recipe = load_recipe(
            EXAMPLES_DIR / task / "recipe.yaml", {"output_dir": out_root / key, **overrides}
        )
        _RUNS[key] = train(recipe, progress=False)
    return _RUNS[key]


@pytest.fixture(scope="session")
def capitals_lora(tmp_path_factory) -> TrainResult:
    """The capitals example exactly as shipped (LoRA on the embedded base)."""
    return train_example("capitals", tmp_path_factory.getbasetemp(), key="capitals-lora")


@pytest.fixture(scope="session")
def capitals_qlora(tmp_path_factory) -> TrainResult:
    """The same recipe on the 4-bit NF4 base."""
    return train_example("capitals", tmp_path_factory.getbasetemp(), key="capitals-qlora", method="qlora")
