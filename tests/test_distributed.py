"""Data-parallel training with 2 gloo processes on the embedded base (`adapterhub train --processes 2`).

Every run here uses a constant learning rate and no dropout, so that (a) one process with batch_size 8
and two with 4 compute the same optimizer steps, and (b) a resumed run may stop at another max_steps
than the run it resumes without changing the schedule.

Tolerance for "the same loss curve": the two runs add the same float32 terms in another order (each
process sums its half of the token losses and gradients, then the halves are added), so each sum
differs by a few units in the last place (float32: 6e-8 relative); Adam's update is smooth in the
gradient, so after a few steps the losses still agree to ~1e-6 relative. 1e-4 relative leaves room for
other BLAS blockings (other thread counts) while still catching a wrong shard, normalisation or a
missing all-reduce, each of which moves the loss by percents.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from adapterhub_lite.errors import TrainingError
from adapterhub_lite.examples import EXAMPLES_DIR
from adapterhub_lite.training import load_recipe, train
from adapterhub_lite.training.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

RECIPE = EXAMPLES_DIR / "antonyms" / "recipe.yaml"
SETTINGS = {"dropout": 0.0, "lr_scheduler": "constant", "checkpoint_every": 2, "keep_checkpoints": 10}
REL = 1e-4


def cli_train(out, *args, processes=2, wait=True, **settings):
    sets = [f"--set={k}={v}" for k, v in {**SETTINGS, **settings}.items()]
    cmd = [sys.executable, "-c", "from cli.main import app; app()", "train", str(RECIPE), "--output-dir",
           str(out), "--processes", str(processes), "--no-progress", *sets, *args]  # fmt: skip
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def losses(out) -> list[float]:
    return [loss for _, loss in list_checkpoints(out / "checkpoints")[-1].state["losses"]]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= REL * abs(y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """6 steps, 2 processes x batch_size 4."""
    out = tmp_path_factory.mktemp("ddp") / "two"
    run = cli_train(out, "--batch-size", "4", max_steps=6)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The same 6 steps in one process with batch_size 8 (the same global batch)."""
    out = tmp_path_factory.mktemp("ddp") / "one"
    return train(load_recipe(RECIPE, {"output_dir": out, "batch_size": 8, "max_steps": 6, **SETTINGS}),
                 progress=False)  # fmt: skip


def test_two_processes_record_their_batches_and_write_once(two):
    rec = json.loads((two / "training_record.json").read_text())
    assert rec["processes"] == {"world_size": 2, "per_process_batch": 4, "gradient_accumulation_steps": 1,
                                "global_batch": 8}  # fmt: skip
    assert rec["allreduce_seconds"] > 0
    assert [c.step for c in list_checkpoints(two / "checkpoints")] == [2, 4, 6]
    assert not list((two / "checkpoints").glob(".*"))  # no temporary leftovers from either process


def test_two_processes_follow_one_process_loss_curve_and_answers(two, one):
    assert close(losses(two), losses(one.output_dir)), (losses(two), losses(one.output_dir))
    assert losses(two)[-1] < losses(two)[0]  # it learns, so the comparison is not of two flat lines
    rec = json.loads((two / "training_record.json").read_text())
    got = [p["got"] for p in rec["predictions"]["adapter"]]
    assert got == [p["got"] for p in one.record["predictions"]["adapter"]]
    # Not the weights element by element: Adam divides each gradient by its own running size, so a
    # coordinate whose gradient is ~0 moves by ~lr on noise in the last float32 place, in either run.


def test_killed_process_ends_the_run_and_the_checkpoint_resumes_exactly(two, tmp_path):
    out = tmp_path / "killed"
    run = cli_train(out, "--batch-size", "4", wait=False, max_steps=40)
    first = out / "checkpoints" / "step-000002"
    deadline = time.monotonic() + 600
    while not first.is_dir() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.is_dir(), run.communicate()[1][-3000:]
    victim = next(p for p in psutil.Process(run.pid).children() if p.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 74, err[-3000:]
    assert "process 1 of 2 was killed by SIGKILL, so the run stopped" in err
    assert "checkpoint is" in err and "--resume" in err
    assert "Traceback" not in err.split("process 1 of 2 was killed")[-1]
    found = list_checkpoints(out / "checkpoints")
    assert found and found[-1].step < 40 and not (out / "adapter_model.safetensors").exists()
    # Keep only the first checkpoint, so the resumed run must redo steps 3.. like the uninterrupted one.
    for c in found[1:]:
        shutil.rmtree(c.path)
    resumed = cli_train(out, "--batch-size", "4", "--resume", max_steps=6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == losses(two)  # the same two processes, the same sums: bit for bit
    a, b = load_file(out / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_another_process_count(two, one, tmp_path):
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / "step-000002", crashed / "checkpoints" / "step-000002")
    # 1 process x batch 4 would change the global batch: refused, saying what fits.
    with pytest.raises(TrainingError, match=r"made by 2 process\(es\) x batch_size 4 = 8 a micro-batch"):
        train(load_recipe(RECIPE, {"output_dir": crashed, "batch_size": 4, "max_steps": 6, **SETTINGS}),
              resume=True, progress=False)  # fmt: skip
    # 1 process x batch 8: the same global batches, so it continues on the same curve.
    resumed = train(load_recipe(RECIPE, {"output_dir": crashed, "batch_size": 8, "max_steps": 6, **SETTINGS}),
                    resume=True, progress=False)  # fmt: skip
    assert resumed.record["processes"]["world_size"] == 1
    assert close(losses(crashed), losses(two))


def test_qlora_under_two_processes(tmp_path):
    out = tmp_path / "qlora"
    run = cli_train(out, "--batch-size", "4", "--method", "qlora", max_steps=2, max_seq_len=32)
    assert run.returncode == 0, run.stderr[-3000:]
    rec = json.loads((out / "training_record.json").read_text())
    assert rec["method"] == "qlora" and rec["processes"]["world_size"] == 2
    assert all(loss == loss and loss > 0 for loss in losses(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "ahl-tiny-llama"
