"""Recipe validation, overrides and the CLI's clean errors (no model is loaded here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterhub_lite.errors import RecipeError
from adapterhub_lite.examples import EXAMPLES_DIR
from adapterhub_lite.training import Recipe, load_recipe, recipe_from_dict
from cli.main import app

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(EXAMPLES_DIR.glob("*/recipe.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_recipes_are_valid(path):
    r = load_recipe(path)
    assert r.name == path.parent.name
    assert r.data == (path.parent / "data.jsonl").resolve() and r.data.is_file()
    assert r.resolved_output_dir == Path("runs") / r.name


def test_at_least_three_target_tasks_and_one_domain_example():
    names = {p.parent.name for p in EXAMPLES}
    assert {"capitals", "animal-sounds", "antonyms", "ship-log"} <= names


def test_defaults():
    r = recipe_from_dict({"data": "x.jsonl"})
    assert (r.method, r.target_modules, r.layers_to_transform, r.base) == (
        "lora",
        "all-linear",
        None,
        "embedded",
    )


def test_overrides_win_and_none_is_ignored(tmp_path, monkeypatch):
    path = write(tmp_path / "r.yaml", "data: d.jsonl\nrank: 4\nlearning_rate: 1.0e-3\n")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(path, {"rank": 16, "learning_rate": None, "method": "qlora", "output_dir": "out"})
    assert (r.rank, r.learning_rate, r.method) == (16, 1e-3, "qlora")
    assert r.output_dir == tmp_path / "out"
    assert r.name == "r"  # from the file name


def test_layers_are_sorted_and_target_modules_list_accepted():
    r = recipe_from_dict({"data": "x", "layers_to_transform": [3, 1], "target_modules": ["q_proj", "v_proj"]})
    assert r.layers_to_transform == [1, 3] and r.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "dora"}, "method: Input should be 'lora' or 'qlora' (got 'dora')"),
        ({"rank": 0}, "rank: Input should be greater than or equal to 1 (got 0)"),
        ({"learnig_rate": 1}, "learnig_rate: unknown field (did you mean 'learning_rate'?)"),
        ({"eval_fraction": 1.5}, "eval_fraction: Input should be less than 1"),
        ({"eval_fraction": 0.0}, "there would be nothing to evaluate on"),
        ({"layers_to_transform": [-1]}, "layer indices start at 0"),
        ({"layers_to_transform": [1, 1]}, "lists a layer twice"),
        ({"target_modules": []}, "must be 'all-linear' or a non-empty list"),
        ({"batch_size": "eight"}, "batch_size: Input should be a valid integer"),
        ({"name": "../evil"}, "name: String should match pattern"),
    ],
)
def test_invalid_fields_are_named(fields, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"data": "x.jsonl", **fields}, source="r.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("invalid recipe r.yaml")


def test_every_error_at_once_and_missing_data():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"rank": -1, "dropout": 2})
    text = str(err.value)
    assert "data: required field is missing" in text and "rank:" in text and "dropout:" in text


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.yaml", "data: x.jsonl\nrank: [1,\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="a recipe is a mapping of fields, got list"):
        load_recipe(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_recipe_round_trips_through_json():
    r = recipe_from_dict({"data": "/abs/x.jsonl", "rank": 4})
    assert Recipe.model_validate(r.model_dump(mode="json")) == r


def test_cli_reports_recipe_and_dataset_errors_without_traceback(tmp_path):
    runner = CliRunner()
    recipe = write(tmp_path / "r.yaml", "data: d.jsonl\nrank: 0\n")
    res = runner.invoke(app, ["train", str(recipe), "--set", "learnig_rate=1"])
    assert res.exit_code == 65  # INVALID (sysexits EX_DATAERR)
    assert "error: invalid recipe" in res.output and "did you mean 'learning_rate'" in res.output
    assert "Traceback" not in res.output

    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a"}\n')
    res = runner.invoke(app, ["train", str(recipe), "--rank", "2", "--output-dir", str(tmp_path / "out")])
    assert res.exit_code == 65  # INVALID (sysexits EX_DATAERR)
    assert f"error: {tmp_path / 'd.jsonl'}:2: a prompt_completion record without 'completion'" in res.output
    assert not (tmp_path / "out").exists()  # nothing written before the data is known to be good

    res = runner.invoke(app, ["train", str(recipe), "--set", "oops"])
    assert res.exit_code == 65  # INVALID (sysexits EX_DATAERR)
    assert "expected FIELD=VALUE" in res.output and "Traceback" not in res.output
