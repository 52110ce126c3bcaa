"""megamoe.models.contrastive in one process: the symmetric InfoNCE sum against a hand-computed
2×2 example, the local-rows decomposition that the DP version relies on (with its negative
control: labels without the rank offset), the head's CLIP temperature, clamp and projections,
and the init rule that keeps the learned temperature at its configured start."""

import pytest
import torch
import torch.nn.functional as F

from megamoe.models.contrastive import (ContrastiveHead, contrastive_loss, in_units_of,
                                        symmetric_cross_entropy)


def test_hand_computed_2x2():
    # u = normalised img = [1,0],[0,1]; v = normalised txt = [1,0],[r,r], r = 1/√2; s = 2.
    # image→text logits [[2, 2r], [0, 2r]], text→image logits [[2, 0], [2r, 2r]]:
    #   CE rows = log(1+e^{2r-2}) = .442548, log(1+e^{-2r}) = .217622,
    #             log(1+e^{-2}) = .126928,   log 2 = .693147;  sum / 2 = .740122
    img = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    txt = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    loss_sum, count = contrastive_loss(img, txt, torch.tensor(2.0))
    assert count.item() == 2
    assert loss_sum.item() == pytest.approx(0.740122, abs=1e-6)
    # a different scale gives a different value: the check can fail
    assert contrastive_loss(img, txt, torch.tensor(1.0))[0].item() != pytest.approx(0.740122)


def test_local_rows_with_rank_offsets_sum_to_the_full_loss():
    """Three emulated DP ranks of B = 2: each scores its own rows against all columns."""
    g = torch.Generator().manual_seed(0)
    img_ND = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt_ND = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    s = torch.tensor(3.0)
    full = symmetric_cross_entropy(img_ND, txt_ND, img_ND, txt_ND, s, 0)

    def ranks(offset_of):
        return sum(symmetric_cross_entropy(img_ND[2 * r:2 * r + 2], txt_ND[2 * r:2 * r + 2],
                                           img_ND, txt_ND, s, offset_of(r)) for r in range(3))

    assert ranks(lambda r: 2 * r).item() == pytest.approx(full.item(), rel=1e-6)
    assert abs(ranks(lambda r: 0).item() - full.item()) > 1e-2    # no rank offset: wrong labels


def test_head_starts_at_clip_temperature_and_clamps_at_100():
    head = ContrastiveHead(8)
    assert head.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    head.logit_scale().backward()      # d exp(x)/dx at x = log(1/0.07)
    assert head.log_scale_offset.grad.item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        head.log_scale_offset.fill_(10.0)
    head.log_scale_offset.grad = None
    s = head.logit_scale()
    s.backward()
    assert s.item() == pytest.approx(100.0, rel=1e-6)
    assert head.log_scale_offset.grad.item() == 0.0
    assert ContrastiveHead(8, init_temperature=0.1).logit_scale().item() == pytest.approx(10.0)


def test_head_projections_are_optional():
    img, txt = torch.randn(3, 8), torch.randn(3, 8)
    a, b, _ = ContrastiveHead(8)(img, txt)
    assert a is img and b is txt
    head = ContrastiveHead(8, proj_dim=4)
    a, b, s = head(img, txt)
    assert a.shape == b.shape == (3, 4) and s.dim() == 0
    assert head.img_proj.bias is None and not torch.equal(head.img_proj.weight,
                                                           head.txt_proj.weight)


@pytest.mark.parametrize("kw,field", [(dict(init_temperature=0.0), "init_temperature"),
                                      (dict(max_logit_scale=5.0), "max_logit_scale")])
def test_head_refuses_bad_settings(kw, field):
    with pytest.raises(ValueError, match=field):
        ContrastiveHead(8, **kw)


def test_global_init_leaves_the_temperature_at_its_start():
    """init_global fills every parameter by name; the offset must start at 0, not at N(0, σ)."""
    from megamoe.models.init import _std_for

    assert _std_for("vlm.contrastive.log_scale_offset", 0.02, 4) == 0.0
    assert _std_for("vlm.contrastive.img_proj.weight", 0.02, 4) == 0.02


def test_in_units_of_rescales_by_units_per_pair():
    loss_sum = torch.tensor(1.5, requires_grad=True)
    out = in_units_of(loss_sum, torch.tensor(3, dtype=torch.int), torch.tensor(12))
    assert out.item() == pytest.approx(6.0)
    out.backward()
    assert loss_sum.grad.item() == pytest.approx(4.0)
