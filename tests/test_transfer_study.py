"""The transfer-learning study: its parts on small cases, and the whole study end to end at smoke size.

The smoke study trains every strategy for real (a few steps each) on the embedded base and writes the
same files the full study commits; the assertions check their structure and that the numbers are sane
(what must be true even after four steps), not that a target is met.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterhub_lite.base import load_base, load_tokenizer, resolve_base_dir
from adapterhub_lite.base.pretrain import PretrainConfig, build_model
from adapterhub_lite.errors import RecipeError
from adapterhub_lite.training import recipe_from_dict
from benchmarks.transfer import (
    STRATEGIES,
    StudyConfig,
    cipher_examples,
    cipher_key,
    finetune,
    plan,
    run_study,
    untie_output_head,
    write_report,
)
from benchmarks.transfer.cipher import ALPHABET
from benchmarks.transfer.plots import PLOTS
from benchmarks.transfer.study import load_tasks
from benchmarks.transfer.tasks import cipher_task, write_split

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the parts


def test_cipher_is_a_fixed_derangement_and_examples_encode_their_prompt():
    key = cipher_key(0)
    assert sorted(key) == sorted(key.values()) == list(ALPHABET)
    assert all(a != b for a, b in key.items())
    assert cipher_key(0) == key and cipher_key(1) != key
    rows = cipher_examples(50)
    assert rows == cipher_examples(50)
    assert len({r["prompt"] for r in rows}) == 50
    for r in rows:
        plain = r["prompt"].removeprefix("Encode: ").removesuffix("\nCode:").split(" ")
        assert r["completion"] == " " + " ".join(key[c] for c in plain)


def test_budgets_are_nested_subsets_scored_on_one_eval_set(tmp_path):
    task = cipher_task(40)
    small = write_split(task, 0, tmp_path, 4)
    large = write_split(task, 0, tmp_path, 16)
    whole = write_split(task, 0, tmp_path)
    assert (small.n_train, large.n_train, whole.n_train, whole.n_eval) == (4, 16, 32, 8)
    assert small.eval_path == large.eval_path == whole.eval_path

    def lines(path):
        return set(path.read_text().splitlines())

    assert lines(small.train_path) <= lines(large.train_path) <= lines(whole.train_path)
    assert not lines(whole.train_path) & lines(whole.eval_path)
    other_seed = write_split(task, 1, tmp_path)
    assert lines(other_seed.eval_path) != lines(whole.eval_path)
    with pytest.raises(RecipeError, match="data budget 33 .* 32 examples"):
        write_split(task, 0, tmp_path, 33)


def test_bad_study_configuration_names_every_bad_field():
    with pytest.raises(RecipeError) as err:
        StudyConfig.make(seeds=0, strategies=["lora", "prompt-tuning"], ranks=[0, 4])
    text = str(err.value)
    assert "seeds" in text and "prompt-tuning" in text and "ranks" in text
    with pytest.raises(RecipeError, match="unknown"):
        StudyConfig.make(epochs=3)
    config = StudyConfig.full(budgets=[4, 31])
    with pytest.raises(RecipeError, match="data budget 31 for task 'capitals': its train pool has 30"):
        plan(config, load_tasks(config), n_layers=4)


def test_plan_trains_a_shared_run_once_and_tags_every_experiment_it_serves():
    config = StudyConfig.full(seeds=2)
    tasks = load_tasks(config)
    runs = plan(config, tasks, n_layers=4)
    ids = [spec.id for spec, _ in runs]
    assert len(ids) == len(set(ids))
    tags = {spec.id: experiments for spec, experiments in runs}
    # capitals, rank 8, all layers, the whole pool: the strategy table's LoRA, the rank sweep's r=8,
    # the layer experiment's "all" and the data budget's largest point.
    assert sorted(tags["capitals_lora_s1_r8"]) == ["data_budget", "layers", "rank", "strategies"]
    assert {"capitals_lora_s0_r8_L0-1", "capitals_lora_s0_r8_L2-3"} <= set(ids)
    assert all(f"capitals_{s}_s0" in " ".join(ids) for s in STRATEGIES)
    checked = {spec.id for spec, _ in runs if spec.check_warning}
    assert "source-text_lora_s0_r8" in checked and "capitals_lora_s0_r8" in checked


def test_untied_head_probe_trains_the_head_and_nothing_else():
    tokenizer = load_tokenizer(resolve_base_dir("embedded"))
    model = build_model(PretrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2), tokenizer)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    head = untie_output_head(model)
    assert head is not model.get_input_embeddings().weight and not model.config.tie_word_embeddings
    with torch.no_grad():
        head.add_(1.0)
    assert torch.equal(model.get_input_embeddings().weight, embed_before)


@pytest.mark.slow  # trains the embedded base for real (a few steps of a full fine-tune)
def test_head_only_finetune_leaves_the_body_exactly_as_pretrained(tmp_path):
    base_dir = resolve_base_dir("embedded")
    split = write_split(cipher_task(40), 0, tmp_path, 8)
    recipe = recipe_from_dict(
        {
            "base": str(base_dir),
            "data": str(split.train_path),
            "eval_data": str(split.eval_path),
            "max_steps": 3,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "device": "cpu",
            "max_new_tokens": 4,
            "eval_exact_match": False,
        }
    )
    result = finetune(recipe, "head-only")
    pretrained = load_base(base_dir, dtype=torch.float32, device="cpu")
    trained = dict(result.model.named_parameters())
    for name, p in pretrained.named_parameters():
        assert torch.equal(trained[name], p), f"{name} moved in a head-only run"
    head = result.model.get_output_embeddings().weight
    assert not torch.equal(head, pretrained.get_output_embeddings().weight)
    assert result.trainable_parameters == head.numel()
    assert result.total_parameters == sum(p.numel() for p in pretrained.parameters())
    assert math.isfinite(result.eval.loss) and result.eval.exact_match is None


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer-smoke")
    results = run_study(StudyConfig.smoke(), out, progress=False)
    write_report(results, out)
    return out, results


@pytest.mark.slow
def test_smoke_study_writes_its_report_files(smoke):
    out, results = smoke
    on_disk = json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)
    assert [r["id"] for r in on_disk["runs"]] == [r["id"] for r in results["runs"]]
    for name in PLOTS.values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
    report = (out / "REPORT.md").read_text()
    for heading in (
        "## Targets",
        "## Strategies side by side",
        "## Rank",
        "## Layers",
        "## Data budget",
        "## Forgetting",
        "## Negative transfer",
    ):
        assert heading in report
    for name in PLOTS.values():
        assert f"]({name})" in report
    assert f"{results['base']['source_loss']:.3f}" in report
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"


@pytest.mark.slow
def test_smoke_study_runs_every_strategy_without_failure(smoke):
    _, results = smoke
    s = results["summary"]
    assert s["failures"] == []
    assert set(s["strategies"]["capitals"]) == set(STRATEGIES)
    assert set(s["rank"]) == {"1", "8"}
    assert set(s["layers"]) == {"lower", "upper", "all"}
    assert set(s["data_budget"]) == {"lora", "lora-random-init", "full-random-init"}
    assert all(set(v) == {"4", "30"} for v in s["data_budget"].values())
    assert {c["method"] for c in s["pretrained_vs_random_far_task"]} == {"lora"}
    assert set(s["targets"]) == {"lora_vs_full", "pretrained_vs_random"}


@pytest.mark.slow
def test_smoke_study_numbers_are_sane(smoke):
    _, results = smoke
    s = results["summary"]["strategies"]["capitals"]
    base_params = results["base"]["parameters"]

    def params(x):
        return x["trainable_parameters"]

    assert params(s["zero-shot"]) == 0
    assert params(s["full"]) == params(s["full-random-init"]) == base_params
    assert params(s["lora"]) == params(s["qlora"]) == params(s["lora-random-init"])
    assert params(results["summary"]["rank"]["1"]) * 8 == params(s["lora"])
    layers = results["summary"]["layers"]
    assert params(layers["lower"]) == params(layers["upper"]) == params(layers["all"]) // 2
    tok = load_tokenizer(resolve_base_dir("embedded"))
    assert params(s["head-only"]) == len(tok) * load_base(None, device="cpu").config.hidden_size

    for row in results["runs"]:
        if row["exact_match"] is not None:
            assert 0.0 <= row["exact_match"] <= 1.0
        assert math.isfinite(row["loss"]) and row["loss"] > 0
    zero = s["zero-shot"]["loss"]["mean"]
    for strategy in ("head-only", "lora", "qlora", "full"):
        assert s[strategy]["loss"]["mean"] < zero, f"{strategy} did not lower the held-out loss"
    for row in results["runs"]:
        if row["strategy"] in ("lora-random-init",) and row["task"] == "capitals":
            assert row["loss"] < row["base_loss"]  # trained on top of its own random base
    # Forgetting is scored with the trained weights applied: the base alone is the zero point, and every
    # run that changed the base's weights moves it.
    assert s["zero-shot"]["forgetting"]["mean"] == 0.0
    for strategy in ("head-only", "lora", "qlora", "full"):
        assert s[strategy]["forgetting"]["mean"] != 0.0, strategy


@pytest.mark.slow
def test_negative_transfer_warning_fires_exactly_where_the_adapter_is_worse(smoke):
    _, results = smoke
    w = results["summary"]["warning"]
    assert w["n"] >= 3 and w["agree"] == w["n"]
    assert w["control_runs"] == 1 and w["control_fired"] == 1
    by_task = {c["task"]: c for c in w["checks"]}
    assert by_task["capitals"]["fired"] is False  # the adapter improves on its base
    control = by_task["source-text"]
    assert control["adapter_loss"] > control["base_loss"]
    assert control["source_loss"] > results["base"]["source_loss"]


@pytest.mark.slow
def test_report_is_regenerated_from_results_json_alone(smoke, tmp_path):
    out, _ = smoke
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_bytes((out / "results.json").read_bytes())

    def command(*args):
        return subprocess.run(
            [sys.executable, "-m", "benchmarks.transfer.run", "--report-only", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = command("--out", str(copy))
    assert done.returncode == 0, done.stderr
    assert (copy / "REPORT.md").read_text() == (out / "REPORT.md").read_text()
    missing = command("--out", str(tmp_path / "nothing-here"))
    assert missing.returncode == 1
    assert "error: no results at" in missing.stderr and "Traceback" not in missing.stderr
