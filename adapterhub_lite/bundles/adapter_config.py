"""`adapter_config.json`: parsed with bounded size and depth, every field peft or vLLM acts on type-checked.

peft and vLLM read this file with plain `json.load` and then trust its fields: patterns become regular
expressions, `auto_mapping` names a module to import, `megatron_core` another. A field of the wrong type
gives them an AttributeError deep inside a load; here it is a one-line error naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from adapterhub_lite.bundles.manifest import load_json_bounded
from adapterhub_lite.bundles.patterns import check_layers, check_patterns, check_targets
from adapterhub_lite.errors import BundleError

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_DEPTH = 8
RESAVE = "re-save the adapter with `model.save_pretrained(dir)` (safetensors) and pack it again"

# PEFT features that change what the adapter computes and that vLLM does not implement. Mirrors
# `PEFTHelper._validate_features` (vLLM 0.32) so that the check holds where vLLM is not installed.
_UNSUPPORTED_INITS = ("pissa", "olora", "corda", "loftq")
_BOOLS = ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode", "lora_bias", "use_qalora")
_STRINGS = ("base_model_name_or_path", "revision", "task_type", "bias", "peft_version")


def parse_config(data: bytes, label: str = CONFIG_FILE) -> dict[str, Any]:
    """Parse adapter_config.json bytes into a dict, refusing anything that is not a well-typed LoRA config."""
    config = load_json_bounded(
        data, label, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH, hint=RESAVE
    )
    if not isinstance(config, dict):
        raise BundleError(f"{label}: not a JSON object", hint=RESAVE)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise BundleError(
            f"{label}: peft_type is {str(peft_type)[:40]!r}; vLLM serves LoRA adapters only",
            hint="train a LoRA adapter (peft.LoraConfig) instead",
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if (
            type(value) not in (int, float)
            or not math.isfinite(value)
            or value <= 0
            or (key == "r" and type(value) is not int)
            or value > 1 << 20
        ):
            raise BundleError(f"{label}: {key} must be a positive number, got {str(value)[:40]}", hint=RESAVE)
    for key in _BOOLS:
        if config.get(key) is not None and type(config[key]) is not bool:
            raise BundleError(
                f"{label}: {key} must be true or false, got {str(config[key])[:40]}", hint=RESAVE
            )
    for key in _STRINGS:
        if config.get(key) is not None and not (isinstance(config[key], str) and len(config[key]) <= 1024):
            raise BundleError(f"{label}: {key} must be a string of at most 1024 characters", hint=RESAVE)
    dropout = config.get("lora_dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout <= 1:
        raise BundleError(f"{label}: lora_dropout must be a number in [0, 1]", hint=RESAVE)
    check_targets(config.get("target_modules"), f"{label}: target_modules")
    check_targets(config.get("exclude_modules"), f"{label}: exclude_modules", allow_none=True)
    check_patterns(config.get("rank_pattern"), f"{label}: rank_pattern", integer=True)
    check_patterns(config.get("alpha_pattern"), f"{label}: alpha_pattern", integer=False)
    check_layers(config, label)
    _check_imports(config, label)
    return config


def _check_imports(config: dict[str, Any], label: str) -> None:
    """Fields that make peft import a module by name: only transformers' own classes are accepted."""
    mapping = config.get("auto_mapping")
    if mapping is not None:
        parent = mapping.get("parent_library") if isinstance(mapping, dict) else None
        cls = mapping.get("base_model_class") if isinstance(mapping, dict) else None
        if (
            not isinstance(parent, str)
            or not isinstance(cls, str)
            or not (parent == "transformers" or parent.startswith("transformers."))
            or not cls.isidentifier()
        ):
            raise BundleError(
                f"{label}: auto_mapping names a module for peft to import outside transformers "
                f"({str(parent)[:60]!r}); refused",
                hint="remove auto_mapping from the config (peft does not need it to load a LoRA adapter)",
            )
    if config.get("megatron_config") or config.get("megatron_core") not in (None, "megatron.core"):
        raise BundleError(
            f"{label}: megatron_config/megatron_core are set; vLLM does not serve Megatron LoRA layers "
            "and peft would import the module named there",
            hint="remove them and save the adapter from a plain transformers model",
        )


def feature_problems(config: dict[str, Any], label: str) -> list[str]:
    """PEFT features in the config that vLLM does not serve (each a message naming the field)."""
    problems = []
    if config.get("use_dora"):
        problems.append(
            f"{label}: use_dora is true; vLLM does not serve DoRA adapters "
            "(train with use_dora=False, or merge the adapter into the base instead)"
        )
    if config.get("modules_to_save"):
        problems.append(
            f"{label}: modules_to_save={str(config['modules_to_save'])[:80]} stores full copies of those "
            "modules, which vLLM multi-LoRA does not serve (train without modules_to_save; for new tokens "
            "use a base that already has them)"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"{label}: LoRA bias terms are not served by vLLM (train with bias='none')")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_UNSUPPORTED_INITS):
        problems.append(
            f"{label}: init_lora_weights={init[:40]!r} changes the base weights when loaded; convert it "
            "to a plain LoRA with PEFT's path_initial_model_for_weight_conversion"
        )
    for key, what in (
        ("alora_invocation_tokens", "Activated LoRA (aLoRA)"),
        ("layer_replication", "layer_replication"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("use_qalora", "QALoRA"),
        ("trainable_token_indices", "trainable tokens"),
    ):
        if config.get(key):
            problems.append(f"{label}: {key} is set; vLLM does not serve {what}")
    return problems
