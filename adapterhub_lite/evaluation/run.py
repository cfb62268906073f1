"""Evaluating a base model, alone or with an adapter, on a dataset file (`adapterhub eval`)."""

from __future__ import annotations

import json
from pathlib import Path

from adapterhub_lite.base import fingerprint, load_base, load_tokenizer, resolve_base_dir
from adapterhub_lite.data import load_dataset
from adapterhub_lite.errors import BaseModelError, TrainingError
from adapterhub_lite.evaluation.metrics import evaluate, negative_transfer, transfer_gain


def adapter_base_dir(adapter_dir: Path) -> Path | None:
    """The base an adapter was trained on, if its record or config names a directory that exists here."""
    candidates = []
    record = adapter_dir / "training_record.json"
    if record.is_file():
        candidates.append(json.loads(record.read_text()).get("base", {}).get("path"))
    config = adapter_dir / "adapter_config.json"
    if config.is_file():
        candidates.append(json.loads(config.read_text()).get("base_model_name_or_path"))
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def adapter_method(adapter_dir: Path) -> str | None:
    """``lora`` or ``qlora`` as the adapter's training record says (None without a record)."""
    record = adapter_dir / "training_record.json"
    return json.loads(record.read_text()).get("method") if record.is_file() else None


def check_adapter_dir(adapter_dir: Path) -> None:
    """Refuse what is not a PEFT adapter directory, with a hint."""
    if adapter_dir.is_file():
        raise TrainingError(
            f"{adapter_dir} is a file, not an adapter directory",
            hint="unpack or `adapterhub pull` the bundle first; a bundle directory is a PEFT directory",
        )
    if not (adapter_dir / "adapter_config.json").is_file():
        raise TrainingError(
            f"{adapter_dir} has no adapter_config.json, so it is not a PEFT adapter directory",
            hint="point --adapter to the output_dir of `adapterhub train` or to a bundle directory",
        )


def check_same_base(adapter_dir: Path, base_dir: Path) -> None:
    """An adapter whose record pins a base fingerprint is refused on any other base."""
    record = adapter_dir / "training_record.json"
    if not record.is_file():
        return
    pinned = json.loads(record.read_text()).get("base", {}).get("fingerprint")
    if pinned and pinned != fingerprint(base_dir):
        raise BaseModelError(
            f"the adapter in {adapter_dir} was trained on base {pinned}, not on {base_dir}",
            hint="pass --base with the directory it was trained on",
        )


def evaluate_file(
    data: str | Path,
    *,
    base: str | Path | None = None,
    adapter: str | Path | None = None,
    format: str = "auto",
    quantization: str | None = None,
    device: str | None = None,
    max_seq_len: int = 512,
    max_new_tokens: int = 16,
    exact_match: bool | None = None,
    with_predictions: bool = False,
) -> dict:
    """Metrics of the base (and of base + adapter, with the transfer gain) on every example of a file.

    ``quantization=None`` loads the base as the adapter was trained (4-bit NF4 for a QLoRA adapter).
    """
    from peft import PeftModel

    dataset = load_dataset(data, format)  # type: ignore[arg-type]
    adapter_dir = Path(adapter) if adapter is not None else None
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir)
    if base is None and adapter_dir is not None:
        base = adapter_base_dir(adapter_dir)
    base_dir = resolve_base_dir(base)
    if adapter_dir is not None:
        check_same_base(adapter_dir, base_dir)
    if quantization is None:
        quantization = "nf4" if adapter_dir is not None and adapter_method(adapter_dir) == "qlora" else "none"
    tokenizer = load_tokenizer(base_dir)
    model = load_base(base_dir, quantization=quantization, device=device)  # type: ignore[arg-type]
    kwargs = dict(max_seq_len=max_seq_len, max_new_tokens=max_new_tokens, exact_match=exact_match)
    report: dict = {
        "data": {
            "path": str(dataset.path),
            "format": dataset.format,
            "digest": dataset.digest,
            "examples": len(dataset),
        },
        "base": {"path": str(base_dir), "fingerprint": fingerprint(base_dir), "quantization": quantization},
        "adapter": None,
    }
    if adapter_dir is None:
        result = evaluate(model, tokenizer, dataset.examples, **kwargs)
        report["metrics"] = {"base": result.to_dict(with_predictions=with_predictions)}
        return report
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # peft raises several types for a mismatched adapter
        raise TrainingError(f"cannot load the adapter in {adapter_dir} on {base_dir}: {exc}") from exc
    report["adapter"] = {"path": str(adapter_dir)}
    adapted = evaluate(model, tokenizer, dataset.examples, **kwargs)
    with model.disable_adapter():
        alone = evaluate(model, tokenizer, dataset.examples, **kwargs)
    gain = transfer_gain(adapted.metrics(), alone.metrics())
    report["metrics"] = {
        "adapter": adapted.to_dict(with_predictions=with_predictions),
        "base": alone.to_dict(with_predictions=with_predictions),
        "transfer_gain": gain,
    }
    report["negative_transfer"] = bool(negative_transfer(gain))
    return report
