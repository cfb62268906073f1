"""The no-transfer control: a model of the base's exact shape and tokenizer that was never pretrained."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from adapterhub_lite.base import load_tokenizer, resolve_base_dir
from adapterhub_lite.errors import BaseModelError


def build_random_init(base: str | Path | None, out_dir: Path, seed: int) -> Path:
    """Save a randomly initialised copy of ``base`` (same config and tokenizer) to ``out_dir``.

    The architecture's own initialisation (``from_config``) is used rather than the embedded base's
    `build_model`, so the control has the same shape for any Hugging Face causal LM, not only the Llama
    the project pretrains. Written through a temporary directory; an existing ``out_dir`` is reused.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out_dir / "config.json").is_file():
        return out_dir
    base_dir = resolve_base_dir(base)
    try:
        config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    except Exception as exc:
        raise BaseModelError(f"cannot read the model config in {base_dir}: {exc}") from exc
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    load_tokenizer(base_dir).save_pretrained(str(tmp))
    os.replace(tmp, out_dir)
    return out_dir
