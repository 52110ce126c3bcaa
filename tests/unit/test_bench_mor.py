"""tools/bench_mor.py: the block and the all-depths block side by side, one JSON line of
figures, the predicted ratio equal to the FLOP model's formula (papers.md §1.8) by hand."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H, FFN, S = 32, 128, 24
TINY = ["--hidden", str(H), "--ffn", str(FFN), "--heads", "2", "--seq", str(S), "--batch", "2",
        "--iters", "2", "--warmup", "1", "--gen-requests", "4", "--gen-len", "6",
        "--gen-batch", "2", "--gen-repeats", "1"]
KEYS = {"bench", "ratio", "predicted_ratio", "block_ms", "all_depths_ms", "router",
        "num_recursions", "kept_nominal", "kept_measured", "seq", "batch", "hidden", "device",
        "threads", "generation_tokens_per_s"}


def _bench(*extra):
    out = subprocess.run([sys.executable, "tools/bench_mor.py", *TINY, *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1", MEGAMOE_DEVICE="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, json.loads(out.stdout.strip().splitlines()[-1])


def by_hand(kept):
    """Σ_r (6·P·k_r + 6·h·d·k_r²) / (N_r · (6·P·S + 6·h·d·S²)), P = 4·D² + 3·D·ffn (q, k, v, o
    and SwiGLU weights), h·d = D."""
    P = 4 * H * H + 3 * H * FFN
    def flops(k):
        return 6 * P * k + 6 * H * k * k

    return sum(flops(k) for k in kept) / (len(kept) * flops(S))


@pytest.mark.timeout(120)
def test_expert_choice_bench_prints_measured_and_predicted_ratios():
    text, fig = _bench("--router", "expert")
    assert KEYS <= set(fig), KEYS - set(fig)
    assert fig["bench"] == "mor_block" and fig["device"] == "cpu" and fig["threads"] == 1
    assert (fig["seq"], fig["batch"], fig["hidden"], fig["num_recursions"]) == (S, 2, H, 3)
    assert fig["ratio"] == pytest.approx(fig["block_ms"] / fig["all_depths_ms"])
    assert fig["ratio"] > 0
    # C = 1, 2/3, 1/3 at S = 24: k = 24, 16, 8, and the block really kept those
    assert fig["kept_nominal"] == [24, 16, 8] == fig["kept_measured"]
    assert fig["predicted_ratio"] == pytest.approx(by_hand([24, 16, 8]), rel=1e-12)
    # control: a linear-only model (Σ k_r / N_r·S = 2/3) would not pass the check above
    assert abs(fig["predicted_ratio"] - 2 / 3) > 1e-3
    gen = fig["generation"]
    assert gen["requests"] == 4 and gen["max_batch"] == 2
    assert gen["same_tokens"] is True and "same tokens: yes" in text
    assert gen["depth_tokens_per_s"] > 0 and gen["sequence_tokens_per_s"] > 0
    assert fig["generation_ratio"] == pytest.approx(
        gen["depth_tokens_per_s"] / gen["sequence_tokens_per_s"])
    assert fig["generation_tokens_per_s"] == {"depth": gen["depth_tokens_per_s"],
                                              "sequence": gen["sequence_tokens_per_s"]}
    # the untrained router exits tokens at different depths: between 1 and N_r steps
    assert 1 <= gen["mean_steps_per_token"] <= 3


@pytest.mark.timeout(120)
def test_token_choice_baseline_runs_every_token_at_every_depth():
    text, fig = _bench("--router", "token", "--gen-requests", "0")
    assert fig["router"] == "token"
    assert fig["generation"] is None and "generation: skipped" in text
    assert fig["kept_all_depths"] == [S, S, S]
    # the block's router spreads depths: fewer tokens at the last step than at the first
    assert fig["kept_measured"][0] == S and fig["kept_measured"][-1] < S
    assert fig["predicted_ratio"] == pytest.approx(by_hand([S, 2 * S / 3, S / 3]), rel=1e-12)
