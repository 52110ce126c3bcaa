"""`megamoe submit`: check a config for the world size of the requested allocation, render a
slurm/ template with that allocation and the config's arguments, and queue it with sbatch —
so a config error costs a second at the login node, not a queue wait and GPU hours."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATES = {"srun": "pretrain.sbatch", "torchrun": "pretrain_torchrun.sbatch"}
MARKER = "# megamoe submit: arguments"


@dataclass
class Request:
    config: str
    nodes: int
    gpus_per_node: int = 0          # 0: CPU ranks (gloo)
    tasks_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    overrides: list = field(default_factory=list)
    launcher: str = "srun"
    min_free_disk_gb: float | None = None
    min_free_mem_gb: float | None = None


def plan(req: Request):
    """(config, per-node ranks, overrides for the job): the config loaded and checked at the
    world size of the allocation. Raises ConfigError/ValueError naming the field or flag."""
    from megamoe.config import load_config
    from megamoe.models.checks import check_config

    if req.nodes < 1:
        raise ValueError(f"--nodes: {req.nodes} must be at least 1")
    if req.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node: {req.gpus_per_node} must not be negative")
    per_node = req.gpus_per_node or req.tasks_per_node
    if per_node is None:   # CPU ranks: the config's world size spread over the nodes
        world = load_config(req.config, req.overrides).parallel.world_size
        if world % req.nodes:
            raise ValueError(f"--nodes: parallel.world_size={world} ranks do not spread evenly "
                             f"over {req.nodes} nodes (set --tasks-per-node or "
                             "--set parallel.world_size=...)")
        per_node = world // req.nodes
    overrides = list(req.overrides) + [f"parallel.world_size={req.nodes * per_node}"]
    cfg = load_config(req.config, overrides)
    check_config(cfg)
    return cfg, per_node, overrides


def _sbatch_lines(req: Request, cfg, per_node: int) -> list[str]:
    lines = [f"--job-name={cfg.run.name}", f"--nodes={req.nodes}",
             f"--ntasks-per-node={per_node if req.launcher == 'srun' else 1}"]
    if req.launcher == "torchrun":
        lines.append(f"--cpus-per-task={per_node}")
    if req.gpus_per_node:
        lines.append(f"--gpus-per-node={req.gpus_per_node}")
    if req.partition:
        lines.append(f"--partition={req.partition}")
    return lines + [f"--time={req.time or '24:00:00'}"]


def render(req: Request, cfg, per_node: int, overrides: list) -> str:
    """The template with the allocation's #SBATCH lines and the job's arguments filled in."""
    path = os.path.join(ROOT, "slurm", TEMPLATES[req.launcher])
    if not os.path.isfile(path):
        raise ValueError(f"{path}: the sbatch template is missing (megamoe submit runs from a "
                         "source checkout)")
    with open(path) as f:
        text = f.read()
    replaced = {"--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--time",
                "--partition", "--cpus-per-task"}
    keep = [ln for ln in text.splitlines() if not (
        ln.startswith("#SBATCH ") and re.split(r"[= ]", ln.split(None, 1)[1])[0] in replaced)]
    first = next(i for i, ln in enumerate(keep) if ln.startswith("#SBATCH "))
    keep[first:first] = [f"#SBATCH {ln}" for ln in _sbatch_lines(req, cfg, per_node)]
    config = os.path.abspath(req.config) if os.path.isfile(req.config) else req.config
    args = [config] + [x for o in overrides for x in ("--set", o)]
    job = [f"set -- {shlex.join(args)}",
           f"export MEGAMOE_PYTHON=${{MEGAMOE_PYTHON:-{shlex.quote(sys.executable)}}}"]
    if req.launcher == "torchrun":
        job.append(f"export NPROC_PER_NODE={per_node}")
    for var, value in (("MEGAMOE_MIN_FREE_DISK_GB", req.min_free_disk_gb),
                       ("MEGAMOE_MIN_FREE_MEM_GB", req.min_free_mem_gb)):
        if value is not None:
            job.append(f"export {var}={value:g}")
    at = keep.index(MARKER)
    keep[at + 1:at + 1] = job
    return "\n".join(keep) + "\n"


def submit(req: Request, dry_run: bool = False) -> int:
    """Validate, render, and queue (or print, with dry_run) the job."""
    cfg, per_node, overrides = plan(req)
    script = render(req, cfg, per_node, overrides)
    if dry_run:
        print(script, end="")
        return 0
    os.makedirs("logs", exist_ok=True)   # sbatch does not create the --output directory
    try:
        out = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True,
                             text=True, timeout=60)
    except FileNotFoundError:
        raise ValueError("sbatch: not found (megamoe submit needs a Slurm login node; "
                         "--dry-run prints the script)") from None
    if out.returncode:
        raise ValueError(f"sbatch: {out.stderr.strip().splitlines()[-1] if out.stderr else ''}")
    job_id = out.stdout.strip().split(";")[0]
    run_dir = cfg.run.dir or os.path.join("runs", f"{cfg.run.name}-{job_id}")
    print(f"submitted job {job_id}: {req.nodes} nodes x {per_node} ranks; "
          f"log logs/{cfg.run.name}-{job_id}.out, rank logs under logs/{job_id}/, "
          f"run dir {run_dir}")
    return 0
