"""The model a recipe trains: the base (full precision, or 4-bit NF4 for QLoRA) wrapped in a peft LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adapterhub_lite.base import load_base
from adapterhub_lite.errors import RecipeError
from adapterhub_lite.training.recipe import Recipe


def resolve_device(recipe: Recipe) -> str:
    """``auto`` is CUDA where there is one; asking for CUDA without one is a recipe error."""
    if recipe.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: cuda was asked for but no CUDA GPU is visible", hint="use device: cpu")
    return recipe.device


def resolve_dtype(recipe: Recipe, device: str) -> torch.dtype:
    """The weight dtype (LoRA) or compute dtype (QLoRA): bf16 on a GPU that has it, float32 otherwise."""
    if recipe.precision == "fp32":
        return torch.float32
    if recipe.precision == "bf16" or (device == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers inside the transformer blocks (what peft's "all-linear" picks)."""
    output = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        # Linear4bit subclasses nn.Linear, so this covers QLoRA bases too.
        if isinstance(module, torch.nn.Linear) and module is not output
    }
    return sorted(names)


def _has_conv1d(model) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def lora_config(recipe: Recipe, model=None):
    """The peft LoraConfig of a recipe (``target_modules="all-linear"``: every linear layer but the head)."""
    from peft import LoraConfig

    targets = recipe.target_modules
    if targets == "all-linear" and recipe.layers_to_transform and model is not None:
        # peft refuses layers_to_transform with a string target; spell the linear layers out instead.
        targets = linear_module_names(model)
    return LoraConfig(
        # GPT-2-style Conv1D layers store weights as [in, out]; peft must know (and records it).
        fan_in_fan_out=model is not None and _has_conv1d(model),
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        lora_dropout=recipe.dropout,
        target_modules=targets,
        layers_to_transform=recipe.layers_to_transform,
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_layers(recipe: Recipe, base_dir: Path) -> None:
    """``layers_to_transform`` must name layers the base has (read from its config, before any loading)."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    n_layers = config.get("num_hidden_layers")
    if recipe.layers_to_transform and n_layers is not None and max(recipe.layers_to_transform) >= n_layers:
        raise RecipeError(
            f"layers_to_transform: {recipe.layers_to_transform} but the base has {n_layers} layers "
            f"(indices 0..{n_layers - 1})"
        )


def release_weight_file(model) -> None:
    """Copy the tensors a 4-bit model left as views of the memory-mapped full-precision weights file.

    transformers loads safetensors through mmap; the few tensors it does not quantize (embeddings, norms)
    stay views of that mapping, which keeps every page of the full-precision file resident (counted in
    RSS) for as long as the model lives. Copying them lets the mapping go: the whole point of QLoRA.
    """
    import gc

    import bitsandbytes as bnb

    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if not isinstance(param, bnb.nn.Params4bit):
                    param.data = param.data.clone()
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None:
                    module._buffers[name] = buf.clone()
    gc.collect()


def build_model(recipe: Recipe, base_dir, device: str, dtype: torch.dtype):
    """Load the base as the method asks and add a fresh, trainable LoRA adapter (full-precision weights)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    quantization = "nf4" if recipe.method == "qlora" else "none"
    model = load_base(base_dir, quantization=quantization, dtype=dtype, device=device)
    if recipe.method == "qlora":
        release_weight_file(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.gradient_checkpointing
        )
    elif recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    try:
        # autocast_adapter_dtype keeps the LoRA weights in float32 even over a bf16 or 4-bit base.
        model = get_peft_model(model, lora_config(recipe, model), autocast_adapter_dtype=True)
    except ValueError as exc:  # peft: target modules not found in the base
        raise RecipeError(f"target_modules: {exc}") from exc
    return model
