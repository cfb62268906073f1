"""Identifiers are matched whole: `"1.0.0\\n"` and `"ok\\n"` are refused everywhere (issue 20, item 3).

With `re.match` and a pattern ending in `$`, a trailing newline passed every name check: `1.0.0\\n`
packed and published as a second "1.0.0". Two checks: every identifier validator of the code base
refuses a trailing newline (by behaviour), and no regex literal in the code base ends in `$` (Python's
`$` also matches before a final newline), so the bug cannot be written again. pydantic's
`Field(pattern=...)` runs the Rust regex engine, where `$` is the end of the text; that is checked by
behaviour too, on every such pattern found.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path
from typing import Annotated

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field, TypeAdapter, ValidationError

from adapterhub_lite.bundles import naming
from adapterhub_lite.bundles.pack import pack_bundle
from adapterhub_lite.errors import AdapterHubError, ErrorKind

ROOT = Path(__file__).resolve().parent.parent


def _refuses(fn, value) -> bool:
    try:
        fn(value)
    except (AdapterHubError, ValueError):
        return True
    return False


def _license(value: str) -> None:
    # The license is checked before any file is touched: a missing adapter dir is never reached.
    pack_bundle(
        Path("/nonexistent"),
        Path("/nonexistent-out"),
        namespace="a",
        name="b",
        version="1.0.0",
        license=value,
        vllm_check=False,
    )


def _tensor(value: str) -> None:
    from adapterhub_lite.bundles.compat import _lora_modules
    from adapterhub_lite.bundles.tensors import TensorInfo

    problems: list[str] = []
    info = TensorInfo(name=value, dtype="F32", shape=(4, 8))
    _lora_modules([info], "w", problems)
    if problems:
        raise ValueError(problems[0])


def _alias(store):
    def check(value: str) -> None:
        store.set_alias("acme", value, "acme/bot@1.0.0")

    return check


def _alias_target(store):
    def check(value: str) -> None:
        store.set_alias("acme", "bot", value)

    return check


def _recipe(tmp_path):
    from adapterhub_lite.training.recipe import Recipe

    def check(value: str) -> None:
        Recipe(name=value, data=tmp_path / "d.jsonl")

    return check


def _model_field(model, field: str, valid: dict):
    def check(value: str) -> None:
        model.model_validate({**valid, field: value})

    return check


_HEX = "ab" * 32


@pytest.fixture
def validators(tmp_path) -> dict:
    """Each identifier validator of the code base with a value it accepts."""
    from adapterhub_lite.bundles.manifest import BaseRef, FileEntry
    from adapterhub_lite.tenants.store import TenantStore, is_full_ref

    store = TenantStore.open(tmp_path / "t.db")
    store.add_tenant("acme")

    def full_ref(value: str) -> None:
        if not is_full_ref(value):
            raise ValueError(value)

    return {
        "name": (naming.check_name, "support-bot"),
        "namespace": (lambda v: naming.check_name(v, "namespace"), "acme"),
        "version": (naming.check_version, "1.0.0"),
        "prerelease": (naming.check_version, "2.1.0-rc.1"),
        "tag": (naming.check_tag, "support"),
        "ref": (naming.parse_ref, "acme/bot@1.0.0"),
        "package ref": (naming.parse_ref, "acme/bot"),
        "semver key": (naming.semver_key, "1.0.0"),
        "license": (_license, "apache-2.0"),
        "tensor name": (_tensor, "base_model.model.layers.0.q_proj.lora_A.weight"),
        "alias": (_alias(store), "bot"),
        "alias target": (_alias_target(store), "acme/bot@1.0.0"),
        "full ref": (full_ref, "acme/bot@1.0.0"),
        "recipe name": (_recipe(tmp_path), "my-adapter"),
        "manifest file path": (_model_field(FileEntry, "path", {"size": 1, "sha256": _HEX}), "adapter.bin"),
        "manifest sha256": (_model_field(FileEntry, "sha256", {"size": 1, "path": "a"}), _HEX),
        "base fingerprint": (_model_field(BaseRef, "fingerprint", {"name": "b"}), "sha256:" + _HEX),
    }


_VALIDATORS = [
    "name",
    "namespace",
    "version",
    "prerelease",
    "tag",
    "ref",
    "package ref",
    "semver key",
    "license",
    "tensor name",
    "alias",
    "alias target",
    "full ref",
    "recipe name",
    "manifest file path",
    "manifest sha256",
    "base fingerprint",
]


@pytest.mark.parametrize("which", _VALIDATORS)
def test_every_identifier_validator_refuses_a_trailing_newline(validators, which):
    check, valid = validators[which]
    if which == "license":
        with pytest.raises(AdapterHubError, match="adapter directory not found"):
            check(valid)  # passed the license check, stopped at the (missing) directory
    else:
        assert not _refuses(check, valid), f"{which}: {valid!r} should be accepted"
    for bad in (valid + "\n", "ok\n", valid + "\r\n"):
        if which == "license":
            with pytest.raises(AdapterHubError, match="invalid license"):
                check(bad)
        else:
            assert _refuses(check, bad), f"{which}: {bad!r} was accepted"


def test_versions_are_ascii_digits_only():
    """`\\d` matches any Unicode digit; int() reads "1\\u0661" as 11: "1.0.1\\u0661" would sort as 1.0.11."""
    with pytest.raises(AdapterHubError, match="invalid version"):
        naming.check_version("1.0.1\u0661")


def _regex_literals() -> list[tuple[str, int, str, str]]:
    """(file, line, how it is used, pattern) of every regex literal in the code base."""
    found = []
    for path in sorted([*(ROOT / "adapterhub_lite").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id == "re":
                if fn.attr in ("compile", "match", "fullmatch", "search") and node.args:
                    found.append((rel, node.lineno, "re", node.args[0]))
            for kw in node.keywords:
                if kw.arg == "pattern":
                    found.append((rel, node.lineno, "pydantic", kw.value))
    out = []
    for rel, line, how, arg in found:
        # Literals, and module constants holding them (`_HEX64`), are resolved; f-strings are skipped.
        text = _literal(arg, ROOT / rel)
        if text is not None:
            out.append((rel, line, how, text))
    return out


def _literal(node: ast.expr, path: Path) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp):  # implicit concatenation is one Constant; `+` is rare
        return None
    if isinstance(node, ast.Name):
        for stmt in ast.parse(path.read_text()).body:
            if isinstance(stmt, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == node.id for t in stmt.targets
            ):
                return _literal(stmt.value, path)
    return None


def _ends_in_dollar(pattern: str) -> bool:
    body = pattern[:-1]
    return pattern.endswith("$") and (len(body) - len(body.rstrip("\\"))) % 2 == 0


def test_the_walk_finds_the_identifier_patterns():
    """Guard on the walk itself: it sees the patterns this file is about."""
    files = {rel for rel, *_ in _regex_literals()}
    assert {
        "adapterhub_lite/bundles/naming.py",
        "adapterhub_lite/tenants/store.py",
        "adapterhub_lite/bundles/pack.py",
        "adapterhub_lite/bundles/manifest.py",
        "adapterhub_lite/training/recipe.py",
    } <= files


def test_no_python_regex_literal_ends_in_dollar():
    """Python's `$` matches before a trailing newline: identifiers use `fullmatch` (or `\\Z`)."""
    offenders = [
        f"{rel}:{line} {text!r}"
        for rel, line, how, text in _regex_literals()
        if how == "re" and _ends_in_dollar(text)
    ]
    assert not offenders, "use re.fullmatch (or \\Z) instead of a trailing $:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "pattern", sorted({text for _, _, how, text in _regex_literals() if how == "pydantic"})
)
def test_every_pydantic_pattern_refuses_a_trailing_newline(pattern):
    """pydantic matches `Field(pattern=...)` with the Rust regex engine, where `$` is the end of text:
    any string the pattern matches whole is accepted, and with a newline appended it is refused."""
    field = TypeAdapter(Annotated[str, Field(pattern=pattern)])

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.from_regex(re.compile(pattern.removeprefix("^").removesuffix("$"), re.ASCII), fullmatch=True))
    def check(value: str) -> None:
        field.validate_python(value)
        for bad in (value + "\n", "ok\n"):
            with pytest.raises(ValidationError):
                field.validate_python(bad)

    check()


def test_a_version_with_a_newline_neither_packs_nor_publishes(lora_dir, tiny_base, tmp_path):
    from adapterhub_lite.bundles.card import render_card
    from adapterhub_lite.bundles.manifest import Manifest
    from adapterhub_lite.registry import open_registry

    with pytest.raises(AdapterHubError, match="invalid version") as e:
        pack_bundle(
            lora_dir,
            tmp_path / "nl",
            namespace="acme",
            name="geo",
            version="1.0.0\n",
            base_dir=tiny_base,
            vllm_check=False,
        )
    assert e.value.kind is ErrorKind.INVALID and not (tmp_path / "nl").exists()

    # A hand-made bundle claiming "1.0.0\n", every hash consistent (an attacker writes its own files).
    bundle = pack_bundle(
        lora_dir,
        tmp_path / "b",
        namespace="acme",
        name="geo",
        version="1.0.0",
        base_dir=tiny_base,
        vllm_check=False,
    )
    original = Manifest.model_validate(json.loads((bundle / "manifest.json").read_bytes()))
    forged = original.model_copy(update={"version": "1.0.0\n"})
    (bundle / "README.md").write_bytes(render_card(forged))
    import hashlib

    files = [
        f.model_copy(
            update={"size": len(d := (bundle / f.path).read_bytes()), "sha256": hashlib.sha256(d).hexdigest()}
        )
        for f in forged.files
    ]
    (bundle / "manifest.json").write_bytes(forged.model_copy(update={"files": files}).to_json())
    (bundle / "signatures.json").unlink(missing_ok=True)
    reg = open_registry(tmp_path / "registry")
    with pytest.raises(AdapterHubError, match="invalid version") as e:
        reg.publish(bundle)
    assert e.value.kind is ErrorKind.INVALID
    assert reg.versions("acme") == []
    shutil.rmtree(bundle)
