"""Where the example adapters are: one folder per task with its recipe, dataset and card.

Their one source is the repository's top-level `adapters/` folder. A built wheel carries a copy of it
inside this package (`setup.py`'s build step maps `adapters/` to `adapterhub_lite/examples/`), so the demo
and the transfer study find them in an installed wheel as in a checkout or an editable install.
"""

from __future__ import annotations

from pathlib import Path

from adapterhub_lite.errors import ErrorKind, RecipeError

_HERE = Path(__file__).resolve().parent
_CHECKOUT = _HERE.parents[1] / "adapters"


def _locate() -> Path:
    if any(_HERE.glob("*/recipe.yaml")):  # an installed wheel: the build copied adapters/ in here
        return _HERE
    return _CHECKOUT  # a checkout or an editable install


EXAMPLES_DIR = _locate()


def example_names() -> list[str]:
    """Names of the example tasks (the folders holding a recipe.yaml), sorted."""
    names = sorted(p.parent.name for p in EXAMPLES_DIR.glob("*/recipe.yaml"))
    if not names:
        raise RecipeError(
            f"no example adapters found in {EXAMPLES_DIR.name}/",
            hint="reinstall adapterhub-lite, or run from a checkout that has its adapters/ folder",
            kind=ErrorKind.NOT_FOUND,
        )
    return names


__all__ = ["EXAMPLES_DIR", "example_names"]
