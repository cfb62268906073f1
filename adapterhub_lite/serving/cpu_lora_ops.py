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

ENV_SWITCH = "ADAPTERHUB_CPU_LORA_OPS"
# A padded batched product computes groups x longest-group rows; past this multiple of the real rows a
# loop of one product per group is cheaper (prefills of very different lengths).
_MAX_PADDING = 2.0


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
    contiguous: bool  # slots == 0..groups-1: weights can be used as a view, no gather

    @property
    def empty(self) -> bool:
        return not self.slots


def group_rows(indices: torch.Tensor) -> Grouping:
    """Group the rows of a batch by their adapter slot (`indices[i]`, negative: no adapter)."""
    indices = indices.reshape(-1)
    n = int(indices.shape[0])
    rows = torch.nonzero(indices >= 0).reshape(-1)
    if rows.numel() == 0:
        empty = torch.empty(0, dtype=torch.long)
        return Grouping(n, [], [], empty, empty, None, None, True)
    values = indices[rows]
    order = torch.argsort(values, stable=True)
    rows, values = rows[order], values[order]
    slot_t, count_t = torch.unique_consecutive(values, return_counts=True)
    slots, counts = slot_t.tolist(), count_t.tolist()
    contiguous = slots == list(range(len(slots)))
    longest = max(counts)
    padded = positions = None
    if len(slots) > 1 and len(slots) * longest <= _MAX_PADDING * len(rows):
        starts = torch.cumsum(count_t, 0) - count_t
        group_of = torch.repeat_interleave(torch.arange(len(slots)), count_t)
        rank_in_group = torch.arange(len(rows)) - starts[group_of]
        positions = group_of * longest + rank_in_group
        # Padding rows repeat the group's first row: computed, never read back, and only ever with the
        # group's own weights.
        padded = rows[starts].repeat_interleave(longest).view(len(slots), longest).clone()
        padded.view(-1)[positions] = rows
    return Grouping(n, slots, counts, rows, slot_t, padded, positions, contiguous)


def _stacked(weights: torch.Tensor) -> torch.Tensor:
    """vLLM's stacked LoRA weights (slots, 1, out, in) or (slots, out, in) as (slots, out, in)."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _for_groups(weights: torch.Tensor, g: Grouping, dtype: torch.dtype) -> torch.Tensor:
    """The weights of the grouping's slots, (groups, out, in), in `dtype`."""
    w = weights[: len(g.slots)] if g.contiguous else weights.index_select(0, g.slot_index)
    return w.to(dtype=dtype)


def _chain(
    x: torch.Tensor, g: Grouping, matrices: Sequence[torch.Tensor], scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """For the grouped rows (in `g.rows` order): ``scale * x[row] @ M0[slot].T @ M1[slot].T ...``."""
    if len(g.slots) == 1:
        s = g.slots[0]
        h = x if len(g.rows) == g.n else x.index_select(0, g.rows)
        h = h.to(dtype=dtype)
        for i, m in enumerate(matrices):
            h = h @ m[s].to(dtype=dtype).t()
            if i == 0 and scale != 1.0:
                h = h * scale
        return h
    if g.padded is not None:
        h = x.to(dtype=dtype)[g.padded]  # (groups, longest, in)
        for i, m in enumerate(matrices):
            h = torch.bmm(h, _for_groups(m, g, dtype).transpose(1, 2))
            if i == 0 and scale != 1.0:
                h = h * scale
        return h.reshape(-1, h.shape[-1]).index_select(0, g.positions)
    parts = []
    chunks = x.index_select(0, g.rows).to(dtype=dtype).split(g.counts)
    for s, h in zip(g.slots, chunks, strict=True):
        for i, m in enumerate(matrices):
            h = h @ m[s].to(dtype=dtype).t()
            if i == 0 and scale != 1.0:
                h = h * scale
        parts.append(h)
    return torch.cat(parts)


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
    outs = []
    for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
        out = _chain(x, g, (_stacked(a), _stacked(b)), scale, torch.float32)
        outs.append(out[:, :size])
    delta = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    target = y[:, offset_start : offset_start + delta.shape[1]]
    if len(g.rows) == g.n and g.padded is None and len(g.slots) == 1:
        target += delta.to(dtype=y.dtype)
    else:
        target.index_add_(0, g.rows, delta.to(dtype=y.dtype))
    return y


def lora_products(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype):
    """Row i is ``weights[indices[i]] @ inputs[i]`` in `dtype`, or zeros where ``indices[i] < 0``."""
    g = group_rows(indices)
    w = _stacked(weights)
    out = torch.zeros(inputs.shape[0], w.shape[1], dtype=dtype)
    if not g.empty:
        out.index_copy_(0, g.rows, _chain(inputs, g, (w,), 1.0, dtype))
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


def install() -> bool:
    """Install these ops into vLLM's CPU LoRA path (`adapterhub_lite.vllm_compat.lora_ops.install`);
    False, with vLLM's own code kept, when that is not possible."""
    try:
        from adapterhub_lite.vllm_compat import lora_ops
    except Exception as exc:  # another vLLM version: the seam refuses it, vLLM's own ops stay
        import logging

        logging.getLogger(__name__).info("adapterhub: vLLM's CPU LoRA code left as it is (%s)", exc)
        return False
    return lora_ops.install()
