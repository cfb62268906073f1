"""`adapterhub eval` and the shared metrics, on tiny hand-built cases whose right answers are known."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from adapterhub_lite.base import EMBEDDED_BASE_DIR, load_base, load_tokenizer
from adapterhub_lite.data import generation_case, load_dataset, tokenize_examples
from adapterhub_lite.evaluation import cut_at_stop, evaluate, greedy_answers, token_loss
from adapterhub_lite.examples import EXAMPLES_DIR
from cli.main import app

runner = CliRunner()


def eval_cli(*args: str) -> dict:
    res = runner.invoke(app, ["eval", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base():
    return load_base(None, device="cpu"), load_tokenizer(None)


def test_cut_at_stop():
    assert cut_at_stop(" Paris\nQuestion: x") == " Paris"
    assert cut_at_stop("moo<|end|>\n") == "moo"
    assert cut_at_stop(" Rome</s>", ("</s>",)) == " Rome"
    assert cut_at_stop(" Lima") == " Lima"


def test_loss_is_the_models_own_token_loss_on_the_completion(base, tmp_path):
    model, tok = base
    ds = load_dataset(
        write(tmp_path / "d.jsonl", [{"prompt": "The capital of France is", "completion": " Paris"}])
    )
    (f,) = tokenize_examples(ds.examples, tok, 64)
    loss, n = token_loss(model, [f], tok.pad_token_id)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([f.input_ids]), labels=torch.tensor([f.labels])).loss.item()
    assert n == f.n_trainable == 2  # " Paris" and EOS
    assert loss == pytest.approx(expected, rel=1e-5)
    result = evaluate(model, tok, ds.examples)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_base_that_answers_right_scores_1_and_wrong_scores_0(base, tmp_path):
    model, tok = base
    # The base continues prose it was pretrained on; its own greedy answers are "right" by construction,
    # and answers it cannot give are wrong.
    prompts = ["The capital of France is", "The cow says", "The opposite of hot is", "2 plus 3 is"]
    ids = [
        generation_case(
            load_dataset(write(tmp_path / "p.jsonl", [{"prompt": p, "completion": " x"}])).examples[0], tok
        ).prompt_ids
        for p in prompts
    ]
    answers = greedy_answers(model, tok, ids, max_new_tokens=3)  # it writes on: score 3 tokens
    assert all(a.strip() for a in answers), answers
    right = write(
        tmp_path / "right.jsonl",
        [{"prompt": p, "completion": a} for p, a in zip(prompts, answers, strict=True)],
    )
    wrong = write(tmp_path / "wrong.jsonl", [{"prompt": p, "completion": " zebra crossing"} for p in prompts])
    flags = ("--max-new-tokens", "3", "--exact-match")
    assert eval_cli("--data", str(right), *flags)["metrics"]["base"]["exact_match"] == 1.0
    assert eval_cli("--data", str(wrong), *flags)["metrics"]["base"]["exact_match"] == 0.0


@pytest.mark.slow
def test_adapter_that_answers_right_scores_1_and_wrong_scores_0(capitals_lora, tmp_path):  # noqa: F811
    preds = capitals_lora.record["predictions"]["adapter"]
    rows = {ex.line: ex for ex in load_dataset(EXAMPLES_DIR / "capitals" / "data.jsonl").examples}
    prompts = [rows[p["line"]].prompt for p in preds]
    # The adapter's own held-out answers become the key: it is right on all; the base does not know them.
    right = write(
        tmp_path / "right.jsonl",
        [
            {"prompt": q, "completion": p["got"]}
            for q, p in zip(prompts, preds, strict=True)
            if p["got"].strip()
        ],
    )
    wrong = write(tmp_path / "wrong.jsonl", [{"prompt": q, "completion": " Atlantis"} for q in prompts])
    report = eval_cli("--adapter", str(capitals_lora.output_dir), "--data", str(right))
    assert report["metrics"]["adapter"]["exact_match"] == 1.0
    assert report["metrics"]["base"]["exact_match"] < 1.0
    assert report["metrics"]["transfer_gain"]["exact_match"] > 0 and report["negative_transfer"] is False
    assert report["base"]["path"] == str(EMBEDDED_BASE_DIR.resolve())  # found from the adapter's record
    report = eval_cli("--adapter", str(capitals_lora.output_dir), "--data", str(wrong))
    assert report["metrics"]["adapter"]["exact_match"] == 0.0


@pytest.mark.slow
def test_eval_matches_the_trainers_own_held_out_numbers(capitals_lora, tmp_path):  # noqa: F811
    lines = {p["line"] for p in capitals_lora.record["predictions"]["adapter"]}
    src = (EXAMPLES_DIR / "capitals" / "data.jsonl").read_text().splitlines()
    held = tmp_path / "held.jsonl"
    held.write_text("".join(src[i - 1] + "\n" for i in sorted(lines)))
    report = eval_cli("--adapter", str(capitals_lora.output_dir), "--data", str(held))
    for who in ("adapter", "base"):
        got, want = report["metrics"][who], capitals_lora.record["metrics"][who]
        assert got["exact_match"] == want["exact_match"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_raw_text_has_loss_and_perplexity_but_no_exact_match(tmp_path):
    lines = (EXAMPLES_DIR / "ship-log" / "data.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "data.jsonl").write_text("".join(lines[:8]))  # the format, not the dataset's size, is tested
    report = eval_cli("--data", str(tmp_path / "data.jsonl"))
    m = report["metrics"]["base"]
    assert m["exact_match"] is None and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert report["data"]["format"] == "text" and report["adapter"] is None


@pytest.mark.slow
def test_eval_refuses_what_is_not_an_adapter_or_another_base(capitals_lora, tmp_path):  # noqa: F811
    data = str(EXAMPLES_DIR / "capitals" / "data.jsonl")
    res = runner.invoke(app, ["eval", "--adapter", str(tmp_path), "--data", data])
    assert (
        res.exit_code == 65 and "not a PEFT adapter directory" in res.output and "Traceback" not in res.output
    )
    other = tmp_path / "other-base"
    shutil.copytree(EMBEDDED_BASE_DIR, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(config))
    res = runner.invoke(
        app, ["eval", "--adapter", str(capitals_lora.output_dir), "--base", str(other), "--data", data]
    )
    assert res.exit_code == 65 and "was trained on base sha256:" in res.output
