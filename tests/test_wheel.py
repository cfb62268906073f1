"""The package as a user installs it: build the wheel, install it into a fresh venv, and run the demo's
first step (training an example adapter from the packaged recipe and dataset) from outside the repository.
The example adapters' one source is the top-level `adapters/` folder; `setup.py`'s build step copies it
into the wheel as `adapterhub_lite/examples/`, which this test checks byte for byte.

The fresh venv gets only the wheel (`--no-deps`); the heavy stack (torch, transformers, peft, ...) comes
from this project's venv through a .pth line, so nothing is downloaded. A path in a .pth file is not a
site directory, so the project's editable install (its own .pth hook) stays inactive there: the test
checks that adapterhub_lite is imported from the wheel, not from this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _purelib(python: Path | str) -> Path:
    out = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], Path("/"))
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel built from this working tree; returns its bin/ folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the working tree (tracked and untracked-but-not-ignored files), so the build
    # writes nothing into the checkout; this venv's setuptools builds it (no build isolation, no download).
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    src = tmp / "src"
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)], tmp)
    (wheel,) = (tmp / "dist").glob("adapterhub_lite-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    # Install before the stack is visible, so pip sees an empty environment and touches nothing else.
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], tmp)
    (_purelib(python) / "project_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_wheel_ships_the_examples_and_trains_one_outside_the_repository(installed, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    script = """
import json, sys
from pathlib import Path
import adapterhub_lite
from adapterhub_lite.demo import DEMO_ADAPTERS, train_adapters
from adapterhub_lite.demo.questions import heldout_questions
from adapterhub_lite.examples import EXAMPLES_DIR, example_names

runs = train_adapters(Path("work"), print, "lora", adapters=DEMO_ADAPTERS[:1], max_steps=2)
(ref, run_dir), = runs.items()
record = json.loads((run_dir / "training_record.json").read_text())
print(json.dumps({
    "package": adapterhub_lite.__file__,
    "examples_dir": str(EXAMPLES_DIR),
    "examples": example_names(),
    "ref": ref,
    "steps": record["steps"],
    "data": record["recipe"]["data"],
    "questions": len(heldout_questions("capitals")),
}))
"""
    done = _run([str(installed / "python"), "-c", script], outside, timeout=900)
    info = json.loads(done.stdout.strip().splitlines()[-1])

    venv = installed.parent.resolve()
    assert Path(info["package"]).resolve().is_relative_to(venv), info["package"]
    assert not Path(info["package"]).resolve().is_relative_to(REPO)
    assert Path(info["examples_dir"]).resolve().is_relative_to(venv)
    assert info["examples"] == ["animal-sounds", "antonyms", "capitals", "ship-log"]
    # The build copied adapters/ (recipe, data and card of each) into the package: the one source, shipped.
    for name in info["examples"]:
        for file in ("recipe.yaml", "data.jsonl", "README.md"):
            shipped = Path(info["examples_dir"]) / name / file
            assert shipped.read_bytes() == (REPO / "adapters" / name / file).read_bytes(), shipped
    assert info["ref"] == "acme/geo@1.0.0" and info["steps"] == 2
    assert Path(info["data"]).resolve() == (Path(info["examples_dir"]) / "capitals" / "data.jsonl").resolve()
    assert info["questions"] > 0
    assert (outside / "work" / "runs" / "geo-1.0.0" / "training_record.json").is_file()

    # The console script of the wheel answers from outside the repository too.
    cli = _run([str(installed / "adapterhub"), "demo", "--help"], outside)
    assert "--verbose" in cli.stdout
