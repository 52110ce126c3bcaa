"""Where rank 0 listens: MASTER_ADDR/MASTER_PORT when the launcher or the job script set them,
else derived from the launcher's own facts — under Slurm the first host of the step's node list
and a port derived from the job id (jobs sharing a node do not collide), under MPI rank 0's host
and a free port shared through mpi4py. Ranks that span several nodes never fall back to
localhost: that is an error naming what to set."""

from __future__ import annotations

import importlib.util
import re
import socket

DEFAULT_PORT = 29500
SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 20000   # below Linux's ephemeral range (32768+)


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,07],login1", "r[1-2]-n[1-2]") as host names, in
    Slurm's order (what `scontrol show hostnames` prints)."""
    hosts = []
    for item in _top_level_items(nodelist):
        hosts.extend(_expand_item(item))
    return hosts


def _top_level_items(nodelist: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced brackets")
    return [item for item in items + [cur] if item]


def _expand_item(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tail = item[:match.start()], item[match.end():]
    out = []
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"SLURM_JOB_NODELIST: cannot parse the range [{match.group(1)}]")
        for value in range(int(lo), int(hi or lo) + 1):
            out.extend(_expand_item(f"{head}{value:0{len(lo)}d}{tail}"))
    return out


def slurm_port(job_id: str) -> int:
    """A port for this job's rendezvous: different for jobs sharing a node."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def slurm_master(env) -> tuple[str, int] | None:
    """(first host of the step's nodes, the job's port), or None outside a Slurm job."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    job_id = env.get("SLURM_JOB_ID")
    if not nodelist or not job_id:
        return None
    return expand_hostlist(nodelist)[0], slurm_port(job_id)


def have_mpi4py() -> bool:
    return importlib.util.find_spec("mpi4py") is not None


def share_through_mpi(rank: int) -> tuple[str, int]:
    """Rank 0's host name and a free port on it, broadcast to every MPI rank."""
    from mpi4py import MPI

    found = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            found = (socket.gethostname(), s.getsockname()[1])
    addr, port = MPI.COMM_WORLD.bcast(found, root=0)
    return addr, port


if __name__ == "__main__":   # the first host of a node list, for job scripts without scontrol
    import sys

    print(expand_hostlist(sys.argv[1])[0])
