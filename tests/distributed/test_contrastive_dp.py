"""The contrastive loss over the data-parallel group (megamoe.models.contrastive) on 4 gloo
ranks, DP4 (EP2's 4-rank dense DP group) and TP2×DP2, against the single-process loss of the
concatenated micro-batch computed on every rank. Embeddings come from leaf inputs through
replicated Linear encoders and a ContrastiveHead with projections; parameter gradients are
summed over DP and divided by the global count as Megatron's DDP and `calculate_per_token_loss`
do. Negative controls: labels without the rank offset (the loss check fails) and a gather
without the autograd backward (the gradient checks fail while the loss still matches)."""

import copy

import pytest

from megamoe.testing.pool import run_distributed

N, D_IN, D, P = 8, 6, 5, 4          # global pairs, input, embedding and projection widths
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5


def _gather(kind, x_BD, group):
    import torch
    import torch.distributed as dist

    from megamoe.models.contrastive import all_gather_with_grad

    if kind == "plain":                        # forward-only gather: columns carry no gradient
        parts = [torch.empty_like(x_BD) for _ in range(group.size())]
        dist.all_gather(parts, x_BD.detach().contiguous(), group=group)
        return torch.cat(parts)
    return all_gather_with_grad(x_BD, group)


def _variant_loss(variant, img_BD, txt_BD, s, group):
    """The loss with one piece swapped; "ours" is the public function itself."""
    import torch.nn.functional as F

    from megamoe.models.contrastive import contrastive_loss, symmetric_cross_entropy

    if variant == "ours":
        return contrastive_loss(img_BD, txt_BD, s, group)[0]
    img_BD, txt_BD = F.normalize(img_BD, dim=-1), F.normalize(txt_BD, dim=-1)
    gather = {"no_offset": "ours", "plain_gather": "plain"}[variant]
    img_ND, txt_ND = _gather(gather, img_BD, group), _gather(gather, txt_BD, group)
    offset = 0 if variant == "no_offset" else group.rank() * img_BD.shape[0]
    return symmetric_cross_entropy(img_BD, txt_BD, img_ND, txt_ND, s, offset)


def _model():
    import torch

    from megamoe.models.contrastive import ContrastiveHead

    torch.manual_seed(0)                          # replicated: the same on every rank
    model = torch.nn.ModuleDict({"img": torch.nn.Linear(D_IN, D), "txt": torch.nn.Linear(D_IN, D),
                                 "head": ContrastiveHead(D, proj_dim=P)})
    with torch.no_grad():
        model["head"].log_scale_offset.fill_(-1.0)   # s ≈ 5.3: softmaxes not saturated
    x_img, x_txt = torch.randn(N, D_IN), torch.randn(N, D_IN)
    return model, x_img, x_txt


def _forward(model, x_img, x_txt):
    img_BD, txt_BD, s = model["head"](model["img"](x_img), model["txt"](x_txt))
    return img_BD, txt_BD, s


def _rel(a, b) -> float:
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def _dp_parity(layout: dict, variants: list) -> dict:
    """Per variant: relative errors of the loss, the leaf-input gradients (owned samples) and
    the DP-summed parameter gradients against the single-process reference."""
    import torch
    import torch.distributed as dist

    from megamoe.models.contrastive import contrastive_loss, in_units_of
    from megamoe.parallel import ParallelDims, build_grids

    grid = build_grids(ParallelDims(world_size=dist.get_world_size(), **layout)).lm
    dp = grid.dp
    W, r = dp.size(), dp.rank()
    B = N // W
    model, x_img, x_txt = _model()

    ref = copy.deepcopy(model)
    xr_img, xr_txt = x_img.clone().requires_grad_(), x_txt.clone().requires_grad_()
    ref_sum, ref_count = contrastive_loss(*_forward(ref, xr_img, xr_txt), None)
    (ref_sum / ref_count).backward()
    ref_loss = (ref_sum / ref_count).item()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    mine = slice(r * B, (r + 1) * B)

    out = {"dp": W}
    for variant in variants:
        m = copy.deepcopy(model)
        xi, xt = x_img[mine].clone().requires_grad_(), x_txt[mine].clone().requires_grad_()
        img_BD, txt_BD, s = _forward(m, xi, xt)
        loss_sum = _variant_loss(variant, img_BD, txt_BD, s, dp)
        loss_sum.backward()                       # Megatron back-propagates the sum
        totals = torch.stack([loss_sum.detach(), torch.tensor(float(B))])
        dist.all_reduce(totals, group=dp)         # loss sums and counts over DP
        count = totals[1]
        errs = {"loss": abs(float(totals[0] / count) - ref_loss) / ref_loss,
                "input_grad": max(_rel(xi.grad / count, xr_img.grad[mine]),
                                  _rel(xt.grad / count, xr_txt.grad[mine]))}
        worst = 0.0
        for n, p in m.named_parameters():         # DDP: sum over DP, then ÷ global count
            g = p.grad.clone()
            dist.all_reduce(g, group=dp)
            worst = max(worst, _rel(g / count, ref_grads[n]))
        errs["param_grad"] = worst
        out[variant] = errs
    units = torch.tensor(3 + r)                   # e.g. loss tokens per micro-batch
    got = in_units_of(torch.tensor(2.0), torch.tensor(B), units, dp)
    out["in_units_of"] = abs(float(got) - 2.0 * sum(3 + q for q in range(W)) / N)
    return out


LAYOUTS = [("ep2_dp4", {"expert": 2}, 4), ("tp2_dp2", {"tensor": 2}, 2)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,layout,dp", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_contrastive_loss_matches_single_process(name, layout, dp):
    variants = ["ours", "no_offset", "plain_gather"]
    for res in run_distributed(_dp_parity, 4, layout, variants):
        assert res["dp"] == dp
        ours = res["ours"]
        assert ours["loss"] <= LOSS_RTOL, ours
        assert ours["input_grad"] <= GRAD_RTOL and ours["param_grad"] <= GRAD_RTOL, ours
        assert res["in_units_of"] <= 1e-6
        # negative controls: without the rank offset the loss is wrong; without the gather's
        # backward the loss is right but every rank misses the other ranks' gradients
        assert res["no_offset"]["loss"] > 100 * LOSS_RTOL, res["no_offset"]
        bad = res["plain_gather"]
        assert bad["loss"] <= LOSS_RTOL, bad
        assert bad["input_grad"] > 100 * GRAD_RTOL and bad["param_grad"] > 100 * GRAD_RTOL, bad


def _initialised_head() -> tuple:
    """(logit scale, projection std) of a head inside a Megatron module after megamoe's global
    init: the scale stays at CLIP's start (the offset is zeroed), the projections are drawn."""
    import torch
    import torch.distributed as dist
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from megamoe.models.contrastive import ContrastiveHead
    from megamoe.models.init import init_global
    from megamoe.parallel import ParallelDims, build_grids

    build_grids(ParallelDims(world_size=dist.get_world_size(), tensor=2))

    class Holder(MegatronModule):
        def __init__(self):
            super().__init__(TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=1))
            self.head = ContrastiveHead(D, proj_dim=P)

    holder = Holder()
    with torch.no_grad():                      # init must overwrite both
        holder.head.log_scale_offset.fill_(0.5)
        holder.head.img_proj.weight.zero_()
    init_global([holder], seed=0, std=0.02, num_layers=1)
    return holder.head.logit_scale().item(), holder.head.img_proj.weight.std().item()


@pytest.mark.timeout(300)
def test_global_init_starts_the_head_at_clip_temperature():
    results = run_distributed(_initialised_head, 4)
    for scale, proj_std in results:
        assert scale == pytest.approx(1 / 0.07, rel=1e-6)
        assert 0.005 < proj_std < 0.05
    assert len(set(results)) == 1              # replicated: the same values on every rank
