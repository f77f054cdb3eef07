"""Multi-process helpers on top of ``torch.distributed`` (launched with ``torchrun``).

Every rank builds the same trainer. Data: each rank draws its disjoint slice of the same global
batch (the sampler computes the whole global assignment on every rank). Signals: everything a
mixer sees is gathered or reduced across ranks *before* the mixer observes it, so every rank
runs the same update on the same numbers and holds the same weights; a checksum all-reduce after
every update proves it (``train.check_ranks``). Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from mixlab.errors import MixlabError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    """Where tensors handed to a collective live: the rank's CUDA device under NCCL (which
    rejects CPU tensors), else the CPU."""

    @classmethod
    def from_process_group(cls, device: str | torch.device = "cpu") -> DistInfo:
        """The current process group's rank and size (a single process when none is set up)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        nccl = dist.get_backend() == "nccl"
        dev = torch.device(device)
        return cls(dist.get_rank(), dist.get_world_size(), dev.index or 0, str(dev) if nccl else "cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    device = f"cuda:{local}" if dist.get_backend() == "nccl" else "cpu"
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def all_gather_array(x: np.ndarray, info: DistInfo) -> np.ndarray:
    """Concatenate a 1-D array over ranks in rank order (equal lengths on every rank)."""
    if not info.enabled:
        return x
    t = torch.as_tensor(np.ascontiguousarray(x)).to(info.device)
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t)
    return torch.cat(out).cpu().numpy()


def all_reduce_sum(x: np.ndarray, info: DistInfo) -> np.ndarray:
    """Sum a float64 array over ranks."""
    if not info.enabled:
        return x
    t = torch.as_tensor(np.asarray(x, dtype=np.float64)).to(info.device, copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def all_reduce_max(x: np.ndarray, info: DistInfo) -> np.ndarray:
    """Elementwise maximum of a float64 array over ranks."""
    if not info.enabled:
        return np.asarray(x, dtype=np.float64)
    t = torch.as_tensor(np.asarray(x, dtype=np.float64)).to(info.device, copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().numpy()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on at least one."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def check_same_on_all_ranks(values: np.ndarray, what: str, step: int, info: DistInfo) -> None:
    """Raise on every rank if ``values`` differ between ranks (compares min and max exactly)."""
    if not info.enabled:
        return
    t = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(info.device, copy=True)
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise MixlabError(
            f"{what} differ between ranks at step {step} (min {lo.cpu().tolist()}, max "
            f"{hi.cpu().tolist()}); "
            "a mixer used a rank-local value. Please report this with the config."
        )


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def average_gradients(model: torch.nn.Module, info: DistInfo) -> None:
    """Average ``.grad`` over ranks in place (for models trained outside DDP, e.g. branches)."""
    if not info.enabled:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= info.world_size
