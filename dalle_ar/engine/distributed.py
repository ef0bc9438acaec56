"""Distributed helpers: process-group setup through DeepSpeed, rank queries, and the few collectives the
training loop needs so that every rank takes the same decision (skip a step, halve the LR, stop)."""

from __future__ import annotations

import os
import re
import socket
from typing import Mapping

import torch

from dalle_ar.config import ConfigError


def free_port() -> int:
    """A free local TCP port (for a single process's rendezvous, or a test's torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu3" -> "gpu07" (zero padding kept)."""
    head = re.match(r"[^,\[]*(\[[^\]]*\])?", nodelist.strip()).group(0)
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The rendezvous variables torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
    that the launcher left out, found from whichever launcher started this process:

    - torchrun and the `deepspeed` launcher (pdsh hostfile): set them all; nothing to add.
    - SLURM `srun`: SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), SLURM_LOCALID, the first node of
      SLURM_STEP_NODELIST / SLURM_JOB_NODELIST; the port from MASTER_PORT, else 29500 + SLURM_JOB_ID % 1000.
    - MPI (`mpirun`, `deepspeed --launcher openmpi|mvapich`): OMPI_COMM_WORLD_* or PMI_*; MASTER_ADDR must be
      exported (`mpirun -x MASTER_ADDR=<first node>`), since MPI does not say which node is first.
    - nothing: one process, rank 0 of 1, on a free local port.
    A half-set launch (RANK without WORLD_SIZE, several ranks without a master address) raises ConfigError: run
    N processes that each think they are rank 0 of 1 and they would all write the same --out."""
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing and not ("WORLD_SIZE" in env and env["WORLD_SIZE"] == "1" and "RANK" in env):
            raise ConfigError(f"the launch environment sets {', '.join(k for k in ('RANK', 'WORLD_SIZE') if k in env)} "
                              f"but not {', '.join(missing)}; launch with torchrun, deepspeed or srun, or set all of "
                              f"RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
        return {} if "LOCAL_RANK" in env else {"LOCAL_RANK": "0"}
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes and "MASTER_ADDR" not in env:
            raise ConfigError("srun with several tasks but no SLURM_JOB_NODELIST: export MASTER_ADDR=<first node>")
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS")),
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
                "MASTER_PORT": env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)}
    for rank_key, size_key, local_key in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                                          ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")):
        if rank_key in env and int(env.get(size_key, "1")) > 1:
            if "MASTER_ADDR" not in env:
                raise ConfigError(f"an MPI launch of {env[size_key]} ranks needs MASTER_ADDR (the first node's address): "
                                  f"mpirun -x MASTER_ADDR=<first node> -x MASTER_PORT=29500 ...")
            return {"RANK": env[rank_key], "WORLD_SIZE": env[size_key], "LOCAL_RANK": env.get(local_key, "0"),
                    "MASTER_PORT": env.get("MASTER_PORT", "29500")}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}


def setup_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed, also for a plain `python script.py`, under torchrun, the
    deepspeed launcher, srun or mpirun (`launch_env`)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(launch_env(os.environ))
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
