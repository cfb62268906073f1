"""Grouped multi-LoRA arithmetic for vLLM's CPU build: rows grouped by adapter once per step, one batched
matrix product per LoRA matrix, never a weight copy per token.

vLLM's CPU punica wrapper uses its PyTorch reference ops (`vllm.lora.ops.torch_ops`), which gather a copy
of the LoRA matrix for every token (`weights[indices]`, tokens x out x rank) and run shrink and expand as
two separate calls per slice, each with its own index expansion. A batch only holds a few distinct
adapters (at most `--max-loras`), so here the rows are grouped by adapter slot once per step
(`group_rows`) and each LoRA layer costs one gather of its input, one `bmm` per matrix and one
`index_add_` of its output (`lora_linear`).

Grouping is by index, never by masking: a row only ever meets its own adapter's weights, so an adapter
whose weights hold NaN or inf cannot touch another row (a masked product would: 0 * NaN is NaN). A
negative slot means "no adapter" (vLLM's documented meaning; its CPU reference gathers `weights[-1]`
instead, i.e. the last slot's adapter): such rows are left exactly as they were.

This module is plain torch; `adapterhub_lite/vllm_compat/lora_ops.py` installs it into vLLM. Measured by
`benchmarks/cpu_lora_ops_bench.py` (per op) and `benchmarks/serving_bench.py` (the server).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapterhub_lite.settings import env_name

ENV_SWITCH = env_name("cpu_lora_ops")
# Many small groups (decode) run as one padded batched product, which computes groups x longest-group
# rows: worth it while the groups are short and the padding small; larger groups (prefill) run as one
# product per group, which needs no padding and no reordering copy.
_MAX_PADDING = 2.0
_MAX_PADDED_GROUP = 32
# A group per slot up to the largest in use while at most this many times the groups in use: reading an
# unused slot's weights in place costs about what copying a used one's costs. When a step uses the same
# slots as the one before, the used slots' weights are gathered instead, and the gathered copy is kept for
# the steps after (adapters scattered over the slots by churn then cost what dense ones do).
_MAX_SPAN = 2
# Prepared-weight rebuilds in this process, [every slot, one slot]: a diagnostic (ADAPTERHUB_LORA_TRACE).
REBUILDS = [0, 0]


@dataclass(frozen=True)
class Grouping:
    """The rows of a batch grouped by adapter slot (rows without an adapter are in no group)."""

    n: int  # rows in the batch
    slots: list[int]  # distinct slots >= 0, ascending
    counts: list[int]  # rows per slot
    rows: torch.Tensor  # rows with an adapter, sorted by slot (stable)
    slot_index: torch.Tensor  # the slots as a tensor (for gathering weights)
    padded: torch.Tensor | None  # (groups, longest) row indices, short groups padded with their own rows
    positions: torch.Tensor | None  # where each of `rows` sits in padded.view(-1)
    span: int | None  # padded has a group per slot 0..span-1 (weights used as a view, no gather)

    @property
    def empty(self) -> bool:
        return not self.slots


def group_rows(indices: torch.Tensor, previous: Grouping | None = None) -> Grouping:
    """Group the rows of a batch by their adapter slot (`indices[i]`, negative: no adapter).

    Short groups (decode) get a padded layout for one batched product per matrix. When the slots in use
    fill most of 0..max slot, that layout has a group for every slot up to the largest, so the stacked
    weights are used as a view: a gather would copy every used adapter's weights in every layer, every
    step, which costs more than the products themselves. Otherwise only the used slots' weights are
    gathered; also when `previous` (the step before) used the same slots, as steady traffic does, since
    the gathered weights are then kept from one step to the next.
    """
    indices = indices.reshape(-1)
    n = int(indices.shape[0])
    rows = torch.nonzero(indices >= 0).reshape(-1)
    if rows.numel() == 0:
        empty = torch.empty(0, dtype=torch.long)
        return Grouping(n, [], [], empty, empty, None, None, 0)
    values = indices[rows]
    order = torch.argsort(values, stable=True)
    rows, values = rows[order], values[order]
    slot_t, count_t = torch.unique_consecutive(values, return_counts=True)
    slots, counts = slot_t.tolist(), count_t.tolist()
    groups, longest, top = len(slots), max(counts), slots[-1] + 1
    padded = positions = span = None
    if groups > 1 and longest <= _MAX_PADDED_GROUP:
        gather = groups * longest <= _MAX_PADDING * len(rows)
        kept = gather and top > groups and previous is not None and previous.slots == slots
        if not kept and top <= _MAX_SPAN * groups and top * longest <= _MAX_PADDING * max(len(rows), top):
            span, layout = top, slot_t
        elif gather:
            span, layout = None, torch.arange(groups)
        else:
            layout = None
        if layout is not None:
            starts = torch.cumsum(count_t, 0) - count_t
            group_of = torch.repeat_interleave(layout, count_t)
            rank_in_group = torch.arange(len(rows)) - torch.repeat_interleave(starts, count_t)
            positions = group_of * longest + rank_in_group
            # Padding rows repeat the batch's first grouped row: computed with their own group's weights,
            # never read back (a slot with no rows here may hold anything, NaN included).
            padded = rows[:1].repeat(len(layout) if span is None else span, longest)
            padded.view(-1)[positions] = rows
    return Grouping(n, slots, counts, rows, slot_t, padded, positions, span)


def _stacked(weights: torch.Tensor) -> torch.Tensor:
    """vLLM's stacked LoRA weights (slots, 1, out, in) or (slots, out, in) as (slots, out, in)."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _for_groups(a: torch.Tensor, b_ts: list[torch.Tensor], g: Grouping) -> tuple[torch.Tensor, list]:
    """The prepared A and B^Ts for the padded layout's groups, (groups, ...): a view of the first `span`
    slots, or the used slots gathered, kept on the first B^T for the next step with the same slots (the
    prepared copy drops it whenever it changes)."""
    if g.span is not None:
        return a[: g.span], [b[: g.span] for b in b_ts]
    kept = getattr(b_ts[0], "_adapterhub_gathered", None)
    if kept is not None and kept[0] == g.slots and kept[1] is a:
        return kept[2], kept[3]
    a_g, b_gs = a.index_select(0, g.slot_index), [b.index_select(0, g.slot_index) for b in b_ts]
    b_ts[0]._adapterhub_gathered = (g.slots, a, a_g, b_gs)
    return a_g, b_gs


def _versions(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]) -> tuple:
    """What identifies the contents of a layer's stacked tensors: each one's storage and write count."""
    return tuple((t._version, t.data_ptr()) for t in (*lora_a, *lora_b))


def note_slot_write(
    lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], slot: int, before: tuple
) -> None:
    """Record that `slot` of a layer's stacked tensors was written, taking them from `before`
    (`_versions` just before the write) to their current versions, so `_prepared` can refresh that slot
    alone. The record chains only while every write is recorded: a write made elsewhere leaves versions
    that match no record, and the next `_prepared` rebuilds every slot."""
    after = _versions(lora_a, lora_b)
    journal = getattr(lora_b[0], "_adapterhub_journal", None)
    if journal is not None and journal[1] == before:
        journal = (journal[0], after, journal[2] | {slot})
    else:
        journal = (before, after, frozenset({slot}))
    lora_b[0]._adapterhub_journal = journal


def _used_rank(a3: Sequence[torch.Tensor]) -> int:
    """The largest rank any slot of `a3` (each (slots, rank, in)) uses: its last row holding anything but
    zero (NaN counts)."""
    used = torch.nonzero(torch.stack([a.ne(0).any(dim=2).any(dim=0) for a in a3]).any(dim=0)).reshape(-1)
    return int(used.max()) + 1 if used.numel() else 1


def _prepared(
    lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], output_slices: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A layer's LoRA pairs as the products want them: every slice's A stacked along the rank,
    (slots, k*r, in), for one shrink; each B transposed, (slots, r, out_i), contiguous (a batched product
    with a transposed view takes a slow path). vLLM pads every adapter to --max-lora-rank with zeros; r
    is cut to the largest rank any slot uses (NaN counts as used), so the columns cut added nothing.

    Cached on the first B until vLLM writes any of the tensors (loading or resetting a slot bumps the
    version counter). When every write since was recorded by `note_slot_write` (vLLM writes one slot
    per adapter activation), only those slots are refreshed: rebuilding all slots costs a copy of every
    slot's weights in every layer, for each adapter that enters a slot."""
    versions = _versions(lora_a, lora_b)
    key = versions + (tuple(output_slices),)
    cached = getattr(lora_b[0], "_adapterhub_prepared", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    a3 = [_stacked(a) for a in lora_a]
    journal = getattr(lora_b[0], "_adapterhub_journal", None)
    lora_b[0]._adapterhub_journal = None
    if (
        cached is not None
        and journal is not None
        and cached[0][:-1] == journal[0]
        and journal[1] == versions
        and cached[0][-1] == key[-1]
    ):
        a_cat, b_ts = cached[1], cached[2]
        rank = b_ts[0].shape[1]
        slots = sorted(journal[2])
        if rank == a3[0].shape[1] or not any(bool(a[s, rank:].any()) for s in slots for a in a3):
            for s in slots:
                if len(a3) > 1:  # one slice: a_cat is a view of vLLM's own tensor, current already
                    a_cat[s] = torch.cat([a[s, :rank] for a in a3], dim=0)
                for b_t, b, size in zip(b_ts, lora_b, output_slices, strict=True):
                    b_t[s] = _stacked(b)[s, :size, :rank].t()
            b_ts[0]._adapterhub_gathered = None  # gathered from the copy before this write
            lora_b[0]._adapterhub_prepared = (key, a_cat, b_ts)
            REBUILDS[1] += 1
            return a_cat, b_ts
    REBUILDS[0] += 1
    rank = _used_rank(a3)
    a_cat = a3[0][:, :rank] if len(a3) == 1 else torch.cat([a[:, :rank] for a in a3], dim=1)
    b_ts = [
        _stacked(b)[:, :size, :rank].transpose(1, 2).contiguous()
        for b, size in zip(lora_b, output_slices, strict=True)
    ]
    lora_b[0]._adapterhub_prepared = (key, a_cat, b_ts)
    return a_cat, b_ts


def _expand(h: torch.Tensor, b_ts: list[torch.Tensor], batched: bool) -> torch.Tensor:
    """Each slice's rank block of `h` times its B^T, side by side along the last dimension."""
    rank = b_ts[0].shape[-2]
    product = torch.bmm if batched else torch.matmul
    outs = [product(h[..., i * rank : (i + 1) * rank], b) for i, b in enumerate(b_ts)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _add_pair(
    y: torch.Tensor, x: torch.Tensor, g: Grouping, a: torch.Tensor, b_ts: list[torch.Tensor], scale: float
) -> None:
    """``y[row] += scale * x[row] @ A[slot].T @ B[slot].T`` for the grouped rows, computed in float32;
    `a` is (slots, k*r, in), `b_ts` k tensors (slots, r, out_i)."""
    x = x.to(dtype=torch.float32)
    a, b_ts = a.to(dtype=torch.float32), [b.to(dtype=torch.float32) for b in b_ts]
    if len(g.slots) == 1 and len(g.rows) == g.n:
        s = g.slots[0]
        h = x @ a[s].t()
        y += _expand(h * scale if scale != 1.0 else h, [b[s] for b in b_ts], batched=False).to(y.dtype)
        return
    if g.padded is not None:
        groups, longest = g.padded.shape
        h = x.index_select(0, g.padded.view(-1)).view(groups, longest, -1)
        a_g, b_gs = _for_groups(a, b_ts, g)
        h = torch.bmm(h, a_g.transpose(1, 2))
        if scale != 1.0:
            h = h * scale
        h = _expand(h, b_gs, batched=True).view(groups * longest, -1)
        y.index_add_(0, g.rows, h.index_select(0, g.positions).to(dtype=y.dtype))
        return
    start = 0
    for s, count in zip(g.slots, g.counts, strict=True):
        rows = g.rows[start : start + count]
        start += count
        h = x.index_select(0, rows) @ a[s].t()
        if scale != 1.0:
            h = h * scale
        y.index_add_(0, rows, _expand(h, [b[s] for b in b_ts], batched=False).to(dtype=y.dtype))


def _single(x: torch.Tensor, g: Grouping, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x[row] @ W[slot].T`` for the grouped rows, in `g.rows` order; `w` is (slots, out, in)."""
    x = x.to(dtype=dtype)
    if len(g.slots) == 1:
        h = x if len(g.rows) == g.n else x.index_select(0, g.rows)
        return h @ w[g.slots[0]].to(dtype=dtype).t()
    chunks = x.index_select(0, g.rows).split(g.counts)
    return torch.cat([h @ w[s].to(dtype=dtype).t() for s, h in zip(g.slots, chunks, strict=True)])


def lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    g: Grouping,
    lora_a_stacked: Sequence[torch.Tensor],
    lora_b_stacked: Sequence[torch.Tensor],
    scale: float,
    output_slices: Sequence[int],
    offset_start: int = 0,
) -> torch.Tensor:
    """``y[:, slice i] += scale * x @ A_i[slot].T @ B_i[slot].T`` for each row with an adapter, in place.

    The semantics of vLLM's ``PunicaWrapperBase.add_lora_linear``: slice i of the output starts at
    ``offset_start + sum(output_slices[:i])``; `x` is (rows, in), `y` (rows, out); A_i is
    (slots, 1, rank, in), B_i (slots, 1, out_i, rank); the rank is padded to vLLM's max rank, and B_i's
    output may be padded too (only the first ``output_slices[i]`` columns count).
    """
    if g.empty:
        return y
    a_cat, b_ts = _prepared(lora_a_stacked, lora_b_stacked, output_slices)
    _add_pair(y[:, offset_start : offset_start + sum(output_slices)], x, g, a_cat, b_ts, scale)
    return y


def lora_products(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype):
    """Row i is ``weights[indices[i]] @ inputs[i]`` in `dtype`, or zeros where ``indices[i] < 0``."""
    g = group_rows(indices)
    w = _stacked(weights)
    out = torch.zeros(inputs.shape[0], w.shape[1], dtype=dtype)
    if not g.empty:
        out.index_copy_(0, g.rows, _single(inputs, g, w, dtype))
    return out


# The reference ops' signatures (vllm.lora.ops.torch_ops), for the paths that still call them one matrix
# at a time (vLLM's sgmv ops call these; so do the logits and embedding LoRA layers).


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # The adapter and the model may pad the output dimension differently.
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


GROUPED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}

