"""Rank discovery under nested launchers (megamoe.launch.env): the innermost launcher wins, and
each mis-set environment is refused with one line naming its variables. The environments are
the ones the launchers really set (recorded on the local Slurm cluster and under mpirun)."""

import pytest
import torch

from megamoe.launch import env as E
from megamoe.launch.rendezvous import expand_hostlist, slurm_port

SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2"}
# the batch shell of a 2-node x 2-task job: SLURM_PROCID=0 but no step, so no rank
BATCH = dict(SLURM_JOB, SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_LOCALID="0")
SRUN_TASK_3 = dict(BATCH, SLURM_STEP_ID="0", SLURM_PROCID="3", SLURM_LOCALID="1",
                   SLURM_STEP_NODELIST="n[1-2]", SLURM_STEP_NUM_NODES="2")
# mpirun -np 4 inside that allocation: its ranks carry the orted step's Slurm variables
MPIRUN_IN_ALLOC_3 = dict(SLURM_JOB, SLURM_STEP_ID="1", SLURM_PROCID="1", SLURM_NTASKS="2",
                         OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="4",
                         OMPI_COMM_WORLD_LOCAL_RANK="1", OMPI_COMM_WORLD_LOCAL_SIZE="2",
                         PMIX_RANK="3")
TORCHRUN_IN_SRUN_5 = dict(SRUN_TASK_3, SLURM_PROCID="1", SLURM_NTASKS="2", RANK="5",
                          WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4",
                          TORCHELASTIC_RUN_ID="4242", MASTER_ADDR="n1", MASTER_PORT="14242")
DEEPSPEED_5 = dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", CROSS_RANK="1", CROSS_SIZE="2",
                   LOCAL_SIZE="4", MASTER_ADDR="n1", MASTER_PORT="29500")


def test_the_batch_shell_is_no_rank():
    assert E.discover_rank(BATCH) is None
    assert E.discover_rank({}) is None


def test_srun_task_rendezvous_from_the_node_list_and_job_id():
    info = E.discover_rank(SRUN_TASK_3)
    assert (info.rank, info.world_size, info.local_rank, info.source) == (3, 4, 1, "slurm")
    assert (info.master_addr, info.master_port) == ("n1", slurm_port("4242"))
    assert slurm_port("4242") != slurm_port("4243")
    pmix = E.discover_rank(dict(SRUN_TASK_3, PMIX_RANK="3"))
    assert pmix.source == "slurm-pmix" and pmix.rank == 3


def test_innermost_launcher_wins():
    mpi = E.discover_rank(MPIRUN_IN_ALLOC_3, mpi4py_available=True)
    assert (mpi.rank, mpi.world_size, mpi.local_rank, mpi.source) == (3, 4, 1, "openmpi")
    assert mpi.master_addr is None            # rank 0 shares it through mpi4py
    tr = E.discover_rank(TORCHRUN_IN_SRUN_5)
    assert (tr.rank, tr.world_size, tr.local_rank, tr.source) == (5, 8, 1, "torchrun")
    assert (tr.master_addr, tr.master_port) == ("n1", 14242)
    ds = E.discover_rank(DEEPSPEED_5)
    assert (ds.rank, ds.world_size, ds.source) == (5, 8, "deepspeed")
    single = E.discover_rank({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
                              "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, mpi4py_available=False)
    assert single.master_addr == "127.0.0.1"  # one node: loopback is right


MIS_SET = {
    "two sources disagree (mpirun)": (
        dict(MPIRUN_IN_ALLOC_3, PMIX_RANK="2"),
        "OMPI_COMM_WORLD_RANK=3 but PMIX_RANK=2: two launchers' variables disagree"),
    "two sources disagree (srun --mpi=pmix)": (
        dict(SRUN_TASK_3, PMIX_RANK="0"),
        "SLURM_PROCID=3 but PMIX_RANK=0: two launchers' variables disagree"),
    "deepspeed launcher's own variables disagree": (
        dict(DEEPSPEED_5, CROSS_RANK="0"),
        "RANK=5 but CROSS_RANK*LOCAL_SIZE+LOCAL_RANK=1"),
    "incomplete set": (
        {"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
    "rank outside the world": (
        dict(SRUN_TASK_3, SLURM_PROCID="4"), "SLURM_PROCID=4 with SLURM_NTASKS=4: the rank is "
                                            "outside the world"),
    "not an integer": (
        dict(SRUN_TASK_3, SLURM_NTASKS="four"), "SLURM_NTASKS='four' is not an integer"),
    "missing MASTER_ADDR across nodes (mpirun, no mpi4py)": (
        MPIRUN_IN_ALLOC_3, "MASTER_ADDR is not set and the 4 ranks (openmpi) may span several "
                           "nodes"),
    "missing MASTER_ADDR across nodes (RANK/WORLD_SIZE by hand)": (
        {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"},
        "MASTER_ADDR is not set and the 4 ranks (env) may span several nodes"),
    "missing MASTER_ADDR across nodes (srun without a node list)": (
        {k: v for k, v in SRUN_TASK_3.items() if "NODELIST" not in k},
        "MASTER_ADDR is not set and the 4 ranks (slurm) may span several nodes"),
}


@pytest.mark.parametrize("case", sorted(MIS_SET))
def test_each_mis_set_environment_gives_one_error_line(case):
    environ, expected = MIS_SET[case]
    with pytest.raises(E.LaunchError) as err:
        E.discover_rank(environ, mpi4py_available=False)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    print(f"{case}: {message}")


def test_world_size_from_the_environment_must_be_the_configs():
    info = E.discover_rank(SRUN_TASK_3)
    E.check_world_size(info, 4)
    with pytest.raises(E.LaunchError, match=r"^parallel.world_size: 8 but the launcher started "
                                            r"4 ranks \(slurm\)$"):
        E.check_world_size(info, 8)


@pytest.mark.parametrize("nodelist,hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("gpu[08-10,12],login1", ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
])
def test_hostlist_parser_matches_scontrol(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def test_hostlist_parser_refuses_garbage():
    with pytest.raises(ValueError, match="unbalanced"):
        expand_hostlist("n[1-2")


def test_one_visible_device_per_task_is_used_whatever_the_local_rank(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1])
    monkeypatch.delenv("MEGAMOE_DEVICE", raising=False)
    assert E.select_device(3) == (torch.device("cuda", 0), "nccl")


def test_host_collectives_use_the_backends_device(monkeypatch):
    assert E.collective_device() == torch.device("cpu")      # no process group: host
    monkeypatch.setattr(E.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(E.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert E.collective_device() == torch.device("cuda", 2)
    monkeypatch.setattr(E.dist, "get_backend", lambda: "gloo")
    assert E.collective_device() == torch.device("cpu")


def test_cpu_ranks_share_the_nodes_cores_unless_told_otherwise():
    """N CPU ranks on a node get cores/N intra-op threads each (oversubscribed, 2 ranks x 2 threads
    on 2 cores ran the tiny ViT 3x slower); OMP_NUM_THREADS and a rank's own binding win."""
    from megamoe.launch.env import RankInfo, cpu_threads

    two_local = RankInfo(0, 2, 0, "env", local_size=2)
    assert cpu_threads(two_local, {}, affinity=2, node_cpus=2) == 1
    assert cpu_threads(two_local, {}, affinity=16, node_cpus=16) == 8
    assert cpu_threads(RankInfo(0, 3, 0, "env", local_size=3), {}, 16, 16) == 5
    assert cpu_threads(RankInfo(0, 4, 0, "env", local_size=4), {}, 2, 2) == 1   # never 0
    assert cpu_threads(RankInfo(0, 1, 0, "env", local_size=1), {}, 2, 2) == 2
    # one rank of 8 on a 2-node job whose local size is unknown: as if all shared this node
    assert cpu_threads(RankInfo(5, 8, 1, "slurm"), {}, 16, 16) == 2
    # srun --cpus-per-task=4 bound this task to 4 of the node's 16 cores: all 4 are its own
    assert cpu_threads(RankInfo(5, 8, 1, "slurm", local_size=4), {}, 4, 16) == 4
    assert cpu_threads(two_local, {"OMP_NUM_THREADS": "3"}, 2, 2) is None   # the user's choice


def _exit_unless_local_world_size(expected: int) -> None:
    import os

    if os.environ.get("LOCAL_WORLD_SIZE") != str(expected):
        raise SystemExit(7)


def test_locally_spawned_ranks_know_how_many_share_the_node():
    from megamoe.launch.spawn import spawn_local

    assert spawn_local(2, _exit_unless_local_world_size, (2,)).failure is None
    failed = spawn_local(1, _exit_unless_local_world_size, (2,)).failure   # the control
    assert failed is not None and failed.message == "SystemExit: 7"
    info = E.discover_rank({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": "29500"})
    assert info.local_size == 2
