"""Who am I: rank and world size from torchrun (RANK/WORLD_SIZE), Slurm (SLURM_PROCID/NTASKS)
or MPI (OMPI_COMM_WORLD_*, PMI_*), then the default process group (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

_SOURCES = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    source: str


def discover_rank(environ=None) -> Optional[RankInfo]:
    """The launcher's rank variables, or None when no launcher started this process."""
    env = os.environ if environ is None else environ
    for source, r, w, lr in _SOURCES:
        if r in env and w in env:
            return RankInfo(int(env[r]), int(env[w]), int(env.get(lr, 0)), source)
    return None


def select_device(local_rank: int) -> tuple[torch.device, str]:
    """CUDA + NCCL when a GPU is visible (unless MEGAMOE_DEVICE=cpu), else CPU + gloo."""
    if torch.cuda.is_available() and os.environ.get("MEGAMOE_DEVICE", "auto") != "cpu":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def init_distributed(info: RankInfo, master_addr: str | None = None, master_port: int | None = None,
                     timeout_s: float = 600.0) -> torch.device:
    """Create the default process group for `info`; returns this rank's device."""
    device, backend = select_device(info.local_rank)
    addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = master_port or int(os.environ.get("MASTER_PORT", "29500"))
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    if device.type == "cpu":
        from megamoe.platform.bridge import apply_cpu_bridge

        apply_cpu_bridge()
    return device
