"""Who am I: rank, world size and rendezvous from the innermost launcher, then the default process
group (NCCL on GPUs, gloo on CPU).

Launchers nest (torchrun inside an sbatch step, mpirun inside an allocation), and each leaves its
variables behind, so the sources are read innermost first and the first one present wins:
  1. torchrun (TORCHELASTIC_*), the deepspeed launcher (CROSS_RANK / LOCAL_SIZE), or plain
     RANK / WORLD_SIZE (megamoe's own local spawn, or set by hand);
  2. Open MPI's mpirun (OMPI_COMM_WORLD_*), MPICH/Intel MPI (PMI_RANK / PMI_SIZE);
  3. a Slurm step task (SLURM_PROCID / SLURM_NTASKS with SLURM_STEP_ID; the batch shell itself
     carries SLURM_PROCID=0 but is no rank), PMIX_RANK under `srun --mpi=pmix`.
Only an inconsistent set is an error (LaunchError, one line): the variables of one source that
disagree with each other, an incomplete set, a rank outside the world, ranks spanning nodes with
no way to find rank 0.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megamoe.launch import rendezvous as rdv


class LaunchError(ValueError):
    """The launcher's environment is inconsistent; the message is one line naming variables."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    source: str
    local_size: Optional[int] = None     # ranks on this node, when the launcher says
    master_addr: Optional[str] = None    # None with a source of mpi: shared through mpi4py
    master_port: Optional[int] = None


def _int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def _opt(env, name: str) -> Optional[int]:
    return _int(env, name) if name in env else None


def _agree(env, name: str, value: int, other: str) -> None:
    """`other`, when set, must equal `value` (read from `name`)."""
    if other in env and _int(env, other) != value:
        raise LaunchError(f"{name}={value} but {other}={env[other]}: two launchers' variables "
                          "disagree about this process's rank")


def _torch_tier(env) -> Optional[tuple]:
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    for need in ("RANK", "WORLD_SIZE"):
        if need not in env:
            other = "WORLD_SIZE" if need == "RANK" else "RANK"
            raise LaunchError(f"{other}={env[other]} is set but {need} is not: an incomplete "
                              "launcher environment (torchrun sets both)")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local = _opt(env, "LOCAL_RANK") or 0
    if any(k.startswith("TORCHELASTIC_") for k in env):
        source = "torchrun"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        source = "deepspeed"
        if "CROSS_RANK" in env and "LOCAL_SIZE" in env:
            expected = _int(env, "CROSS_RANK") * _int(env, "LOCAL_SIZE") + local
            if expected != rank:
                raise LaunchError(f"RANK={rank} but CROSS_RANK*LOCAL_SIZE+LOCAL_RANK={expected}: "
                                  "the deepspeed launcher's variables disagree")
    else:
        source = "env"
    local_size = _opt(env, "LOCAL_WORLD_SIZE") or _opt(env, "LOCAL_SIZE")
    return rank, world, local, source, local_size, "RANK", "WORLD_SIZE"


def _mpi_tier(env) -> Optional[tuple]:
    if "OMPI_COMM_WORLD_RANK" in env:
        rank = _int(env, "OMPI_COMM_WORLD_RANK")
        _agree(env, "OMPI_COMM_WORLD_RANK", rank, "PMIX_RANK")
        _agree(env, "OMPI_COMM_WORLD_RANK", rank, "PMI_RANK")
        return (rank, _int(env, "OMPI_COMM_WORLD_SIZE"), _opt(env, "OMPI_COMM_WORLD_LOCAL_RANK")
                or 0, "openmpi", _opt(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
                "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return (_int(env, "PMI_RANK"), _int(env, "PMI_SIZE"), _opt(env, "MPI_LOCALRANKID") or 0,
                "pmi", _opt(env, "MPI_LOCALNRANKS"), "PMI_RANK", "PMI_SIZE")
    return None


def _slurm_tier(env) -> Optional[tuple]:
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return None
    rank = _int(env, "SLURM_PROCID")
    _agree(env, "SLURM_PROCID", rank, "PMIX_RANK")
    source = "slurm-pmix" if "PMIX_RANK" in env else "slurm"
    nodes, world = _opt(env, "SLURM_STEP_NUM_NODES") or _opt(env, "SLURM_NNODES"), \
        _int(env, "SLURM_NTASKS")
    local_size = world if nodes == 1 else None
    return (rank, world, _opt(env, "SLURM_LOCALID") or 0, source, local_size,
            "SLURM_PROCID", "SLURM_NTASKS")


def discover_rank(environ=None, mpi4py_available: Optional[bool] = None) -> Optional[RankInfo]:
    """The innermost launcher's rank variables and rendezvous, or None when no launcher started
    this process. Raises LaunchError for an inconsistent environment."""
    env = os.environ if environ is None else environ
    found = _torch_tier(env) or _mpi_tier(env) or _slurm_tier(env)
    if found is None:
        return None
    rank, world, local, source, local_size, rank_var, world_var = found
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"{rank_var}={rank} with {world_var}={world}: the rank is outside "
                          "the world")
    addr, port = _master(env, source, world, local_size, mpi4py_available)
    return RankInfo(rank, world, local, source, local_size, addr, port)


def _master(env, source: str, world: int, local_size, mpi4py_available):
    """(address, port) of rank 0; (None, None) when MPI ranks share it through mpi4py."""
    port = _opt(env, "MASTER_PORT")
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"], port or rdv.DEFAULT_PORT
    if source.startswith("slurm"):
        found = rdv.slurm_master(env)
        if found is not None:
            return found[0], port or found[1]
    if source in ("openmpi", "pmi"):
        available = rdv.have_mpi4py() if mpi4py_available is None else mpi4py_available
        if available:
            return None, None
    single_node = local_size is not None and local_size == world
    if single_node or (local_size is None and source in ("env", "deepspeed")):
        return "127.0.0.1", port or rdv.DEFAULT_PORT
    how = {"openmpi": "or install mpi4py (pip install 'megamoe[mpi]') so rank 0 shares it",
           "pmi": "or install mpi4py (pip install 'megamoe[mpi]') so rank 0 shares it"}
    raise LaunchError(f"MASTER_ADDR is not set and the {world} ranks ({source}) may span "
                      f"several nodes: export MASTER_ADDR (and MASTER_PORT) "
                      f"{how.get(source, 'to the host of rank 0')}")


def check_world_size(info: RankInfo, world_size: int) -> None:
    """The launcher started as many ranks as the config's parallel.world_size."""
    if info.world_size != world_size:
        raise LaunchError(f"parallel.world_size: {world_size} but the launcher started "
                          f"{info.world_size} ranks ({info.source})")


def select_device(local_rank: int) -> tuple[torch.device, str]:
    """CUDA + NCCL when a GPU is visible (unless MEGAMOE_DEVICE=cpu), else CPU + gloo. With one
    visible device per task (srun --gpus-per-task=1) that device is used, whatever the local
    rank."""
    if torch.cuda.is_available() and os.environ.get("MEGAMOE_DEVICE", "auto") != "cpu":
        count = torch.cuda.device_count()
        torch.cuda.set_device(0 if count == 1 else local_rank % count)
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def collective_device() -> torch.device:
    """Where a small tensor for a collective on the default group must live: NCCL takes only
    CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(info: RankInfo, master_addr: str | None = None, master_port: int | None = None,
                     timeout_s: float = 600.0) -> torch.device:
    """Create the default process group for `info`; returns this rank's device."""
    device, backend = select_device(info.local_rank)
    addr, port = master_addr or info.master_addr, master_port or info.master_port
    if addr is None and info.source in ("openmpi", "pmi"):
        addr, port = rdv.share_through_mpi(info.rank)
    addr = addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = port or int(os.environ.get("MASTER_PORT", rdv.DEFAULT_PORT))
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
        threads = cpu_threads(info)
        if threads is not None:
            torch.set_num_threads(threads)
    return device


def cpu_threads(info: RankInfo, environ=None, affinity=None, node_cpus=None) -> Optional[int]:
    """Intra-op threads for a CPU rank, or None to leave torch's choice. Each CPU rank would
    otherwise start one thread per core of the node, so N ranks on a node run N x cores threads
    that preempt each other inside every small op (the 2-rank tiny ViT: 440 ms/step with 2
    threads each on 2 cores, 150 ms with 1). OMP_NUM_THREADS (set by torchrun for several ranks)
    wins; a rank already bound to a subset of the cores (srun --cpus-per-task, mpirun --bind-to)
    uses all of its own; otherwise the node's cores are shared among its ranks."""
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        return None
    mine = len(os.sched_getaffinity(0)) if affinity is None else affinity
    node = (os.cpu_count() or mine) if node_cpus is None else node_cpus
    if mine < node:
        return mine
    local = info.local_size or info.world_size   # unknown: as if all ranks shared this node
    return max(1, mine // local)
