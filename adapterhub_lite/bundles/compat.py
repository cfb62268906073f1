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
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_lite.bundles.adapter_config import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    feature_problems,
    parse_config,
)
from adapterhub_lite.bundles.manifest import load_json_bounded
from adapterhub_lite.bundles.patterns import check_name, pattern_value, targeted
from adapterhub_lite.bundles.tensors import FLOAT_DTYPES, TensorInfo, read_header
from adapterhub_lite.errors import BundleError

__all__ = ["CONFIG_FILE", "MAX_CONFIG_BYTES", "WEIGHTS_FILE", "check_adapter", "parse_config"]

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Architectures whose transformers implementation stores these layers as Conv1D, weight [in, out]
# (peft then saves fan_in_fan_out=true); every other family uses nn.Linear, weight [out, in].
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
MAX_PROBLEMS_SHOWN = 3

_LORA_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight")
_LORA_EMBED_TENSOR = re.compile(
    r"base_model\.model\.(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)"
)
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out", "word_embeddings", "output")
_RESAVE = "re-save the adapter with `model.save_pretrained(dir)` (safetensors) and pack it again"


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


def _expected_rank(config: dict[str, Any], module: str) -> int:
    value = pattern_value(config.get("rank_pattern") or {}, module)
    return config["r"] if value is None else value


@dataclass(frozen=True)
class BaseShapes:
    """What the shape check needs to know about a base: weight shapes, tied embeddings, layer kind."""

    shapes: dict[str, tuple[int, ...]]
    tied: bool = False
    conv1d: bool = False
    architectures: list[str] = field(default_factory=list)
    model_type: str = ""


@functools.lru_cache(maxsize=8)
def _base_shapes_cached(base_dir: str, stamp: tuple) -> BaseShapes:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        for t in read_header(f)[0]:
            shapes[t.name] = t.shape
    config_path = Path(base_dir) / "config.json"
    config = load_json_bounded(
        config_path.read_bytes(), str(config_path), hint="check the base model directory"
    )
    config = config if isinstance(config, dict) else {}
    archs = config.get("architectures")
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else ""
    return BaseShapes(
        shapes,
        tied=bool(config.get("tie_word_embeddings", False)),
        conv1d=model_type in CONV1D_MODEL_TYPES,
        architectures=[a for a in archs if isinstance(a, str)] if isinstance(archs, list) else [],
        model_type=model_type,
    )


def base_weight_shapes(base_dir: Path) -> BaseShapes:
    """Shapes of the base model's weights (from safetensors headers), tied embeddings, Conv1D layers."""
    files = sorted(Path(base_dir).glob("*.safetensors"))
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _base_shapes_cached(str(base_dir), stamp)


def _base_weight(module: str, shapes: dict[str, tuple[int, ...]], tied: bool) -> tuple[int, ...] | None:
    candidates = [f"{module}.weight"]
    if module.startswith("model."):
        candidates.append(f"{module[len('model.') :]}.weight")
    if tied and module.split(".")[-1] in ("lm_head", "embed_out", "output"):
        candidates += [n for n in shapes if n.endswith(("embed_tokens.weight", "wte.weight"))]
    for c in candidates:
        if c in shapes:
            return shapes[c]
    return None


def check_adapter(
    config: dict[str, Any],
    tensors: list[TensorInfo],
    *,
    base_shapes: BaseShapes | None = None,
    base_label: str = "the base model",
    max_lora_rank: int | None = None,
    vllm_check: bool | None = None,
    config_label: str = CONFIG_FILE,
    weights_label: str = WEIGHTS_FILE,
) -> dict[str, Any]:
    """Check that config, tensors and base agree and that vLLM can serve the adapter; return its shape.

    Agreement: every weighted module is one `target_modules` selects (as peft selects them), its rank
    is what `r`/`rank_pattern` say, and with `base_shapes` it exists in the base with matching in/out
    features (Conv1D bases store [in, out]: `fan_in_fan_out`). Raises one BundleError, one line, naming
    the first problems (file or tensor, field, what to do).
    """
    problems = feature_problems(config, config_label)
    modules = _lora_modules(tensors, weights_label, problems)
    ranks: list[int] = []
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    if base_shapes is not None and not problems and fan_in_fan_out != base_shapes.conv1d:
        problems.append(
            f"{config_label}: fan_in_fan_out is {str(fan_in_fan_out).lower()}, but {base_label} "
            f"({base_shapes.model_type or 'unknown type'}) stores its layers as "
            f"{'Conv1D [in, out]' if base_shapes.conv1d else 'Linear [out, in]'} "
            "(made for another architecture?)"
        )
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
        if not targeted(config, module):
            problems.append(
                f"{weights_label}: module {module!r} carries LoRA weights, but {config_label} "
                f"target_modules {_short(config.get('target_modules'))} does not select it "
                "(config and weights disagree)"
            )
            continue
        expected = _expected_rank(config, module)
        if rank != expected:
            problems.append(
                f"{weights_label}: tensor {a.name!r} has rank {rank} but {config_label} says "
                f"r={expected} for this module ({_RESAVE})"
            )
        if max_lora_rank is not None and rank > max_lora_rank:
            from adapterhub_lite.vllm_compat import VLLM_MAX_LORA_RANKS

            problems.append(
                f"{weights_label}: tensor {a.name!r} has rank {rank}, above the server's max_lora_rank "
                f"{max_lora_rank} (retrain with r<={max_lora_rank}, or start vLLM with --max-lora-rank "
                f"{next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), rank)})"
            )
        ranks.append(rank)
        if base_shapes is not None:
            problem = _base_problem(module, a, b, embedding, base_shapes, base_label, weights_label)
            if problem:
                problems.append(problem)
    if vllm_check is None:
        vllm_check = vllm_available()
    if vllm_check and not problems:
        vllm_problem = vllm_refusal(config, max_lora_rank)
        if vllm_problem:
            problems.append(f"{config_label}: vLLM's own check refuses this adapter: {vllm_problem}")
    if problems:
        more = len(problems) - MAX_PROBLEMS_SHOWN
        raise BundleError(
            "the adapter cannot be served by vLLM multi-LoRA: "
            + "; ".join(problems[:MAX_PROBLEMS_SHOWN])
            + (f" (and {more} more)" if more > 0 else ""),
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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _lora_modules(
    tensors: list[TensorInfo], weights_label: str, problems: list[str]
) -> dict[str, dict[str, TensorInfo]]:
    """The LoRA A/B pairs by module; anything that is not a LoRA matrix is a problem."""
    modules: dict[str, dict[str, TensorInfo]] = {}
    for t in tensors:
        m = _LORA_TENSOR.fullmatch(t.name) or _LORA_EMBED_TENSOR.fullmatch(t.name)
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
        elif len(t.shape) != 2 or 0 in t.shape:
            problems.append(
                f"{where} has shape {list(t.shape)}; LoRA weights are non-empty matrices ({_RESAVE})"
            )
        else:
            check_name(m.group("module"), where)
            slot = "A" if m.group("kind").endswith("A") else "B"
            modules.setdefault(m.group("module"), {})[slot] = t
    if not tensors:
        problems.append(f"{weights_label}: holds no tensors ({_RESAVE})")
    return modules


def _base_problem(
    module: str,
    a: TensorInfo,
    b: TensorInfo,
    embedding: bool,
    base: BaseShapes,
    base_label: str,
    weights_label: str,
) -> str | None:
    w = _base_weight(module, base.shapes, base.tied)
    if w is None:
        return (
            f"{weights_label}: tensor {a.name!r} targets module {module!r}, which "
            f"{base_label} does not have (is this adapter for another architecture?)"
        )
    if len(w) != 2:
        return (
            f"{weights_label}: tensor {a.name!r} targets {module!r}, which is not a linear "
            f"or embedding layer in {base_label}"
        )
    # Linear weight is [out, in]: A is [r, in], B is [out, r]. Conv1D (GPT-2) is [in, out]. An
    # embedding is [vocab, dim]: A is [r, vocab], B is [dim, r]. A tied or untied lm_head is Linear.
    leaf = module.rsplit(".", 1)[-1]
    in_first = embedding or (base.conv1d and leaf not in _EMBEDDING_NAMES)
    want_in, want_out = (w[0], w[1]) if in_first else (w[1], w[0])
    if a.shape[1] != want_in or b.shape[0] != want_out:
        return (
            f"{weights_label}: tensors of module {module!r} have shapes {list(a.shape)} and "
            f"{list(b.shape)}, which do not fit its weight {list(w)} in {base_label} "
            f"(expects A [r, {want_in}] and B [{want_out}, r]; the adapter was made for a different base)"
        )
    return None


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_refusal(config: dict[str, Any], max_lora_rank: int | None) -> str | None:
    """vLLM's own verdict on the adapter config: None if it accepts it, else its message (one line)."""
    from adapterhub_lite.vllm_compat import VLLM_MAX_LORA_RANKS
    from adapterhub_lite.vllm_compat.peft import peft_refusal

    # vLLM only takes listed ranks: ask as a server started with the smallest one that allows our limit.
    limit = max_lora_rank or VLLM_MAX_LORA_RANKS[-1]
    server_rank = next((r for r in VLLM_MAX_LORA_RANKS if r >= limit), VLLM_MAX_LORA_RANKS[-1])
    return peft_refusal(config, server_rank)


def serving_problem(base: BaseShapes) -> str | None:
    """Why vLLM would not serve LoRA adapters on this base at all (None: it would, or vLLM cannot say)."""
    from adapterhub_lite.vllm_compat.peft import architecture_lora_support

    if not base.architectures:
        return None
    verdict, reason = architecture_lora_support(base.architectures)
    return reason if verdict is False else None
