"""Loading a base model in full precision or 4-bit NF4 (bitsandbytes), and its tokenizer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch

from adapterhub_lite.base.embedded import resolve_base_dir
from adapterhub_lite.errors import BaseModelError

Quantization = Literal["none", "nf4"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_compute_dtype(device: str) -> torch.dtype:
    # bf16 on GPUs that have it; float32 on the CPU (bf16 kernels are slow or missing there).
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(model_dir: str | Path | None):
    """Load the tokenizer of a local base model directory; a pad token is added if the model has none."""
    from transformers import AutoTokenizer

    path = resolve_base_dir(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types here
        raise BaseModelError(f"cannot load the tokenizer in {path}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(
    model_dir: str | Path | None,
    *,
    quantization: Quantization = "none",
    dtype: torch.dtype | None = None,
    device: str | None = None,
):
    """Load a causal LM from a local directory.

    `quantization="nf4"` loads it in 4-bit NF4 with double quantization through bitsandbytes (QLoRA);
    `dtype` is then the compute dtype.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_base_dir(model_dir)
    device = device or default_device()
    dtype = dtype or default_compute_dtype(device)
    kwargs: dict = {"local_files_only": True, "dtype": dtype}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    elif quantization != "none":
        raise BaseModelError(f"unknown quantization {quantization!r}", hint="use 'none' or 'nf4'")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*kernels.*")
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:
        raise BaseModelError(f"cannot load the base model in {path}: {exc}") from exc
    if quantization == "none":
        model.to(device)
    return model
