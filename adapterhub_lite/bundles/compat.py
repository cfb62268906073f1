"""Can a vLLM multi-LoRA server serve this adapter? Checked at pack time, at verify time, and by the server.

Where vLLM is importable, its own validator (`vllm.lora.peft_helper.PEFTHelper.validate_legal`) is asked
too, so this check cannot let through what the server refuses. Our own rules cover what vLLM does not
check, or checks only when it loads the weights: pickled weights (vLLM 0.32 *accepts* a pickle
`adapter_model.bin`), the tensors actually present (a DoRA magnitude vector or a full `lm_head` copy in the
file even when the config does not say so), ranks read from the tensor shapes, and modules/shapes that the
base model really has.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adapterhub_lite.bundles.tensors import FLOAT_DTYPES, TensorInfo, read_header
from adapterhub_lite.errors import BundleError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1024 * 1024
# vLLM's `--max-lora-rank` takes one of these values (vllm.config.lora.MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

_LORA_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_LORA_EMBED_TENSOR = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$"
)
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out", "word_embeddings", "output")
_RESAVE = "re-save the adapter with `model.save_pretrained(dir)` (safetensors) and pack it again"

# PEFT features that change what the adapter computes and that vLLM does not implement. Mirrors
# `PEFTHelper._validate_features` (vLLM 0.32) so that the check holds where vLLM is not installed.
_UNSUPPORTED_INITS = ("pissa", "olora", "corda", "loftq")


def pickle_files(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))


def refuse_pickles(names: Iterable[str], where: str) -> None:
    """Pickled weights can run code when loaded: refuse them, naming the file."""
    found = pickle_files(names)
    if found:
        raise BundleError(
            f"{where}: {', '.join(found)} is a pickle file; only safetensors weights are accepted "
            "(a pickle can run arbitrary code when it is loaded)",
            hint=f"convert it: `peft.PeftModel.from_pretrained(base, dir).save_pretrained(out)` writes "
            f"{WEIGHTS_FILE}; or load it with `torch.load(path, weights_only=True)` and save it with "
            "`safetensors.torch.save_file`",
        )


def parse_config(data: bytes, label: str = CONFIG_FILE) -> dict[str, Any]:
    """Parse adapter_config.json bytes into a dict, refusing anything that is not a LoRA config."""
    if len(data) > MAX_CONFIG_BYTES:
        raise BundleError(f"{label}: {len(data)} bytes is too large for an adapter config", hint=_RESAVE)
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{label}: not valid JSON ({exc})", hint=_RESAVE) from None
    except RecursionError:
        raise BundleError(f"{label}: JSON nested too deeply", hint=_RESAVE) from None
    if not isinstance(config, dict):
        raise BundleError(f"{label}: not a JSON object", hint=_RESAVE)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise BundleError(
            f"{label}: peft_type is {peft_type!r}; vLLM serves LoRA adapters only",
            hint="train a LoRA adapter (peft.LoraConfig) instead",
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if type(value) not in (int, float) or value <= 0 or (key == "r" and type(value) is not int):
            raise BundleError(f"{label}: {key} must be a positive number, got {value!r}", hint=_RESAVE)
    return config


def _feature_problems(config: dict[str, Any], label: str) -> list[str]:
    problems = []
    if config.get("use_dora"):
        problems.append(
            f"{label}: use_dora is true; vLLM does not serve DoRA adapters "
            "(train with use_dora=False, or merge the adapter into the base instead)"
        )
    if config.get("modules_to_save"):
        problems.append(
            f"{label}: modules_to_save={config['modules_to_save']!r} stores full copies of those modules, "
            "which vLLM multi-LoRA does not serve (train without modules_to_save; for new tokens use a base "
            "that already has them)"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"{label}: LoRA bias terms are not served by vLLM (train with bias='none')")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_UNSUPPORTED_INITS):
        problems.append(
            f"{label}: init_lora_weights={init!r} changes the base weights when loaded; convert it "
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


def _expected_rank(config: dict[str, Any], module: str) -> int:
    for key, value in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return config["r"]


@functools.lru_cache(maxsize=8)
def _base_shapes_cached(base_dir: str, stamp: tuple) -> tuple[dict[str, tuple[int, ...]], bool]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        for t in read_header(f)[0]:
            shapes[t.name] = t.shape
    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    return shapes, bool(config.get("tie_word_embeddings", False))


def base_weight_shapes(base_dir: Path) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Shapes of the base model's weights (from safetensors headers) and whether embeddings are tied."""
    files = sorted(Path(base_dir).glob("*.safetensors"))
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _base_shapes_cached(str(base_dir), stamp)


def _base_weight(module: str, shapes: dict[str, tuple[int, ...]], tied: bool) -> tuple[int, ...] | None:
    candidates = [f"{module}.weight"]
    if module.startswith("model."):
        candidates.append(f"{module[len('model.') :]}.weight")
    if tied and module.split(".")[-1] == "lm_head":
        candidates += [n for n in shapes if n.endswith("embed_tokens.weight")]
    for c in candidates:
        if c in shapes:
            return shapes[c]
    return None


def check_adapter(
    config: dict[str, Any],
    tensors: list[TensorInfo],
    *,
    base_shapes: tuple[dict[str, tuple[int, ...]], bool] | None = None,
    base_label: str = "the base model",
    max_lora_rank: int | None = None,
    vllm_check: bool | None = None,
    config_label: str = CONFIG_FILE,
    weights_label: str = WEIGHTS_FILE,
) -> dict[str, Any]:
    """Check that vLLM can serve the adapter; return its shape for the manifest.

    Raises BundleError listing every problem found, each naming the file or tensor and what to do.
    """
    problems = _feature_problems(config, config_label)
    modules: dict[str, dict[str, TensorInfo]] = {}
    for t in tensors:
        m = _LORA_TENSOR.match(t.name) or _LORA_EMBED_TENSOR.match(t.name)
        where = f"{weights_label}: tensor {t.name!r}"
        if "lora_magnitude_vector" in t.name:
            problems.append(
                f"{where} is a DoRA magnitude vector; vLLM does not serve DoRA (train with use_dora=False)"
            )
        elif m is None:
            leaf = t.name.rsplit(".", 2)[-2] if t.name.count(".") >= 1 else t.name
            if any(e in t.name.split(".") for e in _EMBEDDING_NAMES):
                problems.append(
                    f"{where} is a full copy of {leaf!r} (modules_to_save or trainable tokens); "
                    "vLLM multi-LoRA serves only low-rank weights (train without it)"
                )
            else:
                problems.append(
                    f"{where} is not a LoRA A/B weight; vLLM would refuse it (train a plain LoRA)"
                )
        elif t.dtype not in FLOAT_DTYPES:
            problems.append(f"{where} has dtype {t.dtype}; LoRA weights must be floating point ({_RESAVE})")
        elif len(t.shape) != 2:
            problems.append(f"{where} has shape {list(t.shape)}; LoRA weights are matrices ({_RESAVE})")
        else:
            slot = "A" if m.group("kind").endswith("A") else "B"
            modules.setdefault(m.group("module"), {})[slot] = t
    if not tensors:
        problems.append(f"{weights_label}: holds no tensors ({_RESAVE})")

    ranks: list[int] = []
    shapes, tied = base_shapes if base_shapes else ({}, False)
    for module, pair in sorted(modules.items()):
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            problems.append(f"{weights_label}: module {module!r} has no lora_{missing} tensor ({_RESAVE})")
            continue
        a, b = pair["A"], pair["B"]
        embedding = a.name.endswith("lora_embedding_A")
        rank = a.shape[0]
        if b.shape[1] != rank:
            problems.append(
                f"{weights_label}: tensor {b.name!r} has shape {list(b.shape)}, which does not "
                f"match {a.name!r} {list(a.shape)} (rank {rank})"
            )
            continue
        expected = _expected_rank(config, module)
        if rank != expected:
            problems.append(
                f"{weights_label}: tensor {a.name!r} has rank {rank} but {config_label} says "
                f"r={expected} for this module ({_RESAVE})"
            )
        if max_lora_rank is not None and rank > max_lora_rank:
            problems.append(
                f"{weights_label}: tensor {a.name!r} has rank {rank}, above the server's max_lora_rank "
                f"{max_lora_rank} (retrain with r<={max_lora_rank}, or start vLLM with --max-lora-rank "
                f"{next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), rank)})"
            )
        ranks.append(rank)
        if base_shapes is not None:
            w = _base_weight(module, shapes, tied)
            if w is None:
                problems.append(
                    f"{weights_label}: tensor {a.name!r} targets module {module!r}, which "
                    f"{base_label} does not have (is this adapter for another architecture?)"
                )
            elif len(w) != 2:
                problems.append(
                    f"{weights_label}: tensor {a.name!r} targets {module!r}, which is not a linear "
                    f"or embedding layer in {base_label}"
                )
            else:
                # Linear weight is [out, in]: A is [r, in], B is [out, r]. Embedding is [vocab, dim]:
                # A is [r, vocab], B is [dim, r].
                want_in, want_out = (w[0], w[1]) if embedding else (w[1], w[0])
                if a.shape[1] != want_in or b.shape[0] != want_out:
                    problems.append(
                        f"{weights_label}: tensors of module {module!r} have shapes {list(a.shape)} and "
                        f"{list(b.shape)}, which do not fit its weight {list(w)} in {base_label} "
                        "(the adapter was made for a different base)"
                    )
    if vllm_check is None:
        vllm_check = vllm_available()
    if vllm_check and not problems:
        vllm_problem = vllm_refusal(config, max_lora_rank)
        if vllm_problem:
            problems.append(f"{config_label}: vLLM's own check refuses this adapter: {vllm_problem}")
    if problems:
        lines = "\n  - ".join(problems)
        raise BundleError(
            f"the adapter cannot be served by vLLM multi-LoRA:\n  - {lines}",
            hint="fix each problem listed (each names the file or tensor), then pack again",
        )
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    layers = sorted({int(x.group(1)) for m in modules if (x := _LAYER.search("." + m + "."))})
    return {
        "peft_type": "LORA",
        "rank": max(ranks),
        "alpha": float(config["lora_alpha"]),
        "use_rslora": bool(config.get("use_rslora", False)),
        "target_modules": targets,
        "layers": layers,
        "modules": len(modules),
        "parameter_count": sum(t.numel for t in tensors),
        "dtypes": sorted({t.dtype for t in tensors}),
    }


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_refusal(config: dict[str, Any], max_lora_rank: int | None) -> str | None:
    """vLLM's own verdict on the adapter config: None if it accepts it, else its message."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    # vLLM only takes listed ranks: ask as a server started with the smallest one that allows our limit.
    limit = max_lora_rank or VLLM_MAX_LORA_RANKS[-1]
    server_rank = next((r for r in VLLM_MAX_LORA_RANKS if r >= limit), VLLM_MAX_LORA_RANKS[-1])
    try:
        helper = PEFTHelper.from_dict(dict(config))
        helper.validate_legal(LoRAConfig(max_lora_rank=server_rank))
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None
