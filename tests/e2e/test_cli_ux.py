"""What a Megatron or torchtitan user looks for first: `--version`, a usage error without a
command, `megamoe config` (every key with its default), and recipes that ship with the package
(`megamoe train --config race` from any directory, also from a built wheel)."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_no_command_is_a_usage_error(cli):
    out = cli(timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("usage: megamoe")
    assert out.stderr.splitlines()[-1].startswith("megamoe: error: a command is required")


def test_version(cli):
    out = cli("--version", timeout=120)
    assert out.returncode == 0
    assert out.stdout.startswith("megamoe 0.1.0 (torch ") and "megatron-core 0.16" in out.stdout


def test_train_help_points_to_config_and_recipes(cli):
    out = cli("train", "--help", timeout=120)
    assert out.returncode == 0
    assert "megamoe config" in out.stdout and "megamoe recipes" in out.stdout


def test_config_lists_every_key_with_its_default(cli, tmp_path):
    out = cli("config", timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {ln.split()[0]: ln.split(None, 3)[1:] for ln in out.stdout.splitlines()
            if ln.startswith("  ") and not ln.startswith("  KEY")}
    assert rows["train.lr"][:2] == ["0.003", "float"]
    assert rows["train.resume"][:2] == ["auto", "str"]
    assert rows["model.family"][:2] == ["lm", "str"] and "one of: lm" in rows["model.family"][2]
    assert "model.moe.vmoe.priority" in rows and "data.synthetic_timesteps" in rows
    assert len(rows) > 120


def test_config_shows_a_recipe_resolved(cli, tmp_path):
    out = cli("config", "model.moe", "--config", "race", "--changed", timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    keys = [ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("* ")]
    assert keys == ["model.moe.router", "model.moe.aux_loss_coeff", "model.moe.allow_non_causal"]


def test_recipes_are_listed_and_trainable_by_name_outside_the_repo(cli, tmp_path):
    out = cli("recipes", timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    names = [ln.split()[0] for ln in out.stdout.splitlines() if ln and ln[0] != " "]
    assert {"quickstart", "race", "vmoe"} <= set(names)
    out = cli("train", "--config", "race", "--dry-run", "--set", f"run.dir={tmp_path}/run",
              timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "router: race" in out.stdout and "defaults" not in out.stdout   # fully resolved


def test_unknown_recipe_is_one_line_listing_the_recipes(cli, tmp_path):
    out = cli("train", "--config", "rcae", timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megamoe: error: rcae: config file not found")
    assert "quickstart, race" in lines[0]


@pytest.mark.timeout(300)
def test_a_built_wheel_carries_the_recipes(tmp_path):
    """The wheel holds every configs/*.yaml under megamoe/recipes (megamoe/recipes is a symlink
    in the repository), and megamoe installed from it loads a recipe by name."""
    # built offline with this environment's setuptools (>= 70.1 builds wheels itself)
    pytest.importorskip("setuptools.command.bdist_wheel", reason="needs setuptools >= 70.1")
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "megamoe"), src / "megamoe", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "configs"), src / "configs")
    shutil.copy(os.path.join(ROOT, "setup.py"), src)
    assert os.path.islink(src / "megamoe" / "recipes")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist")], check=True, timeout=240)
    (wheel,) = (tmp_path / "dist").glob("megamoe-*.whl")
    recipes = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("megamoe/recipes/")}
    configs = pathlib.Path(ROOT, "configs")       # recipes and their fragments in subfolders
    assert recipes == {f"megamoe/recipes/{p.relative_to(configs)}"
                       for p in configs.rglob("*.yaml")}
    assert any("/models/" in n for n in recipes)
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=240)
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "megamoe", "recipes"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and f"in {site}/megamoe/recipes;" in out.stdout, out.stderr
    assert "race " in out.stdout and "tiny_moe" not in out.stdout      # fragments are not recipes
    out = subprocess.run([sys.executable, "-m", "megamoe", "config", "model.moe.router",
                          "--config", "vmoe"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)   # load_config, as `train --config vmoe` does
    assert out.returncode == 0 and "* model.moe.router  vmoe " in out.stdout, out.stderr
