"""tools/inspect_checkpoint.py reports step, layout, tensors and loadable layouts."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tools.inspect_checkpoint import main as inspect_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(300)
def test_inspect_reports_tensors_and_layouts(trained_run):
    res = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", str(trained_run),
                          "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["meta"]["step"] == 4 and info["meta"]["world_size"] == 2
    keys = {t["key"]: t["shape"] for t in info["tensors"]}
    assert keys["decoder.layers.mlp.router.weight"] == [4, 4, 64]
    assert any(k.startswith("optimizer.exp_avg.") for k in keys)
    layouts = {(c["world"], c["TP"], c["PP"], c["EP"]) for c in info["loadable"]}
    assert {(1, 1, 1, 1), (4, 1, 1, 4), (4, 2, 1, 2)} <= layouts
    assert (2, 1, 1, 3) not in layouts      # 4 experts do not split over EP3
    bad = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", str(trained_run / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such checkpoint directory" in bad.stderr


@pytest.mark.parametrize("damage", ["truncate", "resize_common"])
def test_damaged_checkpoint_is_reported_not_loadable(trained_run, tmp_path, capsys, damage):
    """A truncated tensor file (caught by the storage index even without the sizes meta.json
    records) or any file whose size changed since the save is named, with exit 2."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    step = run / "checkpoints" / "step_0000004"
    if damage == "truncate":
        meta = json.loads((step / "meta.json").read_text())
        meta.pop("files", None)      # as saved by an older megamoe: the storage index still tells
        (step / "meta.json").write_text(json.dumps(meta))
        os.truncate(step / "__0_0.distcp", 1000)
        expect = "__0_0.distcp is truncated (1,000 bytes"
    else:
        with open(step / "common.pt", "ab") as f:
            f.write(b"\0")
        expect = "common.pt has"
    assert inspect_main([str(run), "--json"]) == 2
    err = capsys.readouterr().err
    assert "step_0000004: damaged, not loadable" in err and expect in err, err
