"""The example adapters: one folder per task with its recipe and dataset, shipped with the package.

They are package data, so the demo and the transfer study find them in an installed wheel as in a
checkout (`adapterhub train adapterhub_lite/examples/capitals/recipe.yaml` from the repository root).
"""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent


def example_names() -> list[str]:
    """Names of the example tasks (the folders holding a recipe.yaml), sorted."""
    return sorted(p.parent.name for p in EXAMPLES_DIR.glob("*/recipe.yaml"))


__all__ = ["EXAMPLES_DIR", "example_names"]
