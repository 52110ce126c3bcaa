"""LIMoE entropy losses: papers.md §14 T9 and hand-computed mixed-modality values."""

import math

import pytest
import torch

from megamoe.moe.routers.limoe import checked_modalities, limoe_loss, modality_entropies
from megamoe.blocks.context import Context
from megamoe.moe.routers.token_groups import SequenceShards

T9_IMAGE = torch.tensor([[.7, .2, .1], [.6, .3, .1], [.8, .1, .1]])


def test_t9_entropies_and_thresholds():
    local, glob, counts = modality_entropies(T9_IMAGE, torch.zeros(3, dtype=torch.long), 1)
    assert local.item() == pytest.approx(0.779599, abs=1e-6)
    assert glob.item() == pytest.approx(-0.801819, abs=1e-6)
    assert counts.tolist() == [3]
    zero, _ = limoe_loss(local, glob, counts, [0.0], [1.0], [math.log(2)])
    assert zero.item() == 0.0                                     # max(0, 0.693 − 0.802)
    thresholded, terms = limoe_loss(local, glob, counts, [0.0], [1.0], [math.log(3)])
    assert thresholded.item() == pytest.approx(0.296794, abs=1e-6)
    assert terms["global_entropy_m0"].item() == pytest.approx(0.296794, abs=1e-6)


def test_two_modalities_by_hand():
    # modality 0: the T9 image tokens; modality 1: one uniform token and one one-hot token:
    # Ω_local = (log 3 + 0)/2, p̃ = [2/3, 1/6, 1/6] → Ω_global = (2/3)log(2/3) + (1/3)log(1/6)
    probs = torch.cat([T9_IMAGE, torch.full((1, 3), 1 / 3), torch.tensor([[1.0, 0, 0]])])
    modality = torch.tensor([0, 0, 0, 1, 1])
    local, glob, counts = modality_entropies(probs, modality, 2)
    assert local[1].item() == pytest.approx(math.log(3) / 2, abs=1e-6)
    g1 = 2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 6)
    assert glob[1].item() == pytest.approx(g1, abs=1e-6)
    total, _ = limoe_loss(local, glob, counts, [0.1, 0.2], [0.3, 0.4], [None, 1.0])
    expected = 0.1 * 0.779599 + 0.3 * -0.801819 + 0.2 * math.log(3) / 2 + 0.4 * max(0, 1 + g1)
    assert total.item() == pytest.approx(expected, abs=1e-6)


def test_absent_modality_adds_nothing():
    local, glob, counts = modality_entropies(T9_IMAGE, torch.zeros(3, dtype=torch.long), 2)
    assert counts.tolist() == [3, 0] and local[1].item() == 0 and glob[1].item() == 0
    total, terms = limoe_loss(local, glob, counts, [0.0, 5.0], [0.0, 5.0], [None, 9.0])
    assert total.item() == 0.0 and "local_entropy_m1" not in terms


def test_gradient_reaches_the_probabilities():
    probs = T9_IMAGE.clone().requires_grad_(True)
    local, glob, counts = modality_entropies(probs, torch.zeros(3, dtype=torch.long), 1)
    limoe_loss(local, glob, counts, [1.0], [1.0], [None])[0].backward()
    assert probs.grad.abs().sum() > 0


def test_modality_ids_are_checked():
    shards = SequenceShards(None)
    with pytest.raises(ValueError, match="routing context 'modality_ids_BS'"):
        Context().require("modality_ids_BS", "model.moe.router 'limoe'")
    ctx = Context(modality_ids_BS=torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="model.moe.limoe: configured for 2 modalities"):
        checked_modalities(ctx, shards, 2, "model.moe.limoe")
    assert checked_modalities(ctx, shards, 3, "model.moe.limoe").tolist() == [0, 1, 2]
