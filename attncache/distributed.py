"""The process group, when a command runs under torchrun (or SLURM's srun with torchrun's variables).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `World.from_env()` joins the group and says which rank this process
is (`World.env()` only reads which). On CPU the group is gloo. On CUDA each rank first makes its own GPU
(LOCAL_RANK) the current device, and the group is nccl for CUDA tensors (DDP's gradients) with gloo beside it for
CPU tensors: the small control collectives (losses, stop flags, RNG states, plans) are CPU tensors or objects,
which nccl alone refuses or would stage through the current GPU (GPU 0 for every rank, had the device not been
set). Without those variables the world is one process and every collective is a no-op, so the same code runs
alone or distributed.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch

from .errors import AttncacheError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def env(cls) -> World:
        """The world torchrun's variables describe, without joining its group: enough to know which rank this
        process is (rank 0 speaks for the job) once the work that joined it is done."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))

    @classmethod
    def from_env(cls, device: torch.device) -> World:
        world = cls.env()
        if not world.distributed:
            return world
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(world.device(device))
        if not dist.is_initialized():
            backend = process_group_backend(device)
            try:
                dist.init_process_group(backend)
            except (RuntimeError, ValueError) as exc:
                raise AttncacheError(f"cannot join the torchrun process group ({backend}): {exc}") from exc
            # Leave the group before the interpreter tears down: a group still alive at exit let gloo's threads
            # be destroyed joinable, and a rank that finished first aborted ("terminate called without an active
            # exception", SIGABRT), failing the whole torchrun job after its work was done.
            atexit.register(_leave_group)
        return world

    def device(self, device: torch.device) -> torch.device:
        """cuda means this rank's GPU (LOCAL_RANK) when distributed."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        """`obj` of rank 0, on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_max(self, value: float) -> float:
        if not self.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def process_group_backend(device: torch.device) -> str:
    """gloo on CPU; on CUDA nccl for CUDA tensors and gloo for CPU ones (see the module docstring)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
