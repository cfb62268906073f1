"""Loading a base model in full precision or 4-bit NF4 (bitsandbytes), and its tokenizer."""

from __future__ import annotations

import json
import warnings
from contextlib import ExitStack
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


def _safetensors_files(path: Path) -> list[Path]:
    """The safetensors files `from_pretrained` would read in ``path`` (single or sharded); [] if none."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return []


def _load_nf4_lean(path: Path, files: list[Path], kwargs: dict):
    """`from_pretrained` in 4-bit over a state dict that reads each tensor (pread) when the loader reaches it.

    transformers memory-maps the whole full-precision file and keeps the mapping until loading ends, so
    every page of it is resident (counted in RSS) at the load peak, some 7x the 4-bit weights. The lazy
    values here are safetensors slices over pread handles (what transformers itself uses on Windows): the
    loader materializes them one at a time (no thread pool when it quantizes on the fly), so the peak is
    the 4-bit model plus about one full-precision tensor.
    """
    from safetensors import safe_open
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:  # not a built-in architecture: let the Auto class resolve it, mmap and all
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    # A state dict excludes a path, so what from_pretrained reads beside the weights is passed in here.
    if (path / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        kwargs = {**kwargs, "generation_config": generation}
    with ExitStack() as stack:
        state_dict = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu", backend="pread"))
            state_dict.update({key: handle.get_slice(key) for key in handle.keys()})
        model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    # from_pretrained(None, ...) leaves "None" where peft reads the base's name from.
    model.config.name_or_path = str(path)
    model.name_or_path = str(path)
    return model


def load_base(
    model_dir: str | Path | None,
    *,
    quantization: Quantization = "none",
    dtype: torch.dtype | None = None,
    device: str | None = None,
):
    """Load a causal LM from a local directory.

    `quantization="nf4"` loads it in 4-bit NF4 with double quantization through bitsandbytes (QLoRA);
    `dtype` is then the compute dtype. Its peak memory while loading is the 4-bit model plus about one
    full-precision tensor, not the whole full-precision file (see `_load_nf4_lean`).
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
            files = _safetensors_files(path) if quantization == "nf4" else []
            if files:
                model = _load_nf4_lean(path, files, kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:
        raise BaseModelError(f"cannot load the base model in {path}: {exc}") from exc
    if quantization == "none":
        model.to(device)
    return model
