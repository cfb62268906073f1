"""The registry contract (`registry/contract.py`): the local registry and the hub client both answer every
method of `RegistryAPI` with the same parameters (names, kinds, defaults), so a caller typed against
the contract works with either; `open_registry` gives one or the other."""

from __future__ import annotations

import inspect

import pytest

from adapterhub_lite.registry import open_registry
from adapterhub_lite.registry.contract import RegistryAPI
from adapterhub_lite.registry.registry import Registry
from adapterhub_lite.registry.remote import RemoteRegistry

METHODS = sorted(
    name for name, fn in vars(RegistryAPI).items() if inspect.isfunction(fn) and not name.startswith("_")
)


def _params(fn) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_the_contract_names_the_methods_callers_use():
    assert {"resolve", "pull", "publish", "search", "versions", "can_read", "readable"} <= set(METHODS)


@pytest.mark.parametrize("impl", [Registry, RemoteRegistry], ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", METHODS)
def test_each_registry_answers_the_contract_with_its_parameters(impl, method):
    """Every parameter of the contract is accepted by the implementation, by the same name and kind and
    with the same default; an implementation may take more, but only as keywords with defaults."""
    want = _params(getattr(RegistryAPI, method))
    got = {name: (kind, default) for name, kind, default in _params(getattr(impl, method))}
    for name, kind, default in want:
        assert name in got, f"{impl.__name__}.{method} has no parameter {name!r}"
        assert got[name] == (kind, default), f"{impl.__name__}.{method}({name}) differs from the contract"
    extra = [n for n in got if n not in {w[0] for w in want}]
    for name in extra:
        kind, default = got[name]
        assert kind is inspect.Parameter.KEYWORD_ONLY and default is not inspect.Parameter.empty, (
            f"{impl.__name__}.{method}({name}) is not in the contract and not an optional keyword"
        )


def test_open_registry_gives_one_that_satisfies_the_contract(tmp_path):
    local = open_registry(tmp_path / "reg")
    assert isinstance(local, RegistryAPI)
    remote = open_registry("http://127.0.0.1:9")  # nothing is contacted until a method is called
    assert isinstance(remote, RegistryAPI)
