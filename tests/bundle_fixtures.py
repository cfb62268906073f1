"""Tiny real bases and real PEFT adapters for the bundle and registry tests, built once per session.

The bases are random Llamas built with the project's own `build_model`/`train_tokenizer` (so the tests
do not depend on the embedded base being pretrained yet); the adapters are made with plain peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub_lite.base.pretrain import PretrainConfig, build_model, train_tokenizer
from adapterhub_lite.base.world import source_documents

_CACHE: dict[str, Path] = {}


def make_base(root: Path, key: str = "base", hidden: int = 64, seed: int = 0) -> Path:
    """A 2-layer random Llama + tokenizer with a chat template, saved as an HF directory."""
    if key in _CACHE:
        return _CACHE[key]
    out = root / key
    tok = train_tokenizer(list(source_documents(300, seed=1)), vocab_size=400)
    cfg = PretrainConfig(
        vocab_size=400,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
    )
    model = build_model(cfg, tok, seed=seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _CACHE[key] = out
    return out


def make_adapter(base: Path, out: Path, *, safe: bool = True, seed: int = 0, **lora) -> Path:
    """Save a PEFT LoRA adapter for `base` with non-zero B weights (so it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if str(out) in _CACHE:
        return _CACHE[str(out)]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(out, safe_serialization=safe)
    _CACHE[str(out)] = out
    return out


def training_record(base: Path, fingerprint: str) -> dict:
    """A training record shaped like the one `adapterhub train` writes (see the team contract)."""
    return {
        "schema": 1,
        "tool_version": "0.1.0",
        "recipe": {"name": "capitals", "lr": 0.002},
        "method": "lora",
        "base": {"name": "tiny-test-base", "path": str(base), "fingerprint": fingerprint},
        "dataset": {
            "path": "data.jsonl",
            "format": "prompt_completion",
            "digest": "sha256:" + "ab" * 32,
            "train_examples": 90,
            "eval_examples": 10,
        },
        "steps": 30,
        "epochs": 1,
        "metrics": {
            "adapter": {"loss": 0.5, "perplexity": 1.65, "exact_match": 0.8},
            "base": {"loss": 2.5, "perplexity": 12.2, "exact_match": 0.1},
            "transfer_gain": {"loss": 2.0, "exact_match": 0.7},
        },
        "negative_transfer": False,
        "wall_seconds": 12.5,
        "peak_rss_mb": 800.0,
        "tokens_per_second": 900.0,
        "created": "2026-11-26T10:00:00+00:00",
    }


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.getbasetemp() / "bases")


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """Another base with the same architecture but other weights (and so another fingerprint)."""
    return make_base(tmp_path_factory.getbasetemp() / "bases", key="other", seed=1)


@pytest.fixture(scope="session")
def lora_dir(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.getbasetemp() / "adapters" / "plain")


@pytest.fixture(scope="session")
def trained_dir(tiny_base, lora_dir, tmp_path_factory) -> Path:
    """A plain adapter plus a `training_record.json`, as `adapterhub train` leaves it."""
    import shutil

    from adapterhub_lite.base import fingerprint

    out = tmp_path_factory.getbasetemp() / "adapters" / "trained"
    if not out.exists():
        shutil.copytree(lora_dir, out)
        (out / "training_record.json").write_text(
            json.dumps(training_record(tiny_base, fingerprint(tiny_base)))
        )
    return out


def reseal(bundle: Path, files: dict[str, bytes] | None = None, **manifest_changes) -> Path:
    """Rewrite files of a bundle directory and make manifest and card agree with them again.

    This is what an attacker who can write a bundle does: every hash matches, so verification has to
    catch the problem by what the files say, not by a hash.
    """
    import hashlib

    from adapterhub_lite.bundles.card import render_card
    from adapterhub_lite.bundles.manifest import Manifest

    for name, data in (files or {}).items():
        (bundle / name).write_bytes(data)
    raw = json.loads((bundle / "manifest.json").read_text())
    raw.update(manifest_changes)
    (bundle / "README.md").write_bytes(render_card(Manifest.model_validate(raw)))
    raw["files"] = [
        {
            "path": f["path"],
            "size": len(d := (bundle / f["path"]).read_bytes()),
            "sha256": hashlib.sha256(d).hexdigest(),
        }
        for f in raw["files"]
    ]
    (bundle / "manifest.json").write_bytes(Manifest.model_validate(raw).to_json())
    (bundle / "signatures.json").unlink(missing_ok=True)
    return bundle


def safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    """A safetensors file from a header (a dict, or raw JSON bytes for malformed ones) and data."""
    import struct

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data
