"""MoR depth statistics in a training run (configs/mor_{expert,token}.yaml, 2 gloo ranks, EP2):
every step's metrics.jsonl record holds the kept share per recursion step and a histogram of
tokens per depth that sums to the global batch's tokens; TensorBoard gets `mor/depth` and
`mor/kept_step_r`. Expert-choice counts are checked by hand (k_r = int(C_r·S) per sequence);
the FLOPs split by recursion step sums to the model's FLOPs per token, and every step logs the
FLOPs per token (in total and per recursion step) of the depths it really ran."""

import glob
import os

import pytest

from megamoe.testing.pool import run_distributed
from megamoe.testing.recipes import train_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, S, GLOBAL_BATCH = 3, 32, 8
TOKENS = S * GLOBAL_BATCH


OVERRIDES = [f"model.seq_length={S}", "train.micro_batch_size=4",
             f"train.global_batch_size={GLOBAL_BATCH}", f"train.steps={STEPS}",
             "train.warmup_steps=1", "train.eval_iters=0", "train.resume=none",
             "run.tensorboard=true", "run.log_interval=1000"]


def train_mor(router: str, run_dir: str, layout=()) -> list[dict]:
    """metrics.jsonl step records of a short run of the router's recipe."""
    path = os.path.join(ROOT, "configs", f"mor_{router}.yaml")
    return run_distributed(train_recipe, 2, path, OVERRIDES + list(layout), run_dir)[0][1]


def tensorboard_tags(run_dir: str) -> tuple[set, set]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (path,) = glob.glob(os.path.join(run_dir, "tensorboard", "events.*"))
    acc = EventAccumulator(path, size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags["scalars"]), {t: acc.Histograms(t) for t in tags["histograms"]}


# PP2: only stage 0 holds the recursion block (stages [first, block] | [last])
LAYOUTS = {"ep2": [], "pp2": ["parallel.expert=1", "parallel.pipeline=2"]}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("router,layout", [("expert", "ep2"), ("token", "ep2"),
                                           ("expert", "pp2")])
def test_mor_depth_statistics_are_logged(router, layout, tmp_path):
    records = train_mor(router, str(tmp_path), LAYOUTS[layout])
    assert len(records) == STEPS
    for rec in records:
        depth = rec["mor/depth"]                          # tokens of depth 0..N_r
        assert len(depth) == 4 and sum(depth) == TOKENS, depth
        kept = [rec[f"mor/kept_step_{r}"] for r in (1, 2, 3)]
        # tokens with depth ≥ r = the share kept at step r
        assert [sum(depth[r:]) for r in (1, 2, 3)] == [round(k * TOKENS) for k in kept]
        if router == "expert":
            # C = 1, 2/3, 1/3 at S = 32: k = 32, 21, 10 per sequence, 8 sequences
            assert depth == [0, 8 * 11, 8 * 11, 8 * 10], depth
            assert 0 <= rec["mor/sampling_acc_step_1"] <= 1
        else:
            assert depth[0] == 0 and rec["mor/kept_step_1"] == 1.0
    # measured FLOPs per token: the FLOP model with the measured shares per step
    from megamoe.config import load_config
    from megamoe.mor.accounting import mor_flops_by_step
    from megamoe.models.accounting import flops_per_token

    cfg = load_config(os.path.join(ROOT, "configs", f"mor_{router}.yaml"),
                      OVERRIDES + list(LAYOUTS[layout]))
    nominal = flops_per_token(cfg, 64)
    for rec in records:
        kept = [rec[f"mor/kept_step_{r}"] for r in (1, 2, 3)]
        parts = mor_flops_by_step(cfg, 64, fractions=kept)
        assert rec["mor/flops_per_token"] == pytest.approx(sum(parts.values()), rel=1e-12)
        assert [rec[f"mor/flops_per_token_step_{r}"] for r in (1, 2, 3)] == pytest.approx(
            [parts[f"step {r}"] for r in (1, 2, 3)], rel=1e-12)
        if router == "expert":          # top-k keeps exactly the nominal k_r
            assert rec["mor/flops_per_token"] == pytest.approx(nominal, rel=1e-12)
    if router == "token":               # control: real depths are not the perfect balance
        assert any(abs(r["mor/flops_per_token"] / nominal - 1) > 1e-3 for r in records)
    scalars, histograms = tensorboard_tags(str(tmp_path))
    assert {"mor/kept_step_1", "mor/kept_step_2", "mor/kept_step_3",
            "mor/flops_per_token", "mor/flops_per_token_step_3"} <= scalars
    (last,) = [h for h in histograms["mor/depth"] if h.step == STEPS]
    assert last.histogram_value.num == TOKENS
    assert list(last.histogram_value.bucket) == records[-1]["mor/depth"]


def test_flops_by_recursion_step_sum_to_flops_per_token():
    from megamoe.config import load_config
    from megamoe.mor.accounting import mor_flops_by_step, step_kept
    from megamoe.models.accounting import flops_per_token

    cfg = load_config(os.path.join(ROOT, "configs", "mor_expert.yaml"), [])
    parts = mor_flops_by_step(cfg, 64)
    assert sum(parts.values()) == pytest.approx(flops_per_token(cfg, 64))
    assert step_kept(cfg) == [64, 42, 21]
    # control: deeper steps keep fewer tokens, so they cost less
    assert parts["step 1"] > parts["step 2"] > parts["step 3"] > 0
