"""Data parallel training across processes: who this process is, and the few collectives the loop needs.

A run started by ``torchrun`` or ``accelerate launch`` (or `adapterhub train --processes N`, which calls
torchrun) has RANK and WORLD_SIZE in its environment; each process then holds the whole base and the
same LoRA weights, trains on its shard of every global batch, and sums its gradients with the others'
(one all-reduce per optimizer step) before the identical optimizer step. The collectives go through
torch.distributed: gloo on the CPU, NCCL on CUDA. Without those variables everything here is a no-op.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass, field

import torch

from adapterhub_lite.errors import ErrorKind, TrainingError

# How long a process waits for the others at a collective before giving up: long enough for the main
# process's checkpoint writes and the others' model loads, short enough that a stuck peer ends the run.
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=10)


@dataclass
class Processes:
    """This process's place in the run (rank 0 of 1 when not distributed) and its collective time."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    comm_seconds: float = field(default=0.0)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _timed(self, fn, *args):
        import torch.distributed as dist

        t0 = time.perf_counter()
        try:
            return fn(*args)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise TrainingError(
                f"process {self.rank} of {self.world} lost its peers ({str(exc).splitlines()[0][:160]})",
                hint="another process of the run died; see its output above",
                kind=ErrorKind.INTERNAL,
            ) from None
        finally:
            self.comm_seconds += time.perf_counter() - t0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place (sum over processes) and return it."""
        if self.distributed:
            import torch.distributed as dist

            self._timed(dist.all_reduce, tensor)
        return tensor

    def sum_grads(self, params: list[torch.nn.Parameter], extra: list[float]) -> list[float]:
        """Sum the gradients of ``params`` over processes, with a few scalars in the same message."""
        if not self.distributed:
            return extra
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor(extra, dtype=torch.float32)])
        flat = flat.to(self.device)
        self.sum_(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n
        return flat[offset:].tolist()

    def broadcast_(self, params: list[torch.nn.Parameter]) -> None:
        """Make every process's ``params`` equal to the main process's."""
        if self.distributed:
            import torch.distributed as dist

            with torch.no_grad():
                for p in params:
                    self._timed(dist.broadcast, p.data, 0)

    def gather(self, obj: object) -> list[object]:
        """Every process's ``obj``, by rank (on every process)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[object] = [None] * self.world
        self._timed(dist.all_gather_object, out, obj)
        return out

    def share(self, obj: object) -> object:
        """The main process's ``obj``, on every process."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._timed(dist.broadcast_object_list, box, 0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._timed(dist.barrier)

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def processes(device: str) -> Processes:
    """Join the run this process was started in (from RANK/WORLD_SIZE), or a run of one."""
    for var, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "").lower() in ("1", "true"):
            raise TrainingError(
                f"accelerate was configured for {what}, which this trainer does not apply: it trains by "
                "plain data parallelism (each process holds the whole base, LoRA gradients are all-reduced)",
                hint="launch with a multi-GPU (DDP) accelerate config, or torchrun "
                "(see docs/tutorials/past-one-machine.md)",
            )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(device=device)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Processes(rank, world, local_rank, f"cuda:{local_rank}" if device == "cuda" else "cpu")
