"""Soft MoE (papers.md §13c): §14 T10 (dispatch, combine, slot inputs), hand-computed
normalised logits (x·rsqrt(Σx² + 1e-6)), per-sequence slots at B = 2 by hand (the old rule, one
softmax over the micro-batch, as negative control), the layer's output against the per-sequence
formula Y_b = C_b·[E_{s//p}(X̃_{b,s})] computed from its own modules, the slot count
p = round(S·C/n) from the sequence length, and the refusal of checkpoints saved under the old
rule."""

import math

from types import SimpleNamespace

import pytest
import torch

from megamoe.config import ConfigError
from megamoe.moe.routers.soft import SoftRouter, dispatch_combine, soft_logits
from megamoe.testing.parity import tiny_config
from megamoe.testing.pool import run_distributed

SOFT = ["model.moe.router=soft", "model.moe.allow_non_causal=true"]


def test_t10_dispatch_combine_and_slot_inputs():
    x = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    phi = torch.tensor([[1.0, 0], [0, 2]])          # Φ's columns, one row per slot
    logits = soft_logits(x, phi, scale=None)
    assert logits.tolist() == [[1, 0], [0, 2], [1, 2]]
    d, c = dispatch_combine(logits)
    assert torch.allclose(d.T, torch.tensor([[.422319, .155362, .422319],
                                             [.063379, .468311, .468311]]), atol=1e-6)
    assert torch.allclose(c, torch.tensor([[.731059, .268941], [.119203, .880797],
                                           [.268941, .731059]]), atol=1e-6)
    assert torch.allclose(d.T @ x, torch.tensor([[.844638, .577681], [.531689, .936621]]),
                          atol=1e-6)


def test_l2_normalised_logits_by_hand():
    # x̂ = [.6, .8], [0, 1]; Φ̂ rows = [1, 0], [0, 1], [1, 1]/√2; scale 2
    x = torch.tensor([[3.0, 4], [0, 2]])
    phi = torch.tensor([[2.0, 0], [0, 5], [1, 1]])
    logits = soft_logits(x, phi, scale=torch.tensor([2.0]))
    want = [[1.2, 1.6, 1.4 * math.sqrt(2)], [0, 2, math.sqrt(2)]]
    assert torch.allclose(logits, torch.tensor(want), atol=1e-6)
    d, _ = dispatch_combine(logits)
    # slot 0: softmax([1.2, 0]) = [σ(1.2), σ(−1.2)] → σ(1.2)·[3, 4] + σ(−1.2)·[0, 2]
    s = 1 / (1 + math.exp(-1.2))
    assert torch.allclose((d.T @ x)[0], torch.tensor([3 * s, 4 * s + 2 * (1 - s)]), atol=1e-6)


def test_normalisation_keeps_the_reference_epsilon():
    # x = [1e-3, 0]: Σx² = 1e-6, x·rsqrt(1e-6 + 1e-6) = [1/√2, 0]; Φ = [1, 0] (Σ = 1 + 1e-6,
    # 1/√(1 + 1e-6) ≈ 1 − 5e-7); scale 1 → logit ≈ 0.707106 (l2-normalising would give 1)
    logits = soft_logits(torch.tensor([[1e-3, 0.0]]), torch.tensor([[1.0, 0.0]]),
                         scale=torch.tensor([1.0]))
    assert logits.item() == pytest.approx(1 / math.sqrt(2) * (1 - 5e-7), abs=1e-6)
    old = torch.nn.functional.normalize(torch.tensor([[1e-3, 0.0]]), dim=-1)[0, 0].item()
    assert abs(old - logits.item()) > 0.29                     # the old rule's answer differs


# B = 2 by hand: S = 2 positions, D = 2, n = 2 experts × p = 1 slot, no normalisation.
# Φ rows (slots) [1, 0] and [0, 1]; sample 0: x = [1, 0], [0, 1]; sample 1: x = [2, 0], [0, 0].
# Logits: sample 0 [[1, 0], [0, 1]], sample 1 [[2, 0], [0, 0]].
# Dispatch, softmax over each sample's own two positions:
#   sample 0 slot 0 softmax([1, 0]) = [σ(1), σ(−1)] = [.731059, .268941], slot 1 the reverse;
#   sample 1 slot 0 softmax([2, 0]) = [.880797, .119203], slot 1 softmax([0, 0]) = [.5, .5].
# Slot inputs X̃ = Dᵀ X: sample 0 [.731059, .268941], [.268941, .731059];
#                        sample 1 [1.761594, 0], [1, 0].
# Combine (softmax over the sample's slots): (s1, b1) has logits [0, 0] → [.5, .5], so with
# identity experts y(s1, b1) = .5·[1.761594, 0] + .5·[1, 0] = [1.380797, 0].
# The old rule (one softmax over all 4 tokens of the micro-batch): slot 0 weights
# softmax([1, 0, 2, 0]) = [.224515, .082595, .610296, .082595] → X̃ = [1.445107, .082595].
PHI = torch.tensor([[1.0, 0], [0, 1]])
X_SBD = torch.tensor([[[1.0, 0], [2, 0]],          # position 0: sample 0, sample 1
                      [[0.0, 1], [0, 0]]])         # position 1


def test_per_sequence_slots_by_hand_at_b2():
    router = SimpleNamespace(l2_norm=None, weight=PHI, num_experts=2)   # what `slots` reads
    slots_NBD, combine_SBN, _ = SoftRouter.slots(router, X_SBD, rows=slice(0, 2),
                                                 slot_rows=slice(0, 2))
    want_NBD = torch.tensor([[[.731059, .268941], [1.761594, 0]],
                             [[.268941, .731059], [1, 0]]])
    assert torch.allclose(slots_NBD, want_NBD, atol=1e-6)
    assert torch.allclose(combine_SBN[1, 1], torch.tensor([.5, .5]))
    y_SBD = torch.einsum("sbn,nbd->sbd", combine_SBN, slots_NBD)      # identity experts
    assert torch.allclose(y_SBD[1, 1], torch.tensor([1.380797, 0]), atol=1e-6)
    # a TP rank's share (slot 1 only) and its positions (position 1 only)
    part_NBD, part_SBN, _ = SoftRouter.slots(router, X_SBD, rows=slice(1, 2),
                                             slot_rows=slice(1, 2))
    assert torch.equal(part_NBD, slots_NBD[1:]) and torch.equal(part_SBN, combine_SBN[1:])
    # negative control: one softmax over the micro-batch's 4 tokens gives other slot inputs
    d_old = dispatch_combine(soft_logits(X_SBD.reshape(4, 2), PHI, None))[0]
    old_slot0 = d_old[:, 0] @ X_SBD.reshape(4, 2)
    assert torch.allclose(old_slot0, torch.tensor([1.445107, .082595]), atol=1e-6)
    assert (old_slot0 - slots_NBD[0, 1]).abs().max() > 0.3


def test_slots_per_expert_from_the_sequence_length():
    # S = seq 16 (micro-batch 2), n = 4: p = round(S·C/n), the micro-batch plays no part
    assert tiny_config(SOFT).model.moe.soft.slots_per_expert == 4              # old rule: 8
    assert tiny_config(SOFT + ["train.micro_batch_size=4"]
                       ).model.moe.soft.slots_per_expert == 4                  # old rule: 16
    assert tiny_config(SOFT + ["model.moe.soft.capacity_factor=0.3"]
                       ).model.moe.soft.slots_per_expert == 1          # round(1.2); old: 2
    assert tiny_config(SOFT + ["model.moe.soft.slots_per_expert=3"]
                       ).model.moe.soft.slots_per_expert == 3


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.moe.capacity_factor"):
        tiny_config(SOFT + ["model.moe.capacity_factor=1.0"])
    with pytest.raises(ConfigError, match="model.moe.soft.slots_per_expert.*parallel.tensor"):
        tiny_config(SOFT + ["model.moe.num_experts=3", "model.moe.soft.slots_per_expert=3",
                            "parallel.world_size=2", "parallel.tensor=2"])     # 9 slots
    with pytest.raises(ConfigError, match="model.moe.soft.capacity_factor"):
        tiny_config(SOFT + ["model.moe.soft.capacity_factor=0"])


def layer_output_vs_formula(overrides):
    """(max |layer − per-sequence formula|, max |formula|, max |layer − old micro-batch
    formula|) for a Soft MoE layer on a random [S, B, D] input."""
    from megamoe.models.lm.model import moe_layers
    from megamoe.moe.soft_layer import SoftMoELayer
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config(["parallel.world_size=1", *SOFT, *overrides])
    layer = moe_layers(build_engine(cfg, 64, torch.device("cpu"), with_optimizer=False,
                                    ddp=False).modules)[0]
    assert isinstance(layer, SoftMoELayer)
    with torch.no_grad():
        layer.router.l2_norm.weight.fill_(3.0)
        for p in layer.experts.parameters():      # outputs of order 1, not 1e-5
            p.mul_(30.0)
    g = torch.Generator().manual_seed(5)
    x_SBD = torch.randn(cfg.model.seq_length, cfg.train.micro_batch_size,
                        cfg.model.hidden_size, generator=g) + 1.0
    p = layer.router.slots_per_expert
    scale = layer.router.l2_norm.weight

    def formula(x_MD):                  # Y = C·[E_{s//p}(X̃_s)] over the tokens x_MD
        d, c = dispatch_combine(soft_logits(x_MD, layer.router.weight, scale))
        slots_ND = d.T @ x_MD
        y_ND = torch.cat([layer.experts.local_experts[s // p](slots_ND[s:s + 1])[0]
                          for s in range(slots_ND.shape[0])])
        return c @ y_ND

    with torch.no_grad():
        out_SBD, _ = layer(x_SBD)
        want_SBD = torch.stack([formula(x_SBD[:, b]) for b in range(x_SBD.shape[1])], dim=1)
        old_SBD = formula(x_SBD.reshape(-1, x_SBD.shape[-1])).view_as(x_SBD)
    return ((out_SBD - want_SBD).abs().max().item(), want_SBD.abs().max().item(),
            (out_SBD - old_SBD).abs().max().item())


@pytest.mark.timeout(300)
def test_layer_output_is_per_sequence_combine_of_expert_slot_outputs():
    err, scale, err_old = run_distributed(layer_output_vs_formula, 1,
                                          ["model.moe.soft.slots_per_expert=3"])[0]
    assert scale > 0.1 and err < 1e-5 * scale
    assert err_old > 1e-2 * scale          # negative control: the old micro-batch-wide slots


def old_checkpoint_task(root):
    """(error loading a checkpoint whose meta.json lacks the Soft MoE marker, marker found in
    a fresh save, the unedited checkpoint loads)."""
    import json
    import os

    from megamoe.checkpoint.load import CheckpointError, load_checkpoint, read_meta
    from megamoe.checkpoint.save import save_checkpoint
    from megamoe.testing.hf import build_tiny

    cfg, engine = build_tiny(SOFT)
    step_dir = save_checkpoint(os.path.join(root, "ckpt"), engine, {}, config=cfg)
    marked = read_meta(step_dir).get("soft_moe_groups") == "sequence"
    load_checkpoint(engine, step_dir, load_optimizer=False)          # the new rule loads
    meta = read_meta(step_dir)
    del meta["soft_moe_groups"]                                      # as saved before
    with open(os.path.join(step_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    try:
        load_checkpoint(engine, step_dir, load_optimizer=False)
    except CheckpointError as exc:
        return str(exc), marked
    return None, marked


@pytest.mark.timeout(300)
def test_checkpoint_saved_under_the_old_rule_is_refused(tmp_path):
    error, marked = run_distributed(old_checkpoint_task, 1, str(tmp_path))[0]
    assert marked
    assert error is not None and "per input sequence" in error and "\n" not in error, error
