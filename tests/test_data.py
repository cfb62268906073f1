"""Dataset formats, loss masks, the split and the file:line errors (tokenizer of the embedded base)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub_lite.base import load_tokenizer
from adapterhub_lite.data import (
    IGNORE_INDEX,
    collate,
    generation_case,
    load_dataset,
    tokenize_example,
    tokenize_examples,
    train_eval_split,
)
from adapterhub_lite.errors import DatasetError
from adapterhub_lite.examples import EXAMPLES_DIR

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def write(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_text(tok, feats) -> str:
    return tok.decode([t for t in feats.labels if t != IGNORE_INDEX], skip_special_tokens=False)


def test_prompt_completion_loss_only_on_completion_and_eos(tok, tmp_path):
    ds = load_dataset(
        write(tmp_path / "d.jsonl", {"prompt": "Question: Where?\nAnswer:", "completion": " Paris"})
    )
    assert ds.format == "prompt_completion"
    (f,) = tokenize_example(ds.examples[0], tok, 64)
    assert f.input_ids[0] == tok.bos_token_id and f.input_ids[-1] == tok.eos_token_id
    assert trained_text(tok, f) == " Paris" + tok.eos_token
    # Every prompt token (and BOS) is masked; the ids are the prompt's own encoding followed by the answer's.
    case = generation_case(ds.examples[0], tok)
    assert f.input_ids[: len(case.prompt_ids)] == case.prompt_ids
    assert all(x == IGNORE_INDEX for x in f.labels[: len(case.prompt_ids)])


def test_chat_loss_only_on_assistant_replies(tok, tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "What does the cow say?"},
            {"role": "assistant", "content": "moo"},
            {"role": "user", "content": "And the dog?"},
            {"role": "assistant", "content": "woof"},
        ]
    }
    ds = load_dataset(write(tmp_path / "c.jsonl", row))
    (f,) = tokenize_example(ds.examples[0], tok, 128)
    assert trained_text(tok, f) == "moo<|end|>\nwoof<|end|>\n"
    full = tok.decode(f.input_ids, skip_special_tokens=False)
    assert full == tok.bos_token + tok.apply_chat_template(row["messages"], tokenize=False)
    case = generation_case(ds.examples[0], tok)
    assert case.answer == "woof"
    assert tok.decode(case.prompt_ids, skip_special_tokens=False).endswith(
        "And the dog?<|end|>\n<|assistant|>\n"
    )


def test_train_on_prompt_trains_every_token_but_bos(tok, tmp_path):
    ds = load_dataset(write(tmp_path / "d.jsonl", {"prompt": "a b", "completion": " c"}))
    (f,) = tokenize_example(ds.examples[0], tok, 64, train_on_prompt=True)
    assert f.labels[0] == IGNORE_INDEX and f.labels[1:] == f.input_ids[1:]


def test_raw_text_is_windowed_and_fully_trained(tok, tmp_path):
    text = " ".join(["The capital of France is Paris."] * 20)
    ds = load_dataset(write(tmp_path / "t.jsonl", {"text": text}))
    feats = tokenize_example(ds.examples[0], tok, 32)
    assert len(feats) > 1 and all(len(f.input_ids) <= 32 for f in feats)
    assert all(f.labels == f.input_ids for f in feats[1:])
    assert sum(len(f.input_ids) for f in feats) == len(tok.encode(text, add_special_tokens=False)) + 2
    assert generation_case(ds.examples[0], tok) is None


def test_too_long_examples_are_dropped_and_all_dropped_is_an_error(tok, tmp_path):
    ds = load_dataset(write(tmp_path / "d.jsonl", {"prompt": "word " * 40, "completion": " x"}))
    assert tokenize_example(ds.examples[0], tok, 16) == []
    with pytest.raises(DatasetError, match="max_seq_len"):
        tokenize_examples(ds.examples, tok, 16)


def test_collate_pads_right_and_masks(tok, tmp_path):
    ds = load_dataset(
        write(
            tmp_path / "d.jsonl",
            {"prompt": "a", "completion": " b"},
            {"prompt": "a b c d", "completion": " e"},
        )
    )
    feats = tokenize_examples(ds.examples, tok, 64)
    batch = collate(feats, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = len(feats[0].input_ids)
    assert batch["attention_mask"][0, short:].sum() == 0
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, short:] == tok.pad_token_id).all()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "3: not valid JSON"),
        ("[1, 2]", "3: expected a JSON object, got list"),
        ('{"question": "x"}', "3: unknown record: keys question"),
        ('{"prompt": "x"}', "3: a prompt_completion record without 'completion'"),
        ('{"prompt": "x", "completion": 5}', "3: 'completion' must be a string, got int"),
        ('{"prompt": "x", "completion": "  "}', "3: 'completion' is empty"),
        ('{"text": "raw"}', "3: a text record in a prompt_completion dataset"),
        ('{"messages": []}', "3: a chat record in a prompt_completion dataset"),
    ],
)
def test_malformed_line_is_reported_as_file_line(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", {"prompt": "a", "completion": " b"}, "", line)
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert str(err.value).startswith(f"{path}:{message}")


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "'messages' must be a non-empty list"),
        ([{"role": "user", "content": "hi"}], "no 'assistant' message"),
        (
            [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}],
            "messages[0]: unknown role",
        ),
        ([{"role": "user"}], "messages[0] must be an object with 'role' and 'content'"),
        ([{"role": "user", "content": 3}], "messages[0]: 'content' must be a string"),
    ],
)
def test_malformed_chat_line(tmp_path, messages, message):
    path = write(tmp_path / "bad.jsonl", {"messages": messages})
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert str(err.value).startswith(f"{path}:1: {message}")


def test_empty_missing_and_binary_files(tmp_path):
    with pytest.raises(DatasetError, match="no examples"):
        load_dataset(write(tmp_path / "empty.jsonl", ""))
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    with pytest.raises(DatasetError, match=r"bin.jsonl:2: not UTF-8"):
        load_dataset(bad)
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_dataset(write(tmp_path / "d.jsonl", {"text": "x"}), "csv")  # type: ignore[arg-type]


def test_split_is_deterministic_disjoint_and_keeps_file_order():
    items = list(range(40))
    train, held = train_eval_split(items, 0.25, seed=0)
    assert (train, held) == train_eval_split(items, 0.25, seed=0)
    assert len(held) == 10 and sorted(train + held) == items and not set(train) & set(held)
    assert train == sorted(train) and held == sorted(held)
    assert train_eval_split(items, 0.25, seed=1)[1] != held
    assert train_eval_split(items, 0.0, seed=0) == (items, [])
    with pytest.raises(DatasetError, match="nothing to train on"):
        train_eval_split([1], 0.5, seed=0)


def test_digest_is_of_the_bytes(tmp_path):
    a = load_dataset(write(tmp_path / "a.jsonl", {"text": "x"}))
    b = load_dataset(write(tmp_path / "b.jsonl", {"text": "x"}))
    c = load_dataset(write(tmp_path / "c.jsonl", {"text": "y"}))
    assert a.digest == b.digest != c.digest and a.digest.startswith("sha256:")


def test_example_datasets_are_what_the_script_generates(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_example_datasets.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("capitals", "animal-sounds", "antonyms", "ship-log"):
        committed = EXAMPLES_DIR / name / "data.jsonl"
        assert (tmp_path / name / "data.jsonl").read_bytes() == committed.read_bytes(), name
        assert len(load_dataset(committed)) >= 30


# --- the data people bring: files read through `datasets`, and the formats of other tools ---------------

ROWS = [{"prompt": "Q: up?\nA:", "completion": " down"}, {"prompt": "Q: hot?\nA:", "completion": " cold"}]


def test_json_array_csv_parquet_and_saved_folder_read_the_same(tmp_path):
    import datasets

    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(ROWS).to_csv(str(tmp_path / "a.csv"), index=False)
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    jsonl = load_dataset(write(tmp_path / "a.jsonl", *ROWS))
    for name in ("a.json", "a.csv", "a.parquet", "saved", "dict"):
        ds = load_dataset(tmp_path / name)
        assert ds.format == "prompt_completion", name
        assert [(e.prompt, e.completion) for e in ds.examples] == [
            (e.prompt, e.completion) for e in jsonl.examples
        ], name
        assert ds.digest.startswith("sha256:")
    assert not list(tmp_path.glob("**/*.arrow-cache*"))


def test_rows_of_each_file_type_are_named_by_line_or_row(tmp_path):
    bad = [*ROWS, {"prompt": "x", "completion": ""}]
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"b.json:\[2\]: 'completion' is empty"):
        load_dataset(tmp_path / "b.json")
    (tmp_path / "b.csv").write_text('prompt,completion\na,b\n"multi\nline",c\nx,\n')
    with pytest.raises(DatasetError, match=r"b.csv:5: a prompt_completion record without 'completion'"):
        load_dataset(tmp_path / "b.csv")
    with pytest.raises(DatasetError, match=r"unknown dataset file type '.txt'") as err:
        load_dataset(write(tmp_path / "d.txt", "hello"))
    assert ".jsonl" in err.value.hint and "save_to_disk" in err.value.hint


def test_alpaca_is_trained_as_a_chat(tok, tmp_path):
    rows = [
        {"instruction": "Give the opposite.", "input": "up", "output": "down"},
        {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be brief."},
    ]
    ds = load_dataset(write(tmp_path / "alpaca.jsonl", *rows))
    assert ds.format == "alpaca"
    assert ds.examples[0].messages == (
        {"role": "user", "content": "Give the opposite.\n\nup"},
        {"role": "assistant", "content": "down"},
    )
    assert ds.examples[1].messages[0] == {"role": "system", "content": "Be brief."}
    (f,) = tokenize_example(ds.examples[0], tok, 128)
    assert trained_text(tok, f) == "down<|end|>\n"
    assert generation_case(ds.examples[1], tok).answer == "hi"


def test_sharegpt_is_trained_as_a_chat_with_its_system(tok, tmp_path):
    row = {
        "system": "You translate.",
        "conversations": [
            {"from": "human", "value": "cat?"},
            {"from": "gpt", "value": "chat"},
            {"from": "human", "value": "dog?"},
            {"from": "gpt", "value": "chien"},
        ],
    }
    ds = load_dataset(write(tmp_path / "sg.jsonl", row))
    assert ds.format == "sharegpt"
    roles = [m["role"] for m in ds.examples[0].messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    (f,) = tokenize_example(ds.examples[0], tok, 256)
    assert trained_text(tok, f) == "chat<|end|>\nchien<|end|>\n"
    with pytest.raises(DatasetError, match=r"1: conversations\[0\]: unknown speaker 'robot'"):
        load_dataset(write(tmp_path / "bad.jsonl", {"conversations": [{"from": "robot", "value": "x"}]}))


def test_openai_messages_with_a_system_message(tok, tmp_path):
    row = {"messages": [{"role": "system", "content": "Short answers."}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}]}  # fmt: skip
    ds = load_dataset(write(tmp_path / "m.jsonl", row))
    (f,) = tokenize_example(ds.examples[0], tok, 128)
    assert trained_text(tok, f) == "4<|end|>\n"
    assert "Short answers." in tok.decode(f.input_ids)


def test_the_format_can_be_named_and_a_mismatch_is_an_error(tmp_path):
    path = write(tmp_path / "d.jsonl", *ROWS)
    assert load_dataset(path, "prompt_completion").format == "prompt_completion"
    with pytest.raises(DatasetError, match="1: a prompt_completion record in a alpaca dataset"):
        load_dataset(path, "alpaca")


def test_unknown_records_hint_at_every_format(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(write(tmp_path / "d.jsonl", {"question": "q", "answer": "a"}))
    for name in ("prompt_completion", "chat", "alpaca", "sharegpt", "text"):
        assert name in err.value.hint


def test_bad_lines_are_skipped_and_reported_when_asked(tmp_path):
    path = write(tmp_path / "d.jsonl", ROWS[0], "{not json", {"prompt": "x", "completion": " "}, ROWS[1])
    with pytest.raises(DatasetError, match=r"d.jsonl:2: not valid JSON") as err:
        load_dataset(path)
    assert "skip_bad_lines" in err.value.hint
    ds = load_dataset(path, skip_bad_lines=True)
    assert [e.line for e in ds.examples] == [1, 4] and ds.n_skipped == 2
    assert ds.skipped[0].startswith(f"{path}:2: not valid JSON") and ds.skipped[1].startswith(f"{path}:3: ")
    with pytest.raises(DatasetError, match="no good examples"):
        load_dataset(write(tmp_path / "all-bad.jsonl", "{x", "{y"), skip_bad_lines=True)


def test_overlong_examples_are_counted_truncated_or_dropped(tok, tmp_path):
    from adapterhub_lite.data import tokenize_dataset

    long = {"prompt": "Q: x", "completion": " " + "answer " * 30}
    ds = load_dataset(write(tmp_path / "d.jsonl", ROWS[0], long, ROWS[1]))
    feats, report = tokenize_dataset(ds.examples, tok, 32)
    assert len(feats) == 3 and max(len(f.input_ids) for f in feats) == 32
    assert (report.truncated, report.dropped, report.lines) == (1, 0, [2])
    assert "1 example(s) longer than max_seq_len=32: 1 truncated, 0 dropped (lines 2)" in report.warning()
    feats, report = tokenize_dataset(ds.examples, tok, 32, overlong="drop")
    assert [f.line for f in feats] == [1, 3] and (report.truncated, report.dropped) == (0, 1)
    assert tokenize_dataset(ds.examples, tok, 256)[1].warning() is None
