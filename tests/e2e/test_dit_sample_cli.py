"""`megamoe sample` end to end (issue 15 item 6): a tiny dit run trained for 2 steps, sampled
from the command line into a labelled grid PNG with the JSON line last; and each bad request as
one error naming the flag — --labels (not a class, out of range), --steps ≤ 0 (or more than a
DDPM run's training steps), a negative --cfg-scale, a run of another family (model.family), a
checkpoint without EMA weights (RUN) — raised before any model is built (the error cases run in
this process)."""

import json
import os
import pickle
import shutil

import pytest

TINY = ["--config", "configs/dit_dit_moe.yaml", "--set", "parallel.world_size=1",
        "--set", "parallel.expert=1", "--set", "train.steps=2", "--set", "train.warmup_steps=1",
        "--set", "train.eval_interval=0", "--set", "train.eval_iters=1",
        "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=4",
        "--set", "run.tensorboard=false", "--set", "data.image_size=16",
        "--set", "data.num_classes=6", "--set", "model.num_layers=2",
        "--set", "model.hidden_size=32", "--set", "model.ffn_hidden_size=128",
        "--set", "model.moe.num_experts=4", "--set", "model.moe.ffn_hidden_size=32",
        "--set", "model.moe.shared_expert_ffn_hidden_size=64",
        "--set", "model.dit.frequency_embedding_size=32"]


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    from conftest import megamoe

    run = tmp_path_factory.mktemp("dit") / "run"
    out = megamoe("train", *TINY, "--set", f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    return run


@pytest.mark.timeout(600)
def test_sample_writes_the_grid_and_the_json_line(cli, dit_run, tmp_path):
    from PIL import Image

    grid = tmp_path / "grid.png"
    out = cli("sample", str(dit_run), "--labels", "0,3,red_star", "--steps", "3",
              "--cfg-scale", "2", "--seed", "1", "--out", str(grid))
    assert out.returncode == 0, out.stderr[-2000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["path"] == str(grid) and line["labels"] == [0, 3, 5]
    assert (line["steps"], line["cfg_scale"], line["seed"]) == (3, 2.0, 1)
    assert line["seconds"] > 0 and line["weights"] == "ema"
    assert "sampling 3 images" in out.stderr and "3/3" in out.stderr     # the progress bar
    with Image.open(grid) as image:
        assert image.width > 3 * 96 and image.height > 96


def _sample(argv, capsys):
    """`megamoe sample ARGV` in this process: (exit code, last stderr line)."""
    from megamoe.cli import build_parser, cmd_sample

    code = cmd_sample(build_parser().parse_args(["sample", *argv]))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def _without_ema(step_dir, dest):
    """A copy of the checkpoint whose storage index lists no `ema.*` tensor (as one saved
    without the EMA), its recorded file size updated."""
    shutil.copytree(step_dir, dest)
    path = os.path.join(dest, ".metadata")
    with open(path, "rb") as f:
        md = pickle.load(f)
    md.state_dict_metadata = {k: v for k, v in md.state_dict_metadata.items()
                              if not k.startswith("ema.")}
    md.storage_data = {k: v for k, v in md.storage_data.items() if not k.fqn.startswith("ema.")}
    with open(path, "wb") as f:
        pickle.dump(md, f)
    with open(os.path.join(dest, "meta.json")) as f:
        meta = json.load(f)
    meta["files"][".metadata"] = os.path.getsize(path)
    with open(os.path.join(dest, "meta.json"), "w") as f:
        json.dump(meta, f)
    return dest


def _with_config(step_dir, dest, source, overrides):
    """A copy of the checkpoint whose config.yaml is `source` (None: the defaults, an lm run)
    with `overrides`."""
    from megamoe.config import dump_config, load_config

    shutil.copytree(step_dir, dest)
    dump_config(load_config(source, ["parallel.world_size=1", *overrides]),
                os.path.join(dest, "config.yaml"))
    return dest


@pytest.mark.timeout(300)
def test_each_bad_request_is_one_error_naming_the_flag(dit_run, tmp_path, capsys):
    from megamoe.checkpoint.load import resolve

    step_dir = resolve(str(dit_run), log=lambda *_: None)
    run = str(dit_run)
    cases = [
        ([run, "--labels", "0,6"], "--labels: 6 is out of range (the run has 6 classes: 0..5)"),
        ([run, "--labels", "1,cat"], "--labels: 'cat' is neither a class index nor a class"),
        ([run, "--labels", "1.5"], "--labels: '1.5' is neither"),
        ([run, "--steps", "0"], "--steps=0: must be ≥ 1"),
        ([run, "--cfg-scale", "-0.5"], "--cfg-scale=-0.5: must be ≥ 0"),
        ([_with_config(step_dir, tmp_path / "lm", None, [])],
         "model.family 'lm': `megamoe sample`"),
        ([_with_config(step_dir, tmp_path / "ddpm", os.path.join(step_dir, "config.yaml"),
                       ["model.dit.objective=ddpm"]), "--steps", "1001"],
         "--steps=1001: a ddpm run samples in at most model.dit.num_train_timesteps = 1000"),
        ([_without_ema(step_dir, tmp_path / "no_ema")], "RUN "),
        ([str(tmp_path / "nothing")], f"{tmp_path / 'nothing'}: no complete checkpoint"),
    ]
    os.makedirs(tmp_path / "nothing")
    for argv, want in cases:
        code, line = _sample([*map(str, argv), "--out", str(tmp_path / "x.png")], capsys)
        assert code == 2, (argv, line)
        assert line.startswith(f"megamoe: error: {want}"), (argv, line)
    assert "has no EMA weights" in _sample([str(tmp_path / "no_ema")], capsys)[1]
    assert not os.path.exists(tmp_path / "x.png")
