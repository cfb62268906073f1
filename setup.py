"""The one build step pyproject.toml cannot declare: the example adapters into the wheel.

Their one source is the top-level `adapters/` folder (recipe, dataset and card per adapter). A wheel gets
a copy of it as package data under `adapterhub_lite/examples/`, where `adapterhub_lite.examples` looks
first, so `adapterhub demo` works from an installed wheel. An editable install copies nothing: the
package finds `adapters/` in the checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE = Path(__file__).resolve().parent / "adapters"


class BuildPyWithAdapters(build_py):
    """build_py, then adapters/ copied into the built package (refuses to build a wheel without them)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        recipes = sorted(SOURCE.glob("*/recipe.yaml"))
        if not recipes:
            raise SystemExit("error: no adapters/*/recipe.yaml: the wheel would ship no example adapters")
        target = Path(self.build_lib) / "adapterhub_lite" / "examples"
        for src in sorted(SOURCE.rglob("*")):
            rel = src.relative_to(SOURCE)
            if src.is_file() and not any(part.startswith((".", "__")) for part in rel.parts):
                dst = target / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildPyWithAdapters})
