"""Distributed helpers: process-group setup through DeepSpeed, rank queries, and the few collectives the
training loop needs so that every rank takes the same decision (skip a step, halve the LR, stop)."""

from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    """A free local TCP port (for a single process's rendezvous, or a test's torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed, also for a plain `python script.py`.

    Launchers (deepspeed, torchrun, srun via mpirun) set RANK/WORLD_SIZE; without them DeepSpeed would
    try MPI discovery and fail, so a single process gets rank 0 of 1 on a free local port."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # CPU runs are tests and demos: gloo all-reduce is enough, skip JIT-building the shm comm op.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(verbose=False)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def mean_over_ranks(value: float, device) -> float:
    if not torch.distributed.is_initialized() or world_size() == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / world_size()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is true on any: ranks must agree to skip a step or to stop."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
