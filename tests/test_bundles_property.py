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
@given(pos=st.integers(0, 1 << 20), value=st.integers(0, 255))
def test_archive_header_and_padding_flips_are_refused(signed, pos, value):
    """Flips aimed at the bytes a tar reader usually ignores: headers, padding and the trailer."""
    _, src, trusted = signed
    data = src.read_bytes()
    n_blocks = len(data) // 512
    # Header blocks and the final (zero) blocks, not the file contents.
    candidates = [0, n_blocks - 1, n_blocks - 2] + [
        i for i in range(n_blocks) if data[i * 512 + 257 : i * 512 + 262] == b"ustar"
    ]
    block = candidates[pos % len(candidates)]
    offset = block * 512 + value * 2 % 512
    with tempfile.TemporaryDirectory() as td:
        a = Path(td) / "a.tar"
        a.write_bytes(_mutate(data, "flip", offset, value, b""))
        _refused(a, trusted)
