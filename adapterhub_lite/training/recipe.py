"""The training recipe: one YAML file, every field validated before any model is loaded.

Paths in the file (``data``, ``eval_data``) are relative to the recipe file; ``output_dir`` and paths
given as overrides (CLI flags) are relative to the working directory. Unknown fields are errors, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapterhub_lite.errors import RecipeError

_PATH_FIELDS = ("data", "eval_data")


class Recipe(BaseModel):
    """What to train, on what, and how (see adapters/*/recipe.yaml for annotated examples)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(default="adapter", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base: str = "embedded"
    method: Literal["lora", "qlora"] = "lora"
    # data
    data: Path
    eval_data: Path | None = None
    format: Literal["auto", "prompt_completion", "chat", "alpaca", "sharegpt", "text"] = "auto"
    # Records that cannot be read or checked: an error naming file:line (False), or skipped and reported.
    skip_bad_lines: bool = False
    train_on_prompt: bool = False
    eval_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    max_seq_len: int = Field(default=256, ge=8)
    # Examples longer than max_seq_len (raw text is windowed instead): cut at the right, or left out.
    # Either way they are counted, warned about and recorded.
    overlong: Literal["truncate", "drop"] = "truncate"
    # adapter
    rank: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    layers_to_transform: list[int] | None = None
    # optimisation
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1)
    # Per process: the global batch is batch_size x processes x gradient_accumulation_steps.
    batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    gradient_checkpointing: bool = False
    seed: int = 0
    # hardware
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Return freed tensor memory to the OS at once (glibc): bounded, flat RSS for about 1.6x the time a
    # step on the CPU. None means on for QLoRA on the CPU, where memory is why one picks QLoRA (see
    # allocator.py). It stays on for the rest of the process.
    low_memory: bool | None = None
    # evaluation
    eval_exact_match: Literal["auto"] | bool = "auto"
    max_new_tokens: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=16, ge=1)
    # outputs
    output_dir: Path | None = None
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)

    @field_validator("target_modules")
    @classmethod
    def _modules_not_empty(cls, v):
        if isinstance(v, list) and (not v or any(not m.strip() for m in v)):
            raise ValueError("must be 'all-linear' or a non-empty list of module names")
        return v

    @field_validator("layers_to_transform")
    @classmethod
    def _layers_valid(cls, v):
        if v is not None:
            if not v:
                raise ValueError("must list at least one layer index (or be omitted for all layers)")
            if any(i < 0 for i in v):
                raise ValueError("layer indices start at 0")
            if len(set(v)) != len(v):
                raise ValueError("lists a layer twice")
            v = sorted(v)
        return v

    @model_validator(mode="after")
    def _split_possible(self):
        if self.eval_data is None and self.eval_fraction == 0.0:
            raise ValueError(
                "eval_fraction is 0 and no eval_data is given: there would be nothing to evaluate on"
            )
        return self

    @property
    def resolved_output_dir(self) -> Path:
        return self.output_dir if self.output_dir is not None else Path("runs") / self.name

    def lora_settings(self) -> dict:
        """The fields that define the adapter and its optimisation: a checkpoint must match them.

        ``batch_size`` is not among them: a checkpoint must match the global micro-batch (batch_size x
        processes), which the trainer checks, so a run may continue on another number of processes.
        """
        return self.model_dump(
            mode="json",
            include={
                "base",
                "method",
                "data",
                "format",
                "skip_bad_lines",
                "overlong",
                "train_on_prompt",
                "eval_fraction",
                "max_seq_len",
                "rank",
                "alpha",
                "dropout",
                "target_modules",
                "layers_to_transform",
                "learning_rate",
                "weight_decay",
                "lr_scheduler",
                "warmup_steps",
                "gradient_accumulation_steps",
                "seed",
            },
        )


def _format_errors(exc: ValidationError, source: str) -> RecipeError:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "recipe"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), Recipe.model_fields, n=1)
            msg = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        got = err.get("input")
        shown = (
            ""
            if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict)
            else f" (got {got!r})"
        )
        lines.append(f"{where}: {msg}{shown}")
    fields = ", ".join(sorted(Recipe.model_fields))
    return RecipeError(f"invalid recipe {source}:\n  " + "\n  ".join(lines), hint=f"recipe fields: {fields}")


def recipe_from_dict(data: dict[str, Any], *, source: str = "(dict)") -> Recipe:
    """Validate a recipe given as a mapping; errors name every bad field at once."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise _format_errors(exc, source) from None


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``overrides`` (e.g. CLI flags; None values are ignored) and validate."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of fields, got {type(raw).__name__}")
    for key in _PATH_FIELDS:
        if isinstance(raw.get(key), str) and not Path(raw[key]).expanduser().is_absolute():
            raw[key] = str((path.parent / raw[key]).resolve())
    raw.setdefault("name", path.parent.name if path.stem == "recipe" else path.stem)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in _PATH_FIELDS or key == "output_dir":
            value = str(Path(value).expanduser().resolve())
        raw[key] = value
    return recipe_from_dict(raw, source=str(path))


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def recipe_overrides(flags: dict[str, Any], sets: list[str] | None = None) -> dict[str, Any]:
    """Command-line flags (None: not given) and ``--set FIELD=VALUE`` pairs as recipe overrides.

    ``target_modules`` and ``layers_to_transform`` may be comma-separated strings; ``--set`` values are
    read as YAML (numbers, lists, booleans) and win over the flags.
    """
    out = {k: v for k, v in flags.items() if v is not None}
    target = out.get("target_modules")
    if isinstance(target, str) and target != "all-linear":
        out["target_modules"] = _split_list(target)
    layers = out.get("layers_to_transform")
    if isinstance(layers, str):
        try:
            out["layers_to_transform"] = [int(x) for x in _split_list(layers)]
        except ValueError:
            raise RecipeError(f"--layers {layers!r}: expected comma-separated layer indices") from None
    for pair in sets or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {pair!r}: expected FIELD=VALUE")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise RecipeError(f"--set {pair!r}: the value is not valid YAML") from None
    return out
