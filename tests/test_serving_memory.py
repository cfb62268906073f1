"""The worker's adapter reader (vllm_compat/memory.py): same tensors as safetensors, nothing kept per read,
one-line errors on malformed files; and the probes that measure the worker's memory."""

from __future__ import annotations

import gc
import json
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_lite.vllm_compat.memory import LoraProbe, OwnedSafetensors, mallinfo2, rss_bytes, rss_parts


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.q_proj.lora_A.weight": torch.randn(8, 64, generator=g),
        "layers.0.q_proj.lora_B.weight": torch.randn(64, 8, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, 5, generator=g).to(torch.float16),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),  # a dtype left to safetensors
    }


@pytest.fixture
def st_file(tmp_path: Path) -> Path:
    path = tmp_path / "adapter_model.safetensors"
    save_file(_tensors(), path, metadata={"format": "pt"})
    return path


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def test_reads_the_same_tensors_as_safetensors(st_file):
    expected = load_file(st_file)
    with OwnedSafetensors(st_file, framework="pt") as f:
        assert sorted(f.keys()) == sorted(expected)
        assert f.metadata() == {"format": "pt"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert all(_same(got[k], expected[k]) for k in expected)
    got["layers.0.q_proj.lora_A.weight"][0, 0] = 1e6  # memory of its own: the file is not touched
    assert _same(
        load_file(st_file)["layers.0.q_proj.lora_A.weight"], expected["layers.0.q_proj.lora_A.weight"]
    )


def test_keeps_nothing_after_each_read(st_file):
    """safetensors 0.8's get_tensor keeps two small objects per call for good (about 58 bytes: over
    these 300 reads of 6 tensors, ~100 KiB); this reader must keep none. The bound (8 KiB) leaves room
    for one-time caches inside torch and Python, far below what one leaked object per read would add."""

    def read() -> None:
        with OwnedSafetensors(st_file) as f:
            for k in f.keys():
                if k != "fp8":
                    f.get_tensor(k)

    for _ in range(20):
        read()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            read()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 8 * 1024, f"{grown} bytes kept after 300 reads"


def _entry(shape: object, end: int) -> bytes:
    return json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, end]}}).encode()


def _write_raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize(
    "header,data,what",
    [
        (None, b"", "shorter than its header"),
        (b"{not json", b"", "header is not JSON"),
        (b"[1, 2]", b"", "header is not an object"),
        (
            _entry([4], 8),
            b"\0" * 8,
            "extent",
        ),
        (
            _entry([4], 16),
            b"\0" * 8,
            "extent",
        ),
        (_entry("x", 16), b"", "entry"),
    ],
)
def test_malformed_files_fail_in_one_line_naming_the_file(tmp_path, header, data, what):
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"\x01\x02")
    else:
        _write_raw(path, header, data)
    with pytest.raises(ValueError) as info:
        with OwnedSafetensors(path) as f:
            for k in f.keys():
                f.get_tensor(k)
    message = str(info.value)
    assert str(path) in message and what in message and "\n" not in message


def test_header_length_beyond_the_file_is_refused(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match="header length out of bounds"):
        OwnedSafetensors(path)


def test_unknown_tensor_name_is_a_key_error(st_file):
    with OwnedSafetensors(st_file) as f, pytest.raises(KeyError):
        f.get_tensor("__metadata__")


def test_memory_figures_and_probe_lines(tmp_path):
    info = mallinfo2()
    assert info is None or (info["uordblks"] > 0 and info["arena"] >= info["uordblks"] - info["hblkhd"])
    assert rss_bytes() > 0
    parts = rss_parts()
    assert parts["RssAnon"] > 0 and parts["maps"] > 0
    out = tmp_path / "probe.jsonl"
    probe = LoraProbe(str(out), every=2)
    for op in ("add", "remove", "add", "remove"):
        probe.record(op, 0.001)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [ln["op"] for ln in lines] == ["add", "remove", "add", "remove"]
    assert all(ln["rss"] > 0 and "RssAnon" in ln for ln in lines)
    assert "objects" in lines[1] and "objects_grown" in lines[3]  # every 2nd change: the object census


@pytest.mark.slow  # imports vLLM (seconds)
def test_installs_into_vllms_lora_loader_once():
    from adapterhub_lite.vllm_compat.memory import install_lora_file_reader

    assert install_lora_file_reader() and install_lora_file_reader()
    from vllm.lora import lora_model

    assert lora_model.safetensors.safe_open is OwnedSafetensors
    assert lora_model.safetensors.__version__  # everything else is safetensors' own


@pytest.mark.slow  # imports vLLM (seconds)
def test_engine_probe_records_every_n_requests(tmp_path, monkeypatch):
    from vllm.v1.engine import core

    from adapterhub_lite.vllm_compat.memory import install_engine_probe

    seen = []
    monkeypatch.setattr(core.EngineCore, "add_request", lambda self, request, wave=0: seen.append(request))
    out = tmp_path / "probe.jsonl.engine"
    assert install_engine_probe(str(out), every=3) and install_engine_probe(str(out), every=3)
    for i in range(7):
        core.EngineCore.add_request(None, i)
    assert seen == list(range(7))  # every request still reaches vLLM's method, once
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [ln["requests"] for ln in lines] == [1, 3, 6]  # the first request, then every 3rd
    assert all(ln["op"] == "requests" and ln["rss"] > 0 and "objects" in ln for ln in lines)
    assert "objects_grown" in lines[-1]
