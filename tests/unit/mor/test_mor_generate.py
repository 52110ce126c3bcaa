"""Cached MoR generation (megamoe.mor.generate) against the full forward, on one gloo rank:

- for both depth routers (expert-choice σ > 0.5, token-choice argmax) and both KV strategies
  (recursion-wise caching, recursive KV sharing), with Middle-Cycle and Cycle sharing, the logits of cached generation at every
  position equal the eval-mode full forward over the finished sequence (max |Δ| ≤ 1e-4), and
  greedy tokens are the forward's argmax; MoE FFNs sit in every layer, shared ones included;
- sequences of different prompt and generation lengths, batched (max_batch 2 < 3 sequences, so
  slots are refilled), with exit depths that differ between tokens (asserted), give the same
  tokens and logits under continuous depth-wise batching and sequence-wise batching, and
  depth-wise batching runs fewer, fuller block calls;
- negative control: caches built with the other KV strategy than the model's give logits that
  differ (> 1e-3) — the comparison can fail.
"""

import pytest
import torch

from megamoe.testing.pool import run_distributed

MOR = ["parallel.world_size=1", "model.num_layers=8", "model.mor.enabled=true",
       "model.mor.num_recursions=3", "model.seq_length=16"]
ROUTERS = {
    "expert": ["model.mor.router=expert", "model.mor.allow_non_causal=true"],
    "token": ["model.mor.router=token", "model.mor.token.balancing=loss_free"],
}
# (prompt, new tokens): different lengths, every total ≤ 16
REQUESTS = [([3, 17, 42], 9), ([5, 1, 9, 33, 60, 2, 7], 4), ([11, 12], 14)]


def _model(overrides):
    from megamoe.testing.parity import TINY_VOCAB, tiny_config
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config(MOR + list(overrides))
    engine = build_engine(cfg, TINY_VOCAB, torch.device("cpu"), with_optimizer=False,
                          ddp=False)
    return engine.modules[0]


def _forward_logits(model, tokens) -> torch.Tensor:
    ids = torch.tensor([tokens])
    pos = torch.arange(len(tokens))[None]
    with torch.no_grad():
        return model(ids, pos, None)[0, :, :model.unpadded_vocab_size]   # [T, V]


def generate_task(router: str, kv_sharing: bool, extra=()):
    from megamoe.mor.decoder import mor_decoders
    from megamoe.mor.generate import MoRGenerator, Request

    model = _model(ROUTERS[router] + [f"model.mor.kv_sharing={str(kv_sharing).lower()}",
                                      *extra])
    block = mor_decoders([model])[0].recursion
    with torch.no_grad():      # larger router logits: depths and exits spread over tokens
        for w in block.router.parameters():
            w.mul_(30.0)
        if router == "token":  # and a nonzero loss-free bias (selection only)
            block.router.router_bias.copy_(torch.tensor([0.0, 0.05, 0.0]))
    model.eval()
    reqs = [Request(p, n) for p, n in REQUESTS]
    runs, stats = {}, {}
    for policy in ("depth", "sequence"):
        gen = MoRGenerator(model, max_len=16, slots=3)
        runs[policy], stats[policy] = gen.generate(reqs, max_batch=2, policy=policy,
                                                   keep_logits=True)
    errs, argmax_ok, depths = [], True, []
    for res, (prompt, _) in zip(runs["depth"], REQUESTS):
        full_TV = _forward_logits(model, res.tokens)
        got_TV = torch.stack(res.logits)               # positions 0..T−2 ran the model
        errs.append((got_TV - full_TV[:len(got_TV)]).abs().max().item())
        greedy = full_TV[len(prompt) - 1:len(got_TV)].argmax(-1).tolist()
        argmax_ok &= res.tokens[len(prompt):] == greedy
        depths += res.depths
    same_policy = max((torch.stack(a.logits) - torch.stack(b.logits)).abs().max().item()
                      for a, b in zip(runs["depth"], runs["sequence"]))
    same_tokens = all(a.tokens == b.tokens for a, b in zip(runs["depth"], runs["sequence"]))
    # negative control: the other KV strategy than the model's
    wrong, _ = MoRGenerator(model, max_len=16, slots=3, kv_sharing=not kv_sharing).generate(
        reqs, max_batch=2, keep_logits=True)
    control = max((torch.stack(w.logits) - torch.stack(r.logits)).abs().max().item()
                  for w, r in zip(wrong, runs["depth"]))
    lengths = [len(r.tokens) for r in runs["depth"]]
    return dict(err=max(errs), errs=errs, argmax_ok=argmax_ok, depths=sorted(set(depths)),
                same_policy=same_policy, same_tokens=same_tokens, control=control,
                lengths=lengths,
                calls={p: s.block_calls for p, s in stats.items()},
                mean_batch={p: s.mean_block_batch for p, s in stats.items()})


CYCLE = ("model.mor.sharing=cycle", "model.num_layers=6")     # no unique layers, K = 2


@pytest.mark.timeout(300)
@pytest.mark.parametrize("router,kv_sharing,extra", [
    ("expert", False, ()), ("expert", True, ()), ("token", False, ()), ("token", True, ()),
    ("token", False, CYCLE)], ids=["expert-recursion_cache", "expert-kv_sharing",
                                   "token-recursion_cache", "token-kv_sharing", "token-cycle"])
def test_cached_generation_reproduces_the_full_forward(router, kv_sharing, extra):
    r = run_distributed(generate_task, 1, router, kv_sharing, extra)[0]
    assert r["lengths"] == [len(p) + n for p, n in REQUESTS]
    assert r["err"] <= 1e-4, r
    assert r["argmax_ok"]
    # exits differ between tokens (expert-choice: 1..3 steps; token-choice: depth 0..2)
    assert len(r["depths"]) >= 2, r["depths"]
    # depth-wise and sequence-wise batching compute the same thing
    assert r["same_tokens"] and r["same_policy"] <= 1e-5
    assert r["calls"]["depth"] < r["calls"]["sequence"], r["calls"]
    assert r["mean_batch"]["depth"] > r["mean_batch"]["sequence"]
    assert r["control"] > 1e-3, r["control"]          # negative control


def refusal_task(overrides, kwargs):
    from megamoe.mor.generate import MoRGenerator, Request

    model = _model(overrides)
    try:
        gen = MoRGenerator(model, max_len=16, slots=1)
        gen.generate([Request([1, 2], 15)], **kwargs)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides,kwargs,field", [
    (ROUTERS["expert"] + ["model.mor.inference_rule=topk"], {}, "model.mor.inference_rule"),
    (ROUTERS["token"], {}, "requests[0]"),
    (ROUTERS["token"], {"policy": "fifo"}, "policy"),
    (ROUTERS["token"] + ["model.moe.router=modality", "model.moe.modality.mode=pools",
                         "model.moe.z_loss_coeff=0"], {}, "model.moe.router"),
], ids=["topk_rule", "too_long", "policy", "modality_router"])
def test_generation_refuses_what_it_cannot_reproduce(overrides, kwargs, field):
    msg = run_distributed(refusal_task, 1, overrides, kwargs)[0]
    assert msg is not None and field in msg, msg
