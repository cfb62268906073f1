"""The adapter-slot defaults `adapterhub serve` picks: measured ones on the CPU, small ones on a GPU,
and never a pair vLLM refuses when only one of the two is given."""

from __future__ import annotations

import pytest

from adapterhub_lite.serving.config import CPU_LORA_SLOTS, GPU_LORA_SLOTS
from adapterhub_lite.serving.supervisor import launcher
from adapterhub_lite.serving.supervisor.launcher import ServeOptions


@pytest.mark.parametrize("cpu,slots", [(True, CPU_LORA_SLOTS), (False, GPU_LORA_SLOTS)])
def test_the_platform_picks_the_slots_unless_told(monkeypatch, cpu, slots):
    monkeypatch.setattr(launcher, "on_cpu", lambda: cpu)
    opts = ServeOptions(base_dir="/m")
    assert (opts.max_loras, opts.max_cpu_loras) == slots
    assert opts.serving_config().max_loaded == slots[1]  # the hot set follows --max-cpu-loras
    told = ServeOptions(base_dir="/m", max_loras=3, max_cpu_loras=5)
    assert (told.max_loras, told.max_cpu_loras) == (3, 5)


def test_one_flag_given_alone_keeps_the_pair_valid(monkeypatch):
    from adapterhub_lite.base import EMBEDDED_BASE_DIR

    monkeypatch.setattr(launcher, "on_cpu", lambda: True)
    small_cache = ServeOptions(base_dir=str(EMBEDDED_BASE_DIR), max_cpu_loras=6)
    assert (small_cache.max_loras, small_cache.max_cpu_loras) == (6, 6)
    wide_batch = ServeOptions(base_dir=str(EMBEDDED_BASE_DIR), max_loras=CPU_LORA_SLOTS[1] + 16)
    assert wide_batch.max_cpu_loras == CPU_LORA_SLOTS[1] + 16
    for opts in (small_cache, wide_batch):
        launcher.build_command(opts)  # vLLM's rule --max-cpu-loras >= --max-loras holds


def test_the_cpu_defaults_are_a_measured_setting():
    """The defaults come from benchmarks/results/serving_max_loras_sweep.json: the CPU pair must be one of
    its settings (so a change of defaults comes with a measurement)."""
    import json
    from pathlib import Path

    sweep = json.loads(
        (Path(__file__).parents[1] / "benchmarks" / "results" / "serving_max_loras_sweep.json").read_text()
    )
    measured = {(p["max_loras"], p["max_cpu_loras"]) for p in sweep["points"] if "max_cpu_loras" in p}
    assert CPU_LORA_SLOTS in measured
