"""Causality probe (DESIGN.md): perturb token t+1 and check the outputs up to t are unchanged.
Dropless top-k routing passes; capacity dropping (tokens compete for expert slots across the
micro-batch) fails the probe, which is why it is refused in a causal decoder without opt-in."""

import pytest
import torch

from megamoe.testing.parity import TINY_VOCAB, tiny_config
from megamoe.testing.pool import run_distributed


def probe_task(overrides, t: int = 7):
    from megamoe.training.engine import build_engine

    cfg = tiny_config(["parallel.world_size=1", *overrides])
    model = build_engine(cfg, TINY_VOCAB, torch.device("cpu"), with_optimizer=False,
                         ddp=False).modules[0]
    model.eval()
    S = cfg.model.seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY_VOCAB, (4, S), generator=g)
    changed = tokens.clone()
    changed[:, t + 1:] = torch.randint(0, TINY_VOCAB, (4, S - t - 1), generator=g)
    pos = torch.arange(S).expand(4, S)
    with torch.no_grad():
        a = model(tokens, pos, None)
        b = model(changed, pos, None)
    return (a[:, :t + 1] - b[:, :t + 1]).abs().max().item(), (a - b).abs().max().item()


@pytest.mark.timeout(300)
def test_dropless_topk_is_causal():
    prefix_diff, total_diff = run_distributed(probe_task, 1, [])[0]
    assert total_diff > 1e-3          # the perturbation reaches later positions
    assert prefix_diff < 1e-6


@pytest.mark.timeout(300)
def test_capacity_dropping_fails_the_probe():
    prefix_diff, _ = run_distributed(probe_task, 1, ["model.moe.capacity_factor=0.5",
                                                      "model.moe.allow_non_causal=true"])[0]
    assert prefix_diff > 1e-6


def test_non_causal_router_is_refused_without_opt_in():
    from megamoe.moe.routers import check_router_causality

    cfg = tiny_config(["model.moe.capacity_factor=1.0"])
    with pytest.raises(ValueError, match="model.moe.router.*allow_non_causal"):
        check_router_causality(cfg)
    check_router_causality(tiny_config(["model.moe.capacity_factor=1.0",
                                        "model.moe.allow_non_causal=true"]))
    check_router_causality(tiny_config())
