"""Property: any mutation of a valid bundle (directory or archive) is refused with BundleError.

Never accepted, and never another exception type. The bundle is signed and the signer is trusted, so
that even removing `signatures.json` is a refused mutation.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterhub_lite.bundles import pack_bundle, verify_bundle
from adapterhub_lite.bundles.signing import generate_key
from adapterhub_lite.errors import BundleError

FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json", "signatures.json"]
SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def signed(lora_dir, tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("signed")
    mp = pytest.MonkeyPatch()
    mp.setenv("ADAPTERHUB_CONFIG_DIR", str(root / "cfg"))
    key = generate_key("prop")
    common = dict(
        namespace="acme",
        name="prop",
        version="1.0.0",
        base_dir=tiny_base,
        signing_key="prop",
        vllm_check=False,
    )
    d = pack_bundle(lora_dir, root / "dir", **common)
    a = pack_bundle(lora_dir, root / "a.tar", archive=True, **common)
    mp.undo()
    trusted = [key.public_key]
    assert verify_bundle(d, trusted_keys=trusted, vllm_check=False)
    assert verify_bundle(a, trusted_keys=trusted, vllm_check=False)
    return d, a, trusted


def _mutate(data: bytes, op: str, pos: int, value: int, extra: bytes) -> bytes:
    if not data:
        return extra or b"\0"
    pos %= len(data)
    if op == "flip":
        return data[:pos] + bytes([data[pos] ^ (value % 255 + 1)]) + data[pos + 1 :]
    if op == "truncate":
        return data[:pos]
    if op == "insert":
        return data[:pos] + (extra or b"\0") + data[pos:]
    if op == "delete":
        return data[:pos] + data[pos + 1 :]
    return data + (extra or b"\0")  # append


OPS = st.sampled_from(["flip", "truncate", "insert", "delete", "append"])


def _refused(path: Path, trusted) -> None:
    try:
        verify_bundle(path, trusted_keys=trusted, vllm_check=False)
    except BundleError:
        return
    raise AssertionError(f"a mutated bundle was accepted: {path}")


@SETTINGS
@given(
    target=st.sampled_from(FILES + ["<remove>", "<add>"]),
    victim=st.sampled_from(FILES),
    op=OPS,
    pos=st.integers(0, 1 << 20),
    value=st.integers(0, 255),
    extra=st.binary(max_size=64),
)
def test_directory_mutations_are_refused(signed, target, victim, op, pos, value, extra):
    src, _, trusted = signed
    with tempfile.TemporaryDirectory() as td:
        d = Path(td) / "b"
        shutil.copytree(src, d)
        if target == "<remove>":
            (d / victim).unlink()
        elif target == "<add>":
            (d / ("extra" + str(value) + (".bin" if value % 2 else ".txt"))).write_bytes(extra)
        else:
            f = d / target
            f.write_bytes(_mutate(f.read_bytes(), op, pos, value, extra))
        _refused(d, trusted)


@SETTINGS
@given(op=OPS, pos=st.integers(0, 1 << 20), value=st.integers(0, 255), extra=st.binary(max_size=1024))
def test_archive_mutations_are_refused(signed, op, pos, value, extra):
    _, src, trusted = signed
    with tempfile.TemporaryDirectory() as td:
        a = Path(td) / "a.tar"
        a.write_bytes(_mutate(src.read_bytes(), op, pos, value, extra))
        _refused(a, trusted)


@SETTINGS
@given(pos=st.integers(0, 1 << 20), within=st.integers(0, 511), value=st.integers(0, 255))
def test_archive_header_and_padding_flips_are_refused(signed, pos, within, value):
    """Flips aimed at the bytes a tar reader usually ignores: headers, padding and the trailer. Any
    byte of the block (`within`, odd offsets included) with any non-zero xor (`value`)."""
    _, src, trusted = signed
    data = src.read_bytes()
    n_blocks = len(data) // 512
    # Header blocks and the final (zero) blocks, not the file contents.
    candidates = [0, n_blocks - 1, n_blocks - 2] + [
        i for i in range(n_blocks) if data[i * 512 + 257 : i * 512 + 262] == b"ustar"
    ]
    block = candidates[pos % len(candidates)]
    offset = block * 512 + within
    with tempfile.TemporaryDirectory() as td:
        a = Path(td) / "a.tar"
        a.write_bytes(_mutate(data, "flip", offset, value, b""))
        _refused(a, trusted)


# ------------------------------------------------------------------ hostile JSON in config and header
# JSON values of every type, nested, with unicode and control characters in strings and keys.
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)  # JSON has no Infinity: a refusal of its own
    | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
_NOT_STR_OR_LIST = JSON.filter(
    lambda v: (
        not isinstance(v, str | list) or (isinstance(v, list) and any(not isinstance(x, str) for x in v))
    )
)
# For each field: values that can never be right for this adapter (rank 4 on q_proj and v_proj).
CONFIG_MUTATIONS = {
    "r": JSON.filter(lambda v: not (type(v) is int and v == 4)),
    "peft_type": JSON.filter(lambda v: v != "LORA"),
    "target_modules": _NOT_STR_OR_LIST
    | st.lists(_TEXT.filter(lambda s: not s.isprintable() or not s), min_size=1, max_size=3),
    "rank_pattern": JSON.filter(
        lambda v: (
            v is not None and not (isinstance(v, dict) and all(type(x) is int and x > 0 for x in v.values()))
        )
    ),
    "use_rslora": JSON.filter(lambda v: v is not None and not isinstance(v, bool)),
    "layers_to_transform": JSON.filter(
        lambda v: (
            v is not None
            and type(v) is not int
            and not (isinstance(v, list) and all(type(x) is int for x in v))
        )
    ),
    "lora_alpha": JSON.filter(lambda v: not (type(v) in (int, float) and 0 < v <= 1 << 20)),
}
# What a refusal of each mutated field must say (it names the field, not some later check it tripped).
FIELD_REASONS = {field: rf"adapter_config\.json: {field}\b" for field in CONFIG_MUTATIONS}
# A well-formed rank other than the weights' (r=1) is refused by the rank check, which names `r` too.
FIELD_REASONS["r"] = r"adapter_config\.json: r\b|adapter_config\.json says r=-?\d+ for this module"
TENSOR_FIELDS = ["dtype", "shape", "data_offsets", "<entry>", "<new key>", "<shift>"]


def _refused_unchanged(bundle: Path, reg_dir: Path, reason: str) -> None:
    """Verify and publish both refuse with a one-line project error matching `reason` (a regex: the
    refusal is for the mutated field, not some other check); the registry stays empty."""
    import re

    from adapterhub_lite.errors import AdapterHubError
    from adapterhub_lite.registry import open_registry

    for attempt in (
        lambda: verify_bundle(bundle, vllm_check=False),
        lambda: open_registry(reg_dir).publish(bundle),
    ):
        try:
            attempt()
        except AdapterHubError as exc:
            assert "\n" not in exc.message, exc.message
            assert re.search(reason, exc.message), f"refused for another reason: {exc.message!r}"
        else:
            raise AssertionError(f"a hostile bundle was accepted: {bundle}")
    reg = open_registry(reg_dir)
    assert reg.search() == [] and not [p for p in (reg_dir / "blobs").rglob("*") if p.is_file()]


@pytest.mark.slow  # a registry per example
@pytest.mark.parametrize("field", sorted(CONFIG_MUTATIONS))  # every field's check gets its own examples
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), deep=st.integers(0, 3))
def test_hostile_config_values_are_one_line_refusals(signed, data, field, deep):
    """Each mutated field is refused for itself (the message names it); one example in four is wrapped
    past the JSON depth limit and must be refused for that. Deep values are drawn apart from the
    others so that the depth limit does not answer for most of the field checks."""
    import json

    import bundle_fixtures as fx
    from hypothesis import event

    from adapterhub_lite.bundles.adapter_config import MAX_CONFIG_DEPTH
    from adapterhub_lite.bundles.manifest import json_depth

    src, _, _ = signed
    value = data.draw(CONFIG_MUTATIONS[field])
    if deep == 0:
        for _ in range(MAX_CONFIG_DEPTH):
            value = [value]
    with tempfile.TemporaryDirectory() as td:
        d = Path(td) / "b"
        shutil.copytree(src, d)
        config = {**json.loads((d / "adapter_config.json").read_text()), field: value}
        body = json.dumps(config, ensure_ascii=data.draw(st.booleans())).encode()
        too_deep = json_depth(body) > MAX_CONFIG_DEPTH
        event("depth limit" if too_deep else f"field {field}")
        fx.reseal(d, {"adapter_config.json": body})
        reason = r"JSON nested \d+ levels deep" if too_deep else FIELD_REASONS[field]
        _refused_unchanged(d, Path(td) / "reg", reason)


@pytest.mark.slow  # a registry per example
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), field=st.sampled_from(TENSOR_FIELDS), value=JSON)
def test_hostile_safetensors_header_values_are_one_line_refusals(signed, data, field, value):
    import json

    import bundle_fixtures as fx

    src, _, _ = signed
    with tempfile.TemporaryDirectory() as td:
        d = Path(td) / "b"
        shutil.copytree(src, d)
        raw = (d / "adapter_model.safetensors").read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        reason = r"adapter_model\.safetensors: (tensor |the header describes|safetensors )"
        if field == "<shift>":  # the same size, moved: tensors that overlap or leave a gap
            shift = data.draw(st.integers(-64, 64).filter(bool))
            start, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [max(0, start + shift), max(0, start + shift) + end - start]
            reason = "overlaps another or leaves a gap" if start + shift >= 0 else reason
        elif field == "<entry>":
            header[name] = value
        elif field == "<new key>":
            header[data.draw(_TEXT.filter(lambda k: k not in header))] = value
        else:
            if value == header[name][field]:
                value = [value]
            header[name][field] = value
        fx.reseal(d, {"adapter_model.safetensors": fx.safetensors_bytes(header, raw[8 + n :])})
        _refused_unchanged(d, Path(td) / "reg", reason)


@pytest.mark.parametrize("shift", [1, -1], ids=["gap", "overlap"])
def test_tensors_that_overlap_or_leave_a_gap_are_refused_for_it(signed, tmp_path, shift):
    """The check that the data offsets tile the data section, reached on purpose: the first tensor moved
    one byte on leaves a gap before it, the last moved one byte back overlaps its neighbour. The sizes
    stay right, so no other check answers first."""
    import json

    import bundle_fixtures as fx

    src, _, _ = signed
    d = tmp_path / "b"
    shutil.copytree(src, d)
    raw = (d / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    tensors = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (start, end), name = tensors[0] if shift > 0 else tensors[-1]
    header[name]["data_offsets"] = [start + shift, end + shift]
    fx.reseal(d, {"adapter_model.safetensors": fx.safetensors_bytes(header, raw[8 + n :])})
    _refused_unchanged(d, tmp_path / "reg", rf"tensor '{name}' overlaps another or leaves a gap")
