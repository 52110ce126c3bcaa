"""The transformers range of setup.py's `hf` extra, tested at both ends: the installed release
lies in the range, and the remote code (model_type "megamoe") runs under it and under the
range's floor. The floor is installed once (`pip install --no-deps --target`, cached under
.pytest_cache) and put first on PYTHONPATH of a subprocess running
megamoe/testing/hf_generate.py; 5.18 is the oldest release that accepts the newest one's
huggingface-hub, tokenizers and safetensors, so its wheel alone is enough.

Two folders: a remote-code MoE model that decodes with a KV cache (sigmoid scores, QK-norm,
gated shared expert) and a Mixture-of-Recursions model (no KV cache, every step recomputes).
Under each release greedy `generate` equals recomputing the whole prefix for prompt batches of
1, 4 and 8, and the logits equal megamoe's within 1e-4. (transformers 5.24 passes the cache to
`forward` as `cache` instead of `past_key_values`: code that reads only the old name decodes
every new token without its prefix.)
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from packaging.version import Version

from megamoe.testing import hf_generate
from megamoe.testing.hf import (
    TOL, build_tiny, export_engine, megamoe_logits_BSV, randomize, sample_tokens_BS,
)
from megamoe.testing.parity import TINY_VOCAB
from megamoe.testing.pool import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = {
    "kv_cache": ["model.qk_layernorm=true", "model.moe.score_function=sigmoid",
                 "model.moe.shared_expert_ffn_hidden_size=32",
                 "model.moe.shared_expert_gate=true"],
    "mor": ["model.mor.enabled=true", "model.mor.num_recursions=3", "model.num_layers=8",
            "model.mor.router=token"],
}


def hf_range() -> tuple[str, str]:
    """(floor, cap) of `transformers>=floor,<cap` in setup.py's `hf` extra."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        match = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', f.read())
    assert match, "setup.py: no transformers>=X,<Y in the hf extra"
    return match.group(1), match.group(2)


def export_task(root):
    """Export every model of MODELS with random weights; folder → its reference file
    (tokens and megamoe's logits)."""
    folders = {}
    for name, overrides in MODELS.items():
        cfg, engine = build_tiny(overrides)
        randomize(engine)
        out = os.path.join(root, name)
        export_engine(engine, cfg, out)
        tokens_BS = sample_tokens_BS(TINY_VOCAB)
        ref = os.path.join(root, f"{name}.pt")
        torch.save({"tokens": tokens_BS, "logits": megamoe_logits_BSV(engine, tokens_BS)}, ref)
        folders[out] = ref
    return folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return run_distributed(export_task, 1, str(tmp_path_factory.mktemp("range")))[0]


def release_site(request, version: str) -> str:
    """A directory holding transformers `version` (its wheel only), installed on first use."""
    cache = request.config.cache
    base = (cache.mkdir(f"transformers-{version}") if cache is not None
            else request.getfixturevalue("tmp_path_factory").mktemp("transformers"))
    site = os.path.join(base, "site")
    if not os.path.exists(os.path.join(site, "transformers", "__init__.py")):
        partial = site + ".partial"              # renamed once complete
        shutil.rmtree(partial, ignore_errors=True)
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                              "--disable-pip-version-check", "--target", partial,
                              f"transformers=={version}"], capture_output=True, text=True)
        assert pip.returncode == 0, pip.stderr[-2000:]
        shutil.rmtree(site, ignore_errors=True)
        os.replace(partial, site)
    return site


def run_checks(folders: dict, site: str | None) -> dict:
    """hf_generate's checks of every folder, as the JSON it prints: in this process (site
    None), else in a subprocess with `site` first on PYTHONPATH."""
    if site is None:
        import transformers

        return json.loads(json.dumps({
            "transformers": transformers.__version__,
            "folders": {f: hf_generate.check_folder(f, ref) for f, ref in folders.items()}}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (site, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, hf_generate.__file__,
                           *(f"{f}={ref}" for f, ref in folders.items())],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_installed_transformers_is_inside_the_range():
    import transformers

    floor, cap = hf_range()
    assert Version(floor) <= Version(transformers.__version__) < Version(cap), \
        (transformers.__version__, floor, cap)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("release", ["installed", "floor"])
def test_remote_code_generates_and_matches_megamoe(release, folders, request):
    import transformers

    floor, _ = hf_range()
    want = Version(floor if release == "floor" else transformers.__version__)
    other = want != Version(transformers.__version__)
    result = run_checks(folders, release_site(request, floor) if other else None)
    assert Version(result["transformers"]) == want
    for folder, r in result["folders"].items():
        assert r["logits_err"] < TOL, (folder, r)
        assert r["greedy"] == {str(B): True for B in hf_generate.BATCHES}, (folder, r)
