"""The adapter card (`README.md`): Hugging Face model-card metadata plus the training metrics.

The card is generated from the manifest and nothing else, so verification can regenerate it and compare:
that both keeps the card truthful and makes every field of the manifest tamper-evident (the card's hash
is in the manifest, and the card spells out the rest of the manifest).
"""

from __future__ import annotations

import json
from typing import Any

from adapterhub_lite.bundles.manifest import Manifest

CARD_FILE = "README.md"
CARD_VERSION = 2
CARD_VERSIONS = (2, 1)


def card_matches(card: bytes, manifest: Manifest) -> bool:
    """Whether `card` is the card of `manifest` in any version this tool has written."""
    return any(card == render_card(manifest, card_version=v) for v in CARD_VERSIONS)


def _yaml_str(value: str) -> str:
    # A JSON string is a valid YAML flow scalar, which quotes anything YAML would misread.
    return json.dumps(value, ensure_ascii=False)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metrics_table(training: dict[str, Any]) -> list[str]:
    metrics = training.get("metrics")
    if not isinstance(metrics, dict):
        return ["No metrics were recorded."]
    adapter = metrics.get("adapter") if isinstance(metrics.get("adapter"), dict) else {}
    base = metrics.get("base") if isinstance(metrics.get("base"), dict) else {}
    gain = metrics.get("transfer_gain") if isinstance(metrics.get("transfer_gain"), dict) else {}
    rows = ["| metric | base model | with adapter | transfer gain |", "|---|---|---|---|"]
    for key in ("loss", "perplexity", "exact_match"):
        if key in adapter or key in base:
            rows.append(
                f"| {key} | {_fmt(base.get(key))} | {_fmt(adapter.get(key))} | {_fmt(gain.get(key))} |"
            )
    if training.get("negative_transfer"):
        rows.append("")
        rows.append("**Negative transfer:** the adapter did worse than the base model on the eval split.")
    return rows


def render_card(manifest: Manifest, *, card_version: int = CARD_VERSION) -> bytes:
    """The card's exact bytes for this manifest (deterministic).

    Version 2 adds `base_model_relation: adapter` (so the Hugging Face Hub lists the bundle as an
    adapter of its base); version 1 is what bundles packed before it carry, and still verify with.
    """
    a = manifest.adapter
    tags = ["lora", "adapterhub", *[t for t in manifest.tags if t not in ("lora", "adapterhub")]]
    if card_version >= 2:
        tags = [*tags[:2], "peft", *[t for t in tags[2:] if t != "peft"]]
    lines = [
        "---",
        f"base_model: {_yaml_str(manifest.base.name)}",
        *(["base_model_relation: adapter"] if card_version >= 2 else []),
        "library_name: peft",
        f"license: {_yaml_str(manifest.license)}",
        "pipeline_tag: text-generation",
        "tags:",
        *[f"- {_yaml_str(t)}" for t in tags],
        "---",
        "",
        f"# {manifest.ref}",
        "",
    ]
    if manifest.description:
        lines += [manifest.description, ""]
    lines += [
        f"A LoRA adapter for the base model **{manifest.base.name}** "
        f"(fingerprint `{manifest.base.fingerprint}`); it is refused on any other base.",
        "",
        f"- rank {a.rank}, alpha {_fmt(a.alpha)}{', rsLoRA' if a.use_rslora else ''}",
        f"- target modules: {', '.join(a.target_modules)} ({a.modules} modules"
        + (f", layers {a.layers[0]}-{a.layers[-1]}" if a.layers else "")
        + ")",
        f"- {a.parameter_count:,} parameters ({', '.join(a.dtypes)})",
        "",
        "## Training",
        "",
    ]
    t = manifest.training
    if t is None:
        lines.append("No training record: this adapter was made by another tool and packed as is.")
    else:
        dataset = t.get("dataset") if isinstance(t.get("dataset"), dict) else {}
        lines += [
            f"- method: {_fmt(t.get('method'))}, steps: {_fmt(t.get('steps'))}, "
            f"epochs: {_fmt(t.get('epochs'))}",
            f"- dataset digest: `{_fmt(dataset.get('digest'))}` "
            f"({_fmt(dataset.get('train_examples'))} train / "
            f"{_fmt(dataset.get('eval_examples'))} eval examples)",
            "",
            *_metrics_table(t),
        ]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f"adapterhub pull {manifest.ref}",
        "```",
        "",
        "The bundle directory is a PEFT adapter directory: "
        "`PeftModel.from_pretrained(base_model, bundle_dir)`, or vLLM's `--lora-modules`.",
        "",
        "<details><summary>Bundle metadata</summary>",
        "",
        "```json",
        json.dumps(
            manifest.model_dump(mode="json", exclude={"files"}), sort_keys=True, indent=2, ensure_ascii=False
        ),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines).encode()
