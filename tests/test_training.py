"""Real LoRA and QLoRA training on the embedded base (tiny step counts): learning, reload, resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from adapterhub_lite.base import EMBEDDED_BASE_DIR, fingerprint, load_base, load_tokenizer
from adapterhub_lite.base.world import COUNTRIES
from adapterhub_lite.data import generation_case, load_dataset
from adapterhub_lite.errors import RecipeError, TrainingError
from adapterhub_lite.evaluation import cut_at_stop, greedy_answers
from adapterhub_lite.examples import EXAMPLES_DIR
from adapterhub_lite.training import NegativeTransferWarning, load_recipe, train

pytestmark = pytest.mark.slow

RECORD_KEYS = {
    "schema",
    "tool_version",
    "recipe",
    "method",
    "base",
    "dataset",
    "steps",
    "epochs",
    "metrics",
    "negative_transfer",
    "wall_seconds",
    "peak_rss_mb",
    "tokens_per_second",
    "created",
}


def recipe(task: str, out, **overrides):
    return load_recipe(EXAMPLES_DIR / task / "recipe.yaml", {"output_dir": out, **overrides})


def losses_of(run) -> list[float]:
    ckpt = sorted((run.output_dir / "checkpoints").glob("step-*"))[-1]
    return [loss for _, loss in json.loads((ckpt / "state.json").read_text())["losses"]]


def mean(xs):
    return sum(xs) / len(xs)


def held_out_cases(run):
    tok = load_tokenizer(None)
    lines = {p["line"] for p in run.record["predictions"]["adapter"]}
    examples = [ex for ex in load_dataset(run.record["dataset"]["path"]).examples if ex.line in lines]
    return tok, [generation_case(ex, tok) for ex in examples]


def check_learned_and_transferred(run, method):
    rec = run.record
    assert RECORD_KEYS <= set(rec) and rec["schema"] == 1 and rec["method"] == method
    assert rec["base"]["fingerprint"] == fingerprint(EMBEDDED_BASE_DIR)
    assert rec["dataset"]["digest"].startswith("sha256:") and rec["dataset"]["eval_examples"] == 10
    losses = losses_of(run)
    assert len(losses) == rec["steps"]
    assert mean(losses[-5:]) < 0.5 * mean(losses[:5])  # the loss falls
    adapter, base = rec["metrics"]["adapter"], rec["metrics"]["base"]
    # Held-out capitals, asked in a form the base never saw: the adapter answers more of them.
    assert adapter["exact_match"] > base["exact_match"]
    assert adapter["loss"] < base["loss"] and rec["metrics"]["transfer_gain"]["loss"] > 0
    assert rec["negative_transfer"] is False and rec["warnings"] == []
    for f in ("adapter_config.json", "adapter_model.safetensors", "training_record.json"):
        assert (run.output_dir / f).is_file()
    assert (run.output_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_learns_and_beats_the_base(capitals_lora):  # noqa: F811
    check_learned_and_transferred(capitals_lora, "lora")
    config = json.loads((capitals_lora.output_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    # all-linear: every projection of every layer, never the output head
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_qlora_learns_on_the_4bit_base_and_beats_it(capitals_qlora):  # noqa: F811
    check_learned_and_transferred(capitals_qlora, "qlora")
    # The adapter's own weights are kept in full precision.
    weights = load_file(capitals_qlora.output_dir / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    # QLoRA on the CPU returns freed memory to the OS by default (training/allocator.py).
    assert capitals_qlora.record["low_memory"] is True


def test_low_memory_defaults_to_cpu_qlora_and_can_be_set():
    from adapterhub_lite.training.allocator import low_memory_wanted

    assert low_memory_wanted(None, "qlora", "cpu") and not low_memory_wanted(None, "qlora", "cuda")
    assert not low_memory_wanted(None, "lora", "cpu") and low_memory_wanted(True, "lora", "cpu")
    assert not low_memory_wanted(False, "qlora", "cpu")


def test_saved_adapter_reloads_with_plain_peft_and_answers_the_same(capitals_lora):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok, cases = held_out_cases(capitals_lora)
    model = AutoModelForCausalLM.from_pretrained(str(EMBEDDED_BASE_DIR), local_files_only=True)
    model = PeftModel.from_pretrained(model, str(capitals_lora.output_dir)).eval()
    got = []
    for c in cases:  # plain one-at-a-time generate, no batching or padding
        out = model.generate(
            input_ids=torch.tensor([c.prompt_ids]),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        got.append(cut_at_stop(tok.decode(out[0, len(c.prompt_ids) :], skip_special_tokens=False), ("</s>",)))
    assert got == [p["got"] for p in capitals_lora.record["predictions"]["adapter"]]


def test_qlora_adapter_reloads_on_the_4bit_base(capitals_qlora):  # noqa: F811
    from peft import PeftModel

    tok, cases = held_out_cases(capitals_qlora)
    model = PeftModel.from_pretrained(
        load_base(None, quantization="nf4", device="cpu"), str(capitals_qlora.output_dir)
    )
    got = greedy_answers(model.eval(), tok, [c.prompt_ids for c in cases])
    assert got == [p["got"] for p in capitals_qlora.record["predictions"]["adapter"]]


def test_resume_continues_from_the_saved_step_exactly(tmp_path):
    settings = dict(max_steps=6, checkpoint_every=3, keep_checkpoints=5, dropout=0.1)
    full = train(recipe("antonyms", tmp_path / "full", **settings), progress=False)
    # A run that "crashed" right after its step-3 checkpoint:
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.output_dir / "checkpoints" / "step-000003", crashed / "checkpoints" / "step-000003")
    resumed = train(recipe("antonyms", crashed, **settings), resume=True, progress=False)
    assert losses_of(resumed) == losses_of(full)
    a = load_file(full.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(TrainingError, match=r"other settings: rank: 8 -> 4"):
        train(recipe("antonyms", crashed, **{**settings, "rank": 4}), resume=True, progress=False)
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(recipe("antonyms", crashed, **settings), progress=False)
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(recipe("antonyms", tmp_path / "fresh", **settings), resume=True, progress=False)


def test_negative_transfer_is_loud_and_recorded(tmp_path):
    # The base completes prose it was pretrained on ("The capital of France is" -> " Paris"); an adapter
    # trained on the same prompts with the capitals shuffled answers them wrong: worse than the base.
    facts = COUNTRIES[:8]
    wrong = [(c, facts[(i + 1) % len(facts)][1]) for i, (c, _) in enumerate(facts)]
    for name, pairs in (("wrong.jsonl", wrong), ("right.jsonl", facts)):
        rows = [{"prompt": f"The capital of {c} is", "completion": f" {cap}"} for c, cap in pairs]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = recipe(
        "capitals",
        tmp_path / "bad",
        data=tmp_path / "wrong.jsonl",
        eval_data=tmp_path / "right.jsonl",
        max_steps=30,
        learning_rate=3e-3,
        # The base never stops after the capital (it writes on), so score the first token only.
        eval_exact_match=True,
        max_new_tokens=1,
    )
    with pytest.warns(NegativeTransferWarning, match="NEGATIVE TRANSFER"):
        run = train(r, progress=False)
    m = run.record["metrics"]
    assert m["base"]["exact_match"] >= 0.75 and m["adapter"]["exact_match"] < m["base"]["exact_match"]
    assert run.negative_transfer and run.record["negative_transfer"] is True
    assert any("negative transfer: exact match" in w for w in run.record["warnings"])
    saved = json.loads((run.output_dir / "training_record.json").read_text())
    assert saved["negative_transfer"] is True and saved["metrics"]["transfer_gain"]["exact_match"] < 0


def test_layers_and_target_modules_are_respected(tmp_path):
    r = recipe(
        "antonyms",
        tmp_path / "some",
        max_steps=1,
        layers_to_transform=[0],
        target_modules=["q_proj", "v_proj"],
    )
    run = train(r, progress=False)
    config = json.loads((run.output_dir / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0] and set(config["target_modules"]) == {"q_proj", "v_proj"}
    names = load_file(run.output_dir / "adapter_model.safetensors").keys()
    assert names and all(".layers.0." in n and ("q_proj" in n or "v_proj" in n) for n in names)
    with pytest.raises(RecipeError, match="the base has 4 layers"):
        train(recipe("antonyms", tmp_path / "bad", max_steps=1, layers_to_transform=[7]), progress=False)


def test_layers_with_the_default_all_linear_targets(tmp_path):
    # peft refuses layers_to_transform with target_modules="all-linear"; the trainer spells the layers out.
    r = recipe("antonyms", tmp_path / "upper", max_steps=1, layers_to_transform=[2, 3])
    run = train(r, progress=False)
    config = json.loads((run.output_dir / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }
    names = load_file(run.output_dir / "adapter_model.safetensors").keys()
    assert {n.split(".layers.")[1].split(".")[0] for n in names} == {"2", "3"}


def test_adapters_name_their_base_and_load_with_auto_peft_offline(capitals_lora, capitals_qlora, monkeypatch):  # noqa: E501
    import socket

    from peft import AutoPeftModelForCausalLM

    lookups = []

    def no_network(*args, **kwargs):
        lookups.append(args[:2])
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    # AutoPeftModel resolves the recorded name as a folder: run it where the base's folder is.
    monkeypatch.chdir(EMBEDDED_BASE_DIR.parent)
    tok, cases = held_out_cases(capitals_lora)
    for run in (capitals_lora, capitals_qlora):
        config = json.loads((run.output_dir / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "ahl-tiny-llama" == run.record["base"]["name"]
        model = AutoPeftModelForCausalLM.from_pretrained(str(run.output_dir)).eval()
        if run is capitals_lora:  # the 4-bit adapter on the full-precision base answers differently
            got = greedy_answers(model, tok, [c.prompt_ids for c in cases])
            assert got == [p["got"] for p in run.record["predictions"]["adapter"]]
    assert lookups == []


def test_training_makes_no_network_lookups_and_says_nothing_of_hubs(tmp_path, monkeypatch, capfd):
    import socket

    lookups = []

    def no_network(*args, **kwargs):
        lookups.append(args[:2])
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    r = recipe("antonyms", tmp_path / "q", method="qlora", max_steps=1, max_seq_len=32)
    run = train(r, progress=False)
    assert lookups == []
    assert "fetch" not in capfd.readouterr().err.lower()
    config = json.loads((run.output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "ahl-tiny-llama"


def test_a_failed_run_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    from adapterhub_lite.training import trainer
    from adapterhub_lite.training.checkpoint import list_checkpoints

    real = trainer.optimizer_step

    def fails_at_step_2(*args, **kwargs):
        if args[4] == 1:
            raise TrainingError("injected failure at step 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "optimizer_step", fails_at_step_2)
    with pytest.raises(TrainingError, match="injected"):
        train(recipe("antonyms", tmp_path / "one", max_steps=3, checkpoint_every=1), progress=False)
    assert [c.step for c in list_checkpoints(tmp_path / "one" / "checkpoints")] == [1]
    assert sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir()) == ["step-000001"]
    assert not (tmp_path / "one" / "adapter_model.safetensors").exists()
    # Failing before the first checkpoint leaves nothing at all behind.
    with pytest.raises(TrainingError, match="injected"):
        train(recipe("antonyms", tmp_path / "none", max_steps=3, checkpoint_every=2), progress=False)
    assert not (tmp_path / "none").exists()


def test_training_record_names_formats_skips_and_overlong(tmp_path):
    pairs = [("up", "down"), ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("wet", "dry")] * 3
    rows = [{"instruction": "Opposite of", "input": w, "output": o} for w, o in pairs]
    rows.append({"instruction": "Opposite of", "input": "long " * 60, "output": "short"})
    lines = [json.dumps(r) for r in rows] + ["{broken"]
    (tmp_path / "alpaca.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n")
    r = recipe("antonyms", tmp_path / "a", data=tmp_path / "alpaca.jsonl", eval_data=tmp_path / "held.jsonl",
               max_steps=1, max_seq_len=48, skip_bad_lines=True, overlong="drop")  # fmt: skip
    rec = train(r, progress=False).record
    ds = rec["dataset"]
    assert ds["format"] == "alpaca" and ds["skipped_lines"] == 1
    assert ds["skipped"][0].startswith(f"{tmp_path / 'alpaca.jsonl'}:17: not valid JSON")
    assert ds["overlong"] == {
        "policy": "drop", "max_seq_len": 48, "truncated": 0, "dropped": 1, "lines": [16]
    }  # fmt: skip
    assert any("1 bad record(s) skipped" in w for w in rec["warnings"])
    assert any("longer than max_seq_len=48: 0 truncated, 1 dropped (lines 16)" in w for w in rec["warnings"])
