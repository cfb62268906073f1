"""Grouped multi-LoRA matmuls for vLLM's CPU build: one GEMM per adapter in the batch, not a weight copy
per token.

vLLM's CPU punica wrapper uses its PyTorch reference ops (`vllm.lora.ops.torch_ops`), which gather a
copy of the LoRA matrix for every token (`weights[indices]`, shape tokens x out x rank) and multiply
token by token. A batch only ever holds a few distinct adapters (at most `--max-loras`), so grouping
the tokens by adapter and doing one matrix product per group reads each LoRA matrix once. Same
signatures and the same results (up to float rounding) as the reference ops; the plugin installs
them on the CPU platform only (GPUs use vLLM's Triton kernels), and `ADAPTERHUB_CPU_LORA_OPS=0`
keeps vLLM's own. Measured by `benchmarks/cpu_lora_ops_bench.py` (per batch size) and
`benchmarks/serving_bench.py` (the server with and without them).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

ENV_SWITCH = "ADAPTERHUB_CPU_LORA_OPS"
# Below these sizes the reference gather is as fast or faster (benchmarks/cpu_lora_ops_bench.py).
_MIN_GROUPED_TOKENS = 128
_MIN_TOKENS_PER_GROUP = 16


def _lora_products(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Row b of the result is ``weights[indices[b]] @ inputs[b]`` in `dtype` (the reference ops' einsum
    ``"bi, boi -> bo"``), computed with one matmul per distinct index (negative indices count from the
    end, as in the reference's gather). Only the weights used are cast, as in the reference."""
    inputs = inputs.to(dtype=dtype)
    if weights.dim() == 4:
        weights = weights.squeeze(dim=1)
    n = inputs.shape[0]
    groups = counts = None
    if n >= _MIN_GROUPED_TOKENS and indices.shape[0] == n:
        groups, counts = torch.unique(indices, return_counts=True)
    # Small batches (decode) and batches of many adapters with few tokens each: gathering a weight copy
    # per token costs less than sorting and a loop of matmuls. Shapes the grouped path does not cover
    # get the reference computation too.
    if groups is None or (groups.numel() > 1 and n < _MIN_TOKENS_PER_GROUP * groups.numel()):
        return torch.einsum("bi, boi -> bo", inputs, weights[indices].to(dtype=dtype))
    if groups.numel() == 1:
        return inputs @ weights[int(groups[0])].to(dtype=dtype).t()
    order = torch.argsort(indices, stable=True)
    out_sorted = torch.cat(
        [
            chunk @ weights[index].to(dtype=dtype).t()
            for index, chunk in zip(groups.tolist(), inputs[order].split(counts.tolist()), strict=True)
        ]
    )
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = _lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = _lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
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
    outputs = _lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


GROUPED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def install() -> bool:
    """Use the grouped ops in vLLM's CPU punica wrapper (and in its sgmv ops, which call the bgmv ones).

    Does nothing (returns False) when switched off by ``ADAPTERHUB_CPU_LORA_OPS=0``, off the CPU
    platform, or when vLLM's modules do not have the shape this was written against.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except Exception as exc:  # vLLM without LoRA support or another layout: keep its own ops
        log.info("adapterhub: vLLM's CPU LoRA ops left as they are (%s)", exc)
        return False
    if not all(hasattr(m, name) for m in (lora_ops, punica_cpu) for name in GROUPED):
        return False
    for module in (lora_ops, punica_cpu):
        for name, fn in GROUPED.items():
            setattr(module, name, fn)
    log.info("adapterhub: grouped CPU LoRA ops installed (%s=0 to keep vLLM's own)", ENV_SWITCH)
    return True
