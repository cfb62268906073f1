"""The README's first command: the end-to-end demo, for real (training, registry, vLLM, openai client)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from adapterhub_lite.demo import run_demo
from adapterhub_lite.examples import EXAMPLES_DIR, example_names

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_reads_the_example_adapters_from_their_one_source():
    """In a checkout (the editable install) the examples are the top-level adapters/ folder, each with its
    recipe, data and card, and git holds no second copy inside the package (the wheel gets one at build)."""
    assert EXAMPLES_DIR == REPO / "adapters"
    assert example_names() == ["animal-sounds", "antonyms", "capitals", "ship-log"]
    for name in example_names():
        assert {p.name for p in (EXAMPLES_DIR / name).iterdir()} >= {"recipe.yaml", "data.jsonl", "README.md"}
    tracked = subprocess.run(
        ["git", "ls-files", "adapterhub_lite/examples"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked == ["adapterhub_lite/examples/__init__.py"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.e2e
def test_demo_runs_the_whole_path(tmp_path):
    lines: list[str] = []
    summary = run_demo(tmp_path / "demo", log=lines.append)

    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text()) == json.loads(
        json.dumps(summary)
    )
    by_model = {(r["tenant"], r["model"]): r["exact_match"] for r in summary["requests"]}
    # Each tenant's adapter does its task on held-out facts; the base alone does not.
    assert by_model[("acme", "ahl-tiny-llama")] == 0.0
    assert by_model[("acme", "animals")] >= 0.75
    assert by_model[("globex", "opposites")] >= 0.75
    assert by_model[("globex", "acme/animal-sounds@1.0.0")] == by_model[("acme", "animals")]
    # Isolation fails closed.
    assert summary["denials"] == {
        "globex -> acme's alias 'geo'": 404,
        "globex -> acme/geo@1.0.0": 404,
        "globex -> the base model": 404,
        "no key": 401,
        "wrong key": 401,
        "acme -> /v1/load_lora_adapter": 403,
    }
    assert "geo" not in summary["globex_models"]
    # The live promotion changes behaviour, and rollback restores it.
    swap = summary["hot_swap"]
    assert swap["after"] >= 0.75 and swap["after"] > swap["before"]
    assert swap["rollback"] == swap["before"]
    # A rollout of the better version advances on its own (the server's scheduler) to promotion; one of
    # the worse version is refused by the evaluation gate before any traffic.
    ro = summary["rollouts"]
    assert ro["good"]["state"] == "promoted" and ro["good"]["alias"] == "acme/geo@1.1.0"
    assert ro["refused"]["state"] == "rolled-back" and not ro["refused"]["eval"]["passed"]
    assert ro["refused"]["eval"]["candidate"] < ro["refused"]["eval"]["current"]
    assert [t["action"] for t in ro["trail"]] == [
        "started",
        "eval-passed",
        "promoted",
        "started",
        "eval-refused",
    ]
    assert ro["trail"][2]["actor"] == "schedule"
    assert any(ln.lstrip().startswith("adapterhub_requests_total") for ln in lines)

    # A second run reuses the trained adapters and the published bundles.
    lines.clear()
    again = run_demo(tmp_path / "demo", log=lines.append)
    assert sum("reuse" in ln for ln in lines) == 4
    assert again["hot_swap"]["after"] == swap["after"]
