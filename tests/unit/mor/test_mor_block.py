"""The MoR recursion block on Megatron-Core `TransformerLayer`s (megamoe's decoder layer spec,
MoE FFNs inside the shared layers), run on one gloo rank of the test pool:

- capacity 1 at every step = the shared layers applied N_r times to all tokens (with the gate);
- compaction = the full sequence under a mask that hides the unselected tokens (proves the
  causal mask among gathered tokens and RoPE at original positions; negative controls with
  compact positions and without the causal mask);
- recursive KV sharing = the full sequence's causal attention, gathered at the queries;
- causality in inference mode (σ > 0.5), and its absence with training-time top-k;
- KV memory on real caches: (N_r+1)/(2N_r) for recursion-wise caching, 1/N_r for sharing.
"""

import pytest
import torch

from megamoe.testing.pool import run_distributed

S, B = 12, 3
OVERRIDES = ["parallel.world_size=1", "model.init_method_std=0.2"]


def setup(num_recursions=3, layers_per_step=2, router="expert", moe=True, overrides=(),
          **router_kw):
    """(block, rope [S,1,1,d], hidden [S,B,D]) with pool slots 1..layers_per_step (slot 1 MoE)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megamoe.models.lm.model import transformer_config
    from megamoe.moe.routers import router_builder
    from megamoe.mor.block import RecursionBlock, build_shared_layers
    from megamoe.mor.expert_choice import ExpertChoiceDepthRouter
    from megamoe.mor.token_choice import TokenChoiceDepthRouter
    from megamoe.parallel import ParallelDims, init_groups, seed_rng
    from megamoe.testing.parity import tiny_config

    cfg = tiny_config(OVERRIDES + list(overrides))
    dims = ParallelDims.from_config(cfg.parallel)
    pg = init_groups(dims)
    seed_rng(0)
    tc = transformer_config(cfg, dims, sequence_parallel=False, dtype=torch.float32)
    slots = list(range(1, layers_per_step + 1))
    layers = build_shared_layers(tc, slots, {1} if moe else set(), pg, qk_layernorm=False,
                                 router=router_builder(cfg.model.moe), shared_expert=False)
    D = tc.hidden_size
    kv_sharing = router_kw.pop("kv_sharing", False)
    depth_router = (ExpertChoiceDepthRouter(D, num_recursions, **router_kw) if router == "expert"
                    else TokenChoiceDepthRouter(D, num_recursions, **router_kw))
    block = RecursionBlock(layers, [tuple(range(layers_per_step))] * num_recursions,
                           depth_router, kv_sharing=kv_sharing)
    rope = RotaryEmbedding(tc.kv_channels, rotary_percent=1.0, rotary_base=10000,
                           use_cpu_initialization=True)(S)
    x = torch.randn(S, B, D, generator=torch.Generator().manual_seed(1))
    return block, rope, x


def full_layers(block, step, x_SBD, rope, mask=None):
    for idx in block.steps[step]:
        x_SBD, _ = block.layers[idx](x_SBD, attention_mask=mask, rotary_pos_emb=rope)
    return x_SBD


def capacity_one_task():
    """max |block − reference| for expert-choice (weighted gate) and token-choice (all tokens
    forced to the last depth), and the gate-less negative control."""
    block, rope, x = setup(capacities=[1.0, 1.0, 1.0])
    block.train()
    out = block(x, rope)
    out.sum().backward()           # gradients reach the shared layers and every router
    grads_ok = all(lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
                   for lin in block.router.routers)
    with torch.no_grad():
        h, no_gate = x, x
        for r in range(3):
            g_SB1 = 0.1 * torch.sigmoid(block.router.logits(r, h.transpose(0, 1))).T[..., None]
            h = h + g_SB1 * full_layers(block, r, h, rope)
            no_gate = no_gate + full_layers(block, r, no_gate, rope)
    ec = (out - h).abs().max().item(), (out - no_gate).abs().max().item()

    block, rope, x = setup(router="token", balancing="loss_free")
    with torch.no_grad():
        block.router.router_bias.copy_(torch.tensor([0.0, 0.0, 10.0]))   # every token: depth 2
        block.eval()
        out = block(x, rope)
        a = block.router(x.transpose(0, 1))
        assert bool((a.depth_BS == 2).all())
        h = x
        for r in range(3):
            h = full_layers(block, r, h, rope)
        want = x + a.gate_BS.T[..., None] * h
    return ec + ((out - want).abs().max().item(), want.abs().max().item(), grads_ok)


def _masked_reference(block, step, x, rope, active_BS):
    """The full sequence with unselected keys hidden (and causal): outputs at every position."""
    pos = torch.arange(S)
    hidden = (pos[None, None, :] > pos[None, :, None]) | ~active_BS[:, None, :]
    hidden = hidden & ~torch.eye(S, dtype=torch.bool)[None]       # everyone sees itself
    return full_layers(block, step, x, rope, mask=hidden[:, None])


def compaction_task():
    """(err, negative control with compact RoPE positions, negative control without the
    causal mask, scale); sequences keep different numbers of tokens (pads)."""
    from megamoe.mor.compaction import Compaction

    block, rope, x = setup()
    block.eval()
    g = torch.Generator().manual_seed(3)
    active = torch.rand(B, S, generator=g) < 0.5
    active[:, 0] = False
    active[0, :] = torch.arange(S) % 3 == 1
    counts = active.sum(1)
    assert counts.min() < counts.max()              # pads are exercised
    with torch.no_grad():
        comp = Compaction.from_mask(active)
        got = comp.expand(block.run_step(0, x, comp, rope, None), S)
        want = _masked_reference(block, 0, x, rope, active) * active.T[..., None]
        err = (got - want).abs().max().item()
        K = comp.size
        wrong_pos = Compaction(torch.arange(K).expand(B, K), comp.valid_BK)
        comp.rotary = wrong_pos.rotary                 # RoPE at compact positions 0..K−1
        bad_rope = (comp.expand(block.run_step(0, x, comp, rope, None), S) - want).abs().max()
        comp = Compaction.from_mask(active)
        comp.self_mask = lambda: (~comp.valid_BK)[:, None, None, :].expand(B, 1, K, K)
        bad_mask = (comp.expand(block.run_step(0, x, comp, rope, None), S) - want).abs().max()
    return err, bad_rope.item(), bad_mask.item(), want.abs().max().item()


POOLS = ["model.moe.router=modality", "model.moe.z_loss_coeff=0",
         "model.moe.modality.mode=pools", "model.moe.modality.pool_sizes=[2,2]"]


def modality_context_task():
    """Uni-MoE modality pools in the shared MoE layer: a step on the compact batch (modality
    ids gathered by the block, ragged rows padded) = the full sequence under the mask with the
    full context; negative control: ids not gathered (those of positions 0..K−1)."""
    from megamoe.blocks.context import Context, bind, bound_context
    from megamoe.mor.compaction import Compaction

    block, rope, x = setup(overrides=POOLS)
    block.eval()
    g = torch.Generator().manual_seed(5)
    full = Context(modality_ids_BS=torch.randint(0, 2, (B, S), generator=g))
    active = torch.rand(B, S, generator=g) < 0.5
    active[0, :] = torch.arange(S) % 3 == 1
    with torch.no_grad(), bind(full):
        comp = Compaction.from_mask(active)
        got = comp.expand(block.run_step(0, x, comp, rope, None), S)
        restored = bound_context() is full
        want = _masked_reference(block, 0, x, rope, active) * active.T[..., None]
        gather = Context.compacted
        Context.compacted = lambda ctx, idx: Context(
            modality_ids_BS=ctx.modality_ids_BS[:, :idx.shape[1]])
        try:
            bad = comp.expand(block.run_step(0, x, comp, rope, None), S)
        finally:
            Context.compacted = gather
    return ((got - want).abs().max().item(), (bad - want).abs().max().item(),
            want.abs().max().item(), restored)


def kv_sharing_task():
    """Step 1 under KV sharing reads step 0's K/V: with one layer per step and the same input,
    its outputs are the full sequence's causal outputs at the gathered queries."""
    from megamoe.mor.attention import RecursionKVCache
    from megamoe.mor.compaction import Compaction

    block, rope, x = setup(layers_per_step=1, moe=False, kv_sharing=True)
    block.eval()
    active = torch.rand(B, S, generator=torch.Generator().manual_seed(4)) < 0.4
    active[:, 3] = True
    with torch.no_grad():
        cache = RecursionKVCache()
        full = Compaction.from_mask(torch.ones(B, S, dtype=torch.bool))
        step0 = block.run_step(0, x, full, rope, cache)
        comp = Compaction.from_mask(active)
        got = comp.expand(block.run_step(1, x, comp, rope, cache), S)
        want = full_layers(block, 0, x, rope) * active.T[..., None]
        # negative control: reading K/V written from another input
        cache_other = RecursionKVCache()
        block.run_step(0, x + 0.5, full, rope, cache_other)
        bad = comp.expand(block.run_step(1, x, comp, rope, cache_other), S)
    return ((got - want).abs().max().item(),
            (step0 - full_layers(block, 0, x, rope)).abs().max().item(),
            (bad - want).abs().max().item(), want.abs().max().item(), len(cache.entries))


def causality_task(router, train_mode, t=6):
    kw = {"inference_rule": "threshold"} if router == "expert" else {}
    block, rope, x = setup(router=router, **kw)
    with torch.no_grad():                      # about half the tokens pass σ(z) > 0.5
        for p in block.router.parameters():
            p.mul_(50.0)
    block.train(train_mode)
    y = x.clone()
    y[t + 1:] += torch.randn(S - t - 1, B, x.shape[-1], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = block(x, rope), block(y, rope)
    kept = [v for k, v in block.last_stats.items() if "kept_fraction" in k or "depth_" in k]
    return (a[:t + 1] - b[:t + 1]).abs().max().item(), (a - b).abs().max().item(), kept


def kv_memory_task(kv_sharing):
    """Cache elements of a forward / those of a vanilla model of the same unrolled depth."""
    from megamoe.mor.attention import RecursionKVCache

    block, rope, x = setup(inference_rule="topk", kv_sharing=kv_sharing)
    block.eval()
    cache = RecursionKVCache()
    with torch.no_grad():
        block(x, rope, kv_cache=cache)
    k, v, _ = cache.entries[(0, 0)]
    per_token = k.shape[-2] * k.shape[-1] + v.shape[-2] * v.shape[-1]
    vanilla = 3 * 2 * S * B * per_token            # N_r steps × 2 layers × every token
    return cache.numel() / vanilla


@pytest.mark.timeout(300)
def test_capacity_one_equals_shared_layers_applied_n_r_times():
    err, no_gate, tc_err, scale, grads_ok = run_distributed(capacity_one_task, 1)[0]
    assert scale > 0.1 and err < 1e-5 * scale and tc_err < 1e-5 * scale
    assert no_gate > 1e-3                         # negative control: the gate matters
    assert grads_ok


@pytest.mark.timeout(300)
def test_modality_ids_follow_the_compaction():
    err, bad, scale, restored = run_distributed(modality_context_task, 1)[0]
    assert scale > 0.1 and err < 1e-5 * scale and restored
    assert bad > 1e-3                             # the wrong tokens' ids change the routing


@pytest.mark.timeout(300)
def test_compaction_equals_masked_full_sequence():
    err, bad_rope, bad_mask, scale = run_distributed(compaction_task, 1)[0]
    assert scale > 0.1 and err < 1e-5 * scale
    assert bad_rope > 1e-3 and bad_mask > 1e-3    # RoPE positions and causal mask both matter


@pytest.mark.timeout(300)
def test_recursive_kv_sharing_queries_attend_to_first_recursion_kv():
    err, step0_err, bad, scale, entries = run_distributed(kv_sharing_task, 1)[0]
    assert scale > 0.1 and err < 1e-5 * scale and step0_err < 1e-5 * scale
    assert bad > 1e-3
    assert entries == 1                           # step 1 wrote no K/V of its own


@pytest.mark.timeout(300)
@pytest.mark.parametrize("router", ["expert", "token"])
def test_inference_mode_is_causal(router):
    prefix, total, kept = run_distributed(causality_task, 1, router, False)[0]
    assert total > 1e-3 and prefix < 1e-6
    # routing is neither all nor nothing (a step that keeps nothing still runs: kept 0)
    assert 0 < kept[0] and max(kept[1:]) < 1


@pytest.mark.timeout(300)
def test_training_top_k_is_not_causal():
    prefix, total, _ = run_distributed(causality_task, 1, "expert", True)[0]
    assert prefix > 1e-6


@pytest.mark.timeout(300)
def test_kv_memory_ratios():
    # capacities [1, 2/3, 1/3] at S = 12: (12 + 8 + 4) / 36 = 2/3 = (N_r+1)/(2N_r); sharing 1/N_r
    assert run_distributed(kv_memory_task, 1, False)[0] == pytest.approx(2 / 3)
    assert run_distributed(kv_memory_task, 1, True)[0] == pytest.approx(1 / 3)


def test_padded_compaction_adds_hidden_pads_and_changes_nothing_else():
    """Under SP a compact batch of K = 3 is padded to 4 for TP2: the pad is hidden as a key,
    the real rows' mask and the scattered output are those of the unpadded compaction."""
    from megamoe.mor.compaction import Compaction

    comp = Compaction.from_mask(torch.tensor([[True, False, True, True, False],
                                              [False, True, False, False, False]]))
    padded = comp.padded(2)
    assert comp.size == 3 and padded.size == 4 and comp.padded(3) is comp
    assert padded.valid_BK.tolist() == [[True, True, True, False], [True, False, False, False]]
    mask = padded.self_mask()
    assert torch.equal(mask[..., :3, :3], comp.self_mask())
    assert bool(mask[..., :3, 3].all())                      # the pad is no real token's key
    y = torch.randn(4, 2, 3)
    assert torch.equal(padded.expand(y, 5), comp.expand(y[:3], 5))
