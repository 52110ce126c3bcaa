"""Causality probe (DESIGN.md): perturb the tokens after position t and measure how much the
model's outputs up to t move. A causal decoder with a causal router gives 0 (to rounding).
Batch-independence probe: a sample's outputs alone against its outputs inside a batch of 4
(0 for routers that decide per token or per sequence). The routing context is the synthetic one
of the config (`megamoe.data.synthetic_context`), built per forward like the training step
does."""

from __future__ import annotations

import torch

from megamoe.testing.parity import TINY_VOCAB, tiny_config


def _tiny_model(overrides, train_mode: bool):
    """(cfg, forward(tokens_BS) → logits) of a one-rank tiny model; the samples are indexed
    0 … B−1 in every forward (V-MoE's training noise is a function of them)."""
    from megamoe.models.lm.model import lm_context
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config(["parallel.world_size=1", *overrides])
    model = build_engine(cfg, TINY_VOCAB, torch.device("cpu"), with_optimizer=False,
                         ddp=False).modules[0]
    model.train(train_mode)

    def forward(tokens_BS):
        B, S = tokens_BS.shape
        context = lm_context({"tokens": tokens_BS, "sample_index": torch.arange(B)}, cfg)
        pos = torch.arange(S).expand(B, S)
        # padded ids' logits are -inf
        return model(tokens_BS, pos, None, context=context)[..., :TINY_VOCAB]
    return cfg, forward


def probe_task(overrides=(), t: int = 7, train_mode: bool = False) -> tuple[float, float]:
    """(max |Δ output| at positions ≤ t, max |Δ output| anywhere) on one rank. `train_mode`
    probes the training-time routing (routers whose inference rule differs)."""
    cfg, forward = _tiny_model(overrides, train_mode)
    S = cfg.model.seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY_VOCAB, (4, S), generator=g)
    changed = tokens.clone()
    changed[:, t + 1:] = torch.randint(0, TINY_VOCAB, (4, S - t - 1), generator=g)
    with torch.no_grad():
        a, b = forward(tokens), forward(changed)
    return (a[:, :t + 1] - b[:, :t + 1]).abs().max().item(), (a - b).abs().max().item()


def batch_probe_task(overrides=(), train_mode: bool = False) -> tuple[float, float]:
    """(max |Δ output| of sample 0 alone against sample 0 inside a batch of 4, max |output|)
    on one rank."""
    cfg, forward = _tiny_model(overrides, train_mode)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY_VOCAB, (4, cfg.model.seq_length), generator=g)
    with torch.no_grad():
        batch, alone = forward(tokens), forward(tokens[:1])
    return (batch[:1] - alone).abs().max().item(), batch.abs().max().item()
