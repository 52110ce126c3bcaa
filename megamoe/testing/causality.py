"""Causality probe (DESIGN.md): perturb the tokens after position t and measure how much the
model's outputs up to t move. A causal decoder with a causal router gives 0 (to rounding).
The routing context is the synthetic one of the config (`megamoe.data.synthetic_context`),
built per forward like the training step does."""

from __future__ import annotations

import torch

from megamoe.testing.parity import TINY_VOCAB, tiny_config


def probe_task(overrides=(), t: int = 7, train_mode: bool = False) -> tuple[float, float]:
    """(max |Δ output| at positions ≤ t, max |Δ output| anywhere) on one rank. `train_mode`
    probes the training-time routing (routers whose inference rule differs)."""
    from megamoe.models.lm.model import lm_context
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config(["parallel.world_size=1", *overrides])
    model = build_engine(cfg, TINY_VOCAB, torch.device("cpu"), with_optimizer=False,
                         ddp=False).modules[0]
    model.train(train_mode)
    S = cfg.model.seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY_VOCAB, (4, S), generator=g)
    changed = tokens.clone()
    changed[:, t + 1:] = torch.randint(0, TINY_VOCAB, (4, S - t - 1), generator=g)
    pos = torch.arange(S).expand(4, S)
    def forward(tokens_BS):
        # the same samples in both forwards: V-MoE's training noise is a function of them
        context = lm_context({"tokens": tokens_BS, "sample_index": torch.arange(4)}, cfg)
        return model(tokens_BS, pos, None, context=context)[..., :TINY_VOCAB]   # padded ids' logits: -inf

    with torch.no_grad():
        a, b = forward(tokens), forward(changed)
    return (a[:, :t + 1] - b[:, :t + 1]).abs().max().item(), (a - b).abs().max().item()
