"""Per-node health check before a cluster job trains (slurm/pretrain*.sbatch): each node reports
its devices, free memory and disk, the hash of megamoe's source and of the resolved config; the
batch shell then stops the job with one line naming the first node and check that failed, before
any GPU hour is spent on a node that would fail later or train different code.

  srun --ntasks-per-node=1 python -m megamoe.launch.health report --config C [--set K=V] \
       [--devices G] [--min-free-mem-gb X] [--min-free-disk-gb Y] [--disk-path DIR] > health.jsonl
  python -m megamoe.launch.health verdict health.jsonl --nodes "$SLURM_JOB_NODELIST"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

GIB = 2**30
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_hash() -> str:
    """Hash of every .py file of the megamoe package in use (catches a node on other code, git
    checkout or not)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, PACKAGE_DIR).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "-C", PACKAGE_DIR, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def config_hash(config: str, overrides: list[str]) -> str:
    from megamoe.config import config_to_dict, load_config

    text = json.dumps(config_to_dict(load_config(config, overrides)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def local_failures(devices: int, min_mem_gib: float, min_disk_gib: float, disk_path: str) -> list:
    """This node's failed checks, one phrase each (empty: healthy)."""
    import psutil

    failed = []
    if devices:
        import torch

        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if seen < devices:
            failed.append(f"devices: {seen} visible GPUs, {devices} expected (--devices)")
    mem = psutil.virtual_memory().available / GIB
    if mem < min_mem_gib:
        failed.append(f"free memory: {mem:.1f} GiB < {min_mem_gib:g} GiB (--min-free-mem-gb)")
    os.makedirs(disk_path, exist_ok=True)
    disk = shutil.disk_usage(disk_path).free / GIB
    if disk < min_disk_gib:
        failed.append(f"free disk: {disk:.1f} GiB under {disk_path} < {min_disk_gib:g} GiB "
                      "(--min-free-disk-gb)")
    return failed


def report(args) -> int:
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    record = {"node": node, "failed": local_failures(args.devices, args.min_free_mem_gb,
                                                       args.min_free_disk_gb, args.disk_path),
              "source": source_hash(), "git": git_revision()}
    try:
        record["config"] = config_hash(args.config, args.overrides)
    except ValueError as exc:   # ConfigError: the same on every node, reported once
        record["failed"].append(f"config: {exc}")
        record["config"] = None
    print(json.dumps(record), flush=True)
    return 0


def verdict(records: list[dict], nodes: list[str]) -> str | None:
    """The first failure as one line, or None when every node reported healthy and alike."""
    by_node = {r["node"]: r for r in records}
    for node in nodes:
        if node not in by_node:
            return f"health check failed on node {node}: no report (see its log)"
    for node in nodes:
        if by_node[node]["failed"]:
            return f"health check failed on node {node}: {by_node[node]['failed'][0]}"
    first = by_node[nodes[0]]
    for node in nodes[1:]:
        for key, what in (("source", "megamoe source hash"), ("config", "config hash")):
            if by_node[node][key] != first[key]:
                return (f"health check failed on node {node}: {what} {by_node[node][key]} "
                        f"differs from node {nodes[0]}'s {first[key]}")
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megamoe.launch.health")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="check this node; print one JSON line")
    rep.add_argument("--config", required=True)
    rep.add_argument("--set", dest="overrides", action="append", default=[])
    rep.add_argument("--devices", type=int, default=0, help="GPUs that must be visible")
    rep.add_argument("--min-free-mem-gb", type=float, default=0.0)
    rep.add_argument("--min-free-disk-gb", type=float, default=0.0)
    rep.add_argument("--disk-path", default=".", help="where checkpoints go")
    ver = sub.add_parser("verdict", help="compare the nodes' reports; exit 1 on a failure")
    ver.add_argument("reports", help="file of JSON lines from `report`")
    ver.add_argument("--nodes", required=True, help="Slurm host list, e.g. n[1-2]")
    args = parser.parse_args(argv)
    if args.command == "report":
        return report(args)
    from megamoe.launch.rendezvous import expand_hostlist

    with open(args.reports) as f:
        records = [json.loads(line) for line in f if line.startswith("{")]
    line = verdict(records, expand_hostlist(args.nodes))
    if line is not None:
        print(f"megamoe: error: {line}", file=sys.stderr)
        return 1
    print(f"[megamoe] health check passed on {len(records)} nodes (source "
          f"{records[0]['source']}, config {records[0]['config']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
