"""Installs adapterhub's grouped CPU LoRA arithmetic (`serving/cpu_lora_ops.py`) into vLLM's CPU build.

vLLM has no extension point for the punica wrapper short of a whole platform plugin, so these are two
guarded patches, each checked against the shape of vLLM 0.32 before it is made and skipped (vLLM's own
code stays) when that shape differs:

* the CPU punica wrapper class (`punica_cpu.PunicaWrapperCPU`, which the CPU platform names by qualified
  name) becomes a subclass that groups the batch's rows once per step (`update_metadata`) and runs every
  linear LoRA layer as one grouped product (`add_lora_linear`), instead of a shrink and an expand per
  slice, each re-expanding the indices and gathering a weight copy per token;
* the reference bgmv ops (which vLLM's sgmv ops and the logits/embedding paths call) become grouped ones
  with the same signatures.

`ADAPTERHUB_CPU_LORA_OPS=0` keeps vLLM's own code; GPUs keep their Triton kernels.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from adapterhub_lite.serving import cpu_lora_ops
from adapterhub_lite.serving.cpu_lora_ops import ENV_SWITCH, GROUPED, group_rows, lora_linear

log = logging.getLogger(__name__)

_WRAPPER_METHODS = ("update_metadata", "add_lora_linear", "token_lora_indices")


def grouped_wrapper_class(base: type) -> type:
    """A subclass of vLLM's CPU punica wrapper that runs linear LoRA layers through `lora_linear`."""

    class GroupedPunicaWrapperCPU(base):  # type: ignore[misc, valid-type]
        _adapterhub_grouping: cpu_lora_ops.Grouping | None = None

        def update_metadata(self, *args: Any, **kwargs: Any) -> None:
            super().update_metadata(*args, **kwargs)
            # vLLM calls this only when the batch's adapter mapping (or the slot layout) changes.
            self._adapterhub_grouping = group_rows(self.token_lora_indices)

        def add_lora_linear(
            self,
            y: Any,
            x: Any,
            lora_a_stacked: Any,
            lora_b_stacked: Any,
            scale: float,
            output_slices: Any,
            *,
            buffer: Any = None,
            **kwargs: Any,
        ) -> Any:
            g = self._adapterhub_grouping
            x2 = x.view(-1, x.shape[-1])
            if g is None or g.n != x2.shape[0] or y.dim() != 2:
                return super().add_lora_linear(
                    y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
                )
            return lora_linear(y, x2, g, lora_a_stacked, lora_b_stacked, scale, output_slices)

    GroupedPunicaWrapperCPU.__qualname__ = GroupedPunicaWrapperCPU.__name__
    return GroupedPunicaWrapperCPU


def install() -> bool:
    """Install the grouped wrapper and ops in vLLM's CPU LoRA path; False when left as it was.

    Does nothing when switched off by ``ADAPTERHUB_CPU_LORA_OPS=0``, off the CPU platform, or when
    vLLM's modules do not have the shape this was written against (each patch is checked on its own).
    """
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except Exception as exc:  # vLLM without LoRA support or another layout: keep its own code
        log.info("adapterhub: vLLM's CPU LoRA code left as it is (%s)", exc)
        return False
    installed = []
    if all(hasattr(m, name) for m in (lora_ops, punica_cpu) for name in GROUPED):
        for module in (lora_ops, punica_cpu):
            for name, fn in GROUPED.items():
                setattr(module, name, fn)
        installed.append("ops")
    wrapper = getattr(punica_cpu, "PunicaWrapperCPU", None)
    if getattr(wrapper, "_adapterhub_grouping", False) is None:
        installed.append("wrapper")  # already ours (vLLM may call plugins more than once)
    elif isinstance(wrapper, type) and all(hasattr(wrapper, m) for m in _WRAPPER_METHODS):
        punica_cpu.PunicaWrapperCPU = grouped_wrapper_class(wrapper)
        installed.append("wrapper")
    if not installed:
        log.info("adapterhub: vLLM's CPU LoRA code has another shape; left as it is")
        return False
    log.info(
        "adapterhub: grouped CPU LoRA %s installed (%s=0 keeps vLLM's own)", "+".join(installed), ENV_SWITCH
    )
    return True
