"""The house's layers: no import cycles between modules, and imports only point down (README, "Layout").

The graph is built from the source with `ast` (nothing is imported), over `adapterhub_lite/` and `cli/`,
imports inside functions included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower numbers sit lower. A module may import its own package and anything on a lower layer.
LAYERS: dict[str, float] = {
    "adapterhub_lite": 0,  # the package's own __init__ (its version)
    "adapterhub_lite.errors": 0,
    "adapterhub_lite.atomic": 1,
    "adapterhub_lite.display": 1,
    "adapterhub_lite.quiet": 1,
    "adapterhub_lite.settings": 1,
    "adapterhub_lite.keys": 1,
    "adapterhub_lite.stop_signals": 1,
    "adapterhub_lite.db": 2,
    "adapterhub_lite.base": 2,
    "adapterhub_lite.data": 2,
    "adapterhub_lite.examples": 2,
    "adapterhub_lite.kernels": 2,
    "adapterhub_lite.vllm_compat": 3,
    "adapterhub_lite.bundles": 4,
    "adapterhub_lite.evaluation": 4,
    "adapterhub_lite.training": 5,
    "adapterhub_lite.registry": 5,
    "adapterhub_lite.tenants": 5.5,  # answers from the registry (views check refs against it)
    # serving, by the process a module runs in: its config and the operator's rollout operations (6), the
    # plugin inside every vLLM process (6.1), the gateway inside vLLM's API server (6.2), the CLI's
    # supervisor that starts them (6.3)
    "adapterhub_lite.serving": 6,
    "adapterhub_lite.serving.plugin": 6.1,
    "adapterhub_lite.serving.gateway": 6.2,
    "adapterhub_lite.serving.supervisor": 6.3,
    "adapterhub_lite.cluster": 7,
    "adapterhub_lite.hub": 7,
    "adapterhub_lite.demo": 8,
    "cli": 9,
}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for top in ("adapterhub_lite", "cli"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    # `from pkg import submodule` depends on the submodule, not on every name in pkg.
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in mods else source)
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    edges[mod].add(target)
    return edges


def _layer(mod: str) -> tuple[str, float]:
    for depth in (3, 2, 1):
        key = ".".join(mod.split(".")[:depth])
        if key in LAYERS:
            return key, LAYERS[key]
    raise KeyError(mod)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_every_package_has_a_layer():
    missing = sorted({m for m in _modules() if not any(m == k or m.startswith(k + ".") for k in LAYERS)})
    assert not missing, f"add these to LAYERS (and to the README's layout): {missing}"


def test_no_import_cycles():
    assert _cycles(_edges(_modules())) == []


def test_imports_only_point_down():
    upward = []
    for mod, targets in _edges(_modules()).items():
        pkg, rank = _layer(mod)
        for target in targets:
            tpkg, trank = _layer(target)
            if tpkg != pkg and trank >= rank:
                upward.append(f"{mod} -> {target}")
    assert sorted(upward) == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The mechanism itself: a two-module cycle is found, and so is a step up."""
    edges = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(edges) == [["a", "b"]]
    assert _layer("adapterhub_lite.bundles.pack")[1] < _layer("adapterhub_lite.serving.gateway.middleware")[1]


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_name_real_places(layer):
    path = ROOT / Path(*layer.split("."))
    assert path.is_dir() or path.with_suffix(".py").is_file()
