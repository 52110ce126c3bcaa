"""`megamoe submit` without a cluster: the config is checked at the allocation's world size
before sbatch is called, the rendered script carries the allocation and the arguments, and the
health-check verdict names the first failing node and check."""

import subprocess

import pytest

from megamoe.commands import submit as S
from megamoe.launch.health import verdict

QUICKSTART = "configs/lm_quickstart.yaml"


@pytest.fixture
def sbatch_calls(monkeypatch):
    """subprocess.run recorded; sbatch answers job id 123."""
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs.get("input")))
        return subprocess.CompletedProcess(cmd, 0, stdout="123\n", stderr="")

    monkeypatch.setattr(S.subprocess, "run", fake_run)
    return calls


def test_dry_run_renders_4_nodes_x_8_gpus(sbatch_calls, capsys):
    req = S.Request(QUICKSTART, nodes=4, gpus_per_node=8, partition="gpu", time="12:00:00",
                    overrides=["train.global_batch_size=64"])
    assert S.submit(req, dry_run=True) == 0
    script = capsys.readouterr().out
    assert not sbatch_calls
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue"):
        assert line in script.splitlines(), line
    assert script.count("#SBATCH --nodes=") == 1 and script.count("#SBATCH --time=") == 1
    assert "--set train.global_batch_size=64 --set parallel.world_size=32" in script
    assert "--kill-on-bad-exit=1" in script and "scontrol requeue" in script


def test_a_config_wrong_for_the_world_size_is_refused_before_sbatch(sbatch_calls):
    req = S.Request(QUICKSTART, nodes=4, gpus_per_node=8)   # 16 sequences over DP 16 x 4
    with pytest.raises(ValueError, match="train.global_batch_size: 16 is not divisible"):
        S.submit(req)
    with pytest.raises(ValueError, match="--nodes: parallel.world_size=4 ranks do not spread "
                                         "evenly over 3 nodes"):
        S.submit(S.Request(QUICKSTART, nodes=3))
    assert not sbatch_calls


def test_submit_queues_the_rendered_script_and_names_job_and_logs(sbatch_calls, capsys,
                                                                  tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    req = S.Request(S.os.path.join(S.ROOT, QUICKSTART), nodes=2, min_free_disk_gb=50)
    assert S.submit(req) == 0
    (cmd, script), = sbatch_calls
    assert cmd == ["sbatch", "--parsable"]
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --gpus-per-node" not in script
    assert "export MEGAMOE_MIN_FREE_DISK_GB=50" in script
    out = capsys.readouterr().out
    assert out.startswith("submitted job 123: 2 nodes x 2 ranks; log logs/lm_quickstart-123.out")
    assert (tmp_path / "logs").is_dir()


def _node(name, failed=(), source="s1", config="c1"):
    return {"node": name, "failed": list(failed), "source": source, "config": config}


def test_health_verdict_names_the_first_failing_node_and_check():
    nodes = ["n1", "n2"]
    assert verdict([_node("n1"), _node("n2")], nodes) is None
    assert verdict([_node("n1")], nodes) == "health check failed on node n2: no report " \
                                            "(see its log)"
    assert verdict([_node("n1"), _node("n2", ["free disk: 1.0 GiB under runs < 10 GiB"])],
                   nodes) == "health check failed on node n2: free disk: 1.0 GiB under runs " \
                             "< 10 GiB"
    assert verdict([_node("n1"), _node("n2", config="c2")], nodes) == \
        "health check failed on node n2: config hash c2 differs from node n1's c1"
    assert "megamoe source hash s2" in verdict([_node("n1"), _node("n2", source="s2")], nodes)
