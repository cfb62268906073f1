"""Installs adapterhub's grouped CPU LoRA arithmetic (`kernels/cpu_lora_ops.py`) into vLLM's CPU build.

vLLM has no extension point for the punica wrapper short of a whole platform plugin, so these are two
guarded patches, each checked against the shape of vLLM 0.32 before it is made and skipped (vLLM's own
code stays) when that shape differs:

* the CPU punica wrapper class (`punica_cpu.PunicaWrapperCPU`, which the CPU platform names by qualified
  name) becomes a subclass that groups the batch's rows once per step (`update_metadata`) and runs every
  linear LoRA layer as one grouped product (`add_lora_linear`), instead of a shrink and an expand per
  slice, each re-expanding the indices and gathering a weight copy per token;
* the reference bgmv ops (which vLLM's sgmv ops and the logits/embedding paths call) become grouped ones
  with the same signatures;
* `LoRAModelManager.activate_adapter` records which slot it wrote in each layer
  (`cpu_lora_ops.note_slot_write`), so the grouped ops refresh that slot alone in their prepared copy
  of the weights, not every slot (a write made anywhere else is noticed and rebuilds every slot).

`ADAPTERHUB_LORA_TRACE=1` logs one line per adapter that enters a slot, with running counts of adapters
read from disk (and the time spent), slot writes and prepared-weight rebuilds: `benchmarks/serving_bench.py`
counts them per phase.

`ADAPTERHUB_CPU_LORA_OPS=0` keeps vLLM's own code; GPUs keep their Triton kernels.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from adapterhub_lite.kernels import cpu_lora_ops
from adapterhub_lite.kernels.cpu_lora_ops import ENV_SWITCH, GROUPED, group_rows, lora_linear
from adapterhub_lite.settings import env_name, settings

log = logging.getLogger("adapterhub.serving")
TRACE_SWITCH = env_name("lora_trace")

_WRAPPER_METHODS = ("update_metadata", "add_lora_linear", "token_lora_indices")


def grouped_wrapper_class(base: type) -> type:
    """A subclass of vLLM's CPU punica wrapper that runs linear LoRA layers through `lora_linear`."""

    class GroupedPunicaWrapperCPU(base):  # type: ignore[misc, valid-type]
        _adapterhub_grouping: cpu_lora_ops.Grouping | None = None

        def update_metadata(self, *args: Any, **kwargs: Any) -> None:
            super().update_metadata(*args, **kwargs)
            # vLLM calls this only when the batch's adapter mapping (or the slot layout) changes.
            self._adapterhub_grouping = group_rows(self.token_lora_indices, self._adapterhub_grouping)

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


class _Trace:
    """Running counts for `ADAPTERHUB_LORA_TRACE` (one engine process each)."""

    loads = 0
    load_s = 0.0
    activations = 0


def _record_slot_writes(manager_cls: type) -> bool:
    """Wrap `activate_adapter` so every linear LoRA layer's slot write is noted for the prepared copy."""
    original = manager_cls.__dict__.get("activate_adapter")
    if not callable(original):
        return False
    if getattr(original, "_adapterhub", False):
        return True
    trace = settings().lora_trace

    def activate_adapter(self: Any, lora_id: int) -> Any:
        layers = [
            m
            for m in self.modules.values()
            if isinstance(getattr(m, "lora_a_stacked", None), tuple)
            and isinstance(getattr(m, "lora_b_stacked", None), tuple)
        ]
        before = [cpu_lora_ops._versions(m.lora_a_stacked, m.lora_b_stacked) for m in layers]
        activated = original(self, lora_id)
        if activated:
            slot = self.lora_index_to_id.index(lora_id)
            for m, versions in zip(layers, before, strict=True):
                cpu_lora_ops.note_slot_write(m.lora_a_stacked, m.lora_b_stacked, slot, versions)
            if trace:
                _Trace.activations += 1
                full, partial = cpu_lora_ops.REBUILDS
                log.info(
                    "adapterhub trace: slot %d <- adapter %d; activations %d, read from disk %d (%.3f s), "
                    "prepared-weight rebuilds %d full / %d one-slot",
                    slot,
                    lora_id,
                    _Trace.activations,
                    _Trace.loads,
                    _Trace.load_s,
                    full,
                    partial,
                )
        return activated

    activate_adapter._adapterhub = True  # type: ignore[attr-defined]
    manager_cls.activate_adapter = activate_adapter
    return True


def _trace_loads(worker_cls: type) -> None:
    """Count and time adapter reads from disk (only under `ADAPTERHUB_LORA_TRACE=1`)."""
    original = worker_cls.__dict__.get("_load_adapter")
    if not settings().lora_trace or not callable(original) or getattr(original, "_ahl_trace", 0):
        return

    def _load_adapter(self: Any, lora_request: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, lora_request)
        finally:
            _Trace.loads += 1
            _Trace.load_s += time.perf_counter() - t0

    _load_adapter._ahl_trace = True  # type: ignore[attr-defined]
    worker_cls._load_adapter = _load_adapter


def install() -> bool:
    """Install the grouped wrapper and ops in vLLM's CPU LoRA path; False when left as it was.

    Does nothing when switched off by ``ADAPTERHUB_CPU_LORA_OPS=0``, off the CPU platform, or when
    vLLM's modules do not have the shape this was written against (each patch is checked on its own).
    """
    if not settings().cpu_lora_ops:
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
    if "wrapper" in installed:
        try:
            from vllm.lora.model_manager import LoRAModelManager
            from vllm.lora.worker_manager import WorkerLoRAManager
        except Exception:  # another layout: every slot write rebuilds every slot (correct, slower)
            pass
        else:
            if _record_slot_writes(LoRAModelManager):
                installed.append("slot-writes")
            _trace_loads(WorkerLoRAManager)
    if not installed:
        log.info("adapterhub: vLLM's CPU LoRA code has another shape; left as it is")
        return False
    log.info(
        "adapterhub: grouped CPU LoRA %s installed (%s=0 keeps vLLM's own)", "+".join(installed), ENV_SWITCH
    )
    return True
