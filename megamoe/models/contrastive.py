"""LIMoE/CLIP-style image–text contrastive loss over the data-parallel group.

LIMoE (Mustafa et al., arXiv 2206.02770) trains with CLIP's symmetric InfoNCE loss (Radford et
al., arXiv 2103.00020, Fig. 3): L2-normalised embeddings, a learned temperature, cross-entropy
image→text and text→image over the batch, averaged. Negatives are the whole data-parallel
micro-batch: each rank gathers every rank's embeddings and scores its own rows against all
gathered columns ("local loss", labels offset by the rank), as open_clip's `local_loss` does.

Math (one micro-batch per rank; W = DP size, rank r holds samples i ∈ [rB, (r+1)B)):
    u_i = img_i / ‖img_i‖,  v_i = txt_i / ‖txt_i‖,  s = logit scale (= 1/τ)
    ℓ_i = ½ [ −log softmax_j(s u_i·v_j)[i]  −  log softmax_j(s v_i·u_j)[i] ],  j over all N = W·B
    the single-process loss of the gathered micro-batch is (1/N) Σ_i ℓ_i.
Rank r returns loss_sum_r = Σ_{i∈r} ℓ_i and count_r = B. Megatron (`calculate_per_token_loss`)
back-propagates each loss_sum, sums parameter gradients over DP and divides by Σ_r count_r = N,
so the loss is exactly (1/N) Σ_i ℓ_i. Gradients, each term counted once:
  - the gathered copy of rank r's embeddings enters every rank q's loss; the gather's backward
    sums (all-reduces) ∂loss_sum_q/∂(gathered) over q and keeps rank r's slice, and the local
    rows add ∂loss_sum_r/∂rows, so rank r's embeddings receive ∂(Σ_q loss_sum_q)/∂e_r — the full
    gradient of the global loss for its own samples;
  - a parameter θ feeding the embeddings then holds Σ_{i∈r} ∂L/∂e_i · ∂e_i/∂θ on rank r, and
    the DP sum adds disjoint sample sets: Σ_r = ∂L/∂θ. The scale s enters only through each
    rank's own rows, so its DP sum is ∂L/∂s too.
A gather without that backward (or detached columns) loses Σ_{q≠r} ∂loss_sum_q/∂e_r; scoring
all N rows on every rank (a global rather than local loss) with this backward would count
every term W times.
With several micro-batches per step, negatives are the DP-gathered micro-batch m: the
single-process equivalent is one micro-batch holding the DP ranks' micro-batches m
concatenated in rank order (megamoe.testing.parity's reference runs them one by one, which
gives each a smaller set of negatives: a parity case with this loss must concatenate them).
TP ranks of one DP replica compute identical losses (inputs TP-replicated); Megatron does not
sum replicated gradients over TP, so nothing changes there.

Shapes: B local samples, N = W·B gathered samples, D embedding width, P projection width.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

CLIP_INIT_TEMPERATURE = 0.07     # CLIP: logit scale log(1/0.07) learned, exp clamped at 100
CLIP_MAX_LOGIT_SCALE = 100.0


class ContrastiveHead(torch.nn.Module):
    """Learned temperature (and optional projections) of the contrastive loss.

    Temperature: CLIP learns the log logit scale, initialised to log(1/0.07), and clips the
    scale at 100 (arXiv 2103.00020 §2.5). LIMoE's own initial value could not be retrieved
    here (no official code; the paper's text was not reachable; papers.md §5 gives none), so
    the CLIP value is the default. For reference, Google's big_vision (LiT, SigLIP code)
    learns t = exp(t') with t' initialised to log(temperature_init): 1.0 by default
    (models/proj/image_text/two_towers.py), 10.0 in its LiT config
    (configs/proj/image_text/lit_coco.py) — `init_temperature=0.1` gives the latter.
    The learned parameter is an offset from log(1/init_temperature), started at 0 (megamoe's
    global init zeroes `*_offset` parameters: models/init.py); the gradient and every SGD/Adam
    step are those of CLIP's log-scale parameter. The scale is clamped at `max_logit_scale` in
    the forward (no gradient beyond it), stateless where open_clip clamps the parameter in
    place after each step.

    Projections: CLIP projects each tower's pooled output with a bias-free linear map into the
    joint space, because its towers have different widths (LIMoE's heads were not retrieved
    either). Here both embeddings are already in
    the LM's hidden space D (the connector maps vision features into it), so the default is
    none: the loss then aligns the connector output with the LM's caption states directly.
    `proj_dim` adds CLIP's two bias-free projections D → P, which lets the loss shape a
    sub-space without constraining the LM's hidden states as much.
    """

    def __init__(self, dim: int, init_temperature: float = CLIP_INIT_TEMPERATURE,
                 proj_dim: int | None = None, max_logit_scale: float = CLIP_MAX_LOGIT_SCALE):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"contrastive init_temperature must be > 0, got {init_temperature}")
        if not max_logit_scale >= 1.0 / init_temperature:
            raise ValueError(f"contrastive max_logit_scale {max_logit_scale} is below the "
                             f"initial scale 1/init_temperature = {1.0 / init_temperature:g}")
        self.init_log_scale = math.log(1.0 / init_temperature)
        self.max_log_scale = math.log(max_logit_scale)
        self.log_scale_offset = torch.nn.Parameter(torch.zeros(1))
        self.img_proj = self.txt_proj = None
        if proj_dim is not None:
            self.img_proj = torch.nn.Linear(dim, proj_dim, bias=False)
            self.txt_proj = torch.nn.Linear(dim, proj_dim, bias=False)

    def logit_scale(self) -> torch.Tensor:
        """s = exp(min(log(1/τ₀) + offset, log max_logit_scale)), a 0-d tensor."""
        log_scale = (self.log_scale_offset + self.init_log_scale).clamp(max=self.max_log_scale)
        return log_scale.exp().squeeze(0)

    def forward(self, img_BD: torch.Tensor, txt_BD: torch.Tensor):
        """(image embeddings, text embeddings, logit scale) for `contrastive_loss`."""
        if self.img_proj is not None:
            img_BD, txt_BD = self.img_proj(img_BD), self.txt_proj(txt_BD)
        return img_BD, txt_BD, self.logit_scale()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; the backward sums the gathered gradient over the group and
    returns this rank's slice, so every rank's loss reaches the owner of each sample.
    Not torch.distributed.nn.functional.all_gather (deprecated in torch 2.13): on gloo its
    backward scatters with the group rank passed as a global rank, which fails on a DP group
    other than ranks 0..W-1 (checked: TP2×DP2's group {1, 3}); it matched on the world group."""

    @staticmethod
    def forward(ctx, x_BD, group):
        ctx.group = group
        parts = [torch.empty_like(x_BD) for _ in range(group.size())]
        dist.all_gather(parts, x_BD.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_ND):
        grad_ND = grad_ND.contiguous().clone()
        dist.all_reduce(grad_ND, op=dist.ReduceOp.SUM, group=ctx.group)
        B = grad_ND.shape[0] // ctx.group.size()
        r = ctx.group.rank()
        return grad_ND[r * B:(r + 1) * B], None


def all_gather_with_grad(x_BD: torch.Tensor, group) -> torch.Tensor:
    """[B, ...] on every rank of `group` (same B everywhere) → [W·B, ...] in rank order."""
    return _AllGatherWithGrad.apply(x_BD, group)


def symmetric_cross_entropy(img_BD, txt_BD, img_ND, txt_ND, logit_scale, label_offset: int):
    """Σ over the local rows of ½(CE image→text + CE text→image): rows are this rank's
    normalised embeddings, columns all N gathered ones, row i's target column label_offset + i."""
    labels_B = torch.arange(img_BD.shape[0], device=img_BD.device) + label_offset
    logits_i2t_BN = logit_scale * img_BD @ txt_ND.t()
    logits_t2i_BN = logit_scale * txt_BD @ img_ND.t()
    return 0.5 * (F.cross_entropy(logits_i2t_BN, labels_B, reduction="sum")
                  + F.cross_entropy(logits_t2i_BN, labels_B, reduction="sum"))


def contrastive_loss(img_BD: torch.Tensor, txt_BD: torch.Tensor, logit_scale: torch.Tensor,
                     dp_group=None):
    """(loss_sum, count) of this rank's B pairs against the DP-gathered micro-batch, in
    Megatron's per-unit convention (see the module docstring). `logit_scale`: the multiplier
    s = 1/τ (ContrastiveHead.logit_scale()); `dp_group`: the data-parallel process group, or
    None for one process. Every rank of `dp_group` must pass the same B."""
    img_BD = F.normalize(img_BD.float(), dim=-1)
    txt_BD = F.normalize(txt_BD.float(), dim=-1)
    B = img_BD.shape[0]
    count = torch.tensor(B, dtype=torch.int, device=img_BD.device)
    if dp_group is None or dp_group.size() == 1:
        return symmetric_cross_entropy(img_BD, txt_BD, img_BD, txt_BD, logit_scale, 0), count
    img_ND = all_gather_with_grad(img_BD, dp_group)
    txt_ND = all_gather_with_grad(txt_BD, dp_group)
    loss_sum = symmetric_cross_entropy(img_BD, txt_BD, img_ND, txt_ND, logit_scale,
                                       dp_group.rank() * B)
    return loss_sum, count


def in_units_of(loss_sum: torch.Tensor, count: torch.Tensor, units: torch.Tensor, dp_group=None):
    """`loss_sum` re-expressed for a micro-batch normalised by other units (e.g. the LM's loss
    tokens): loss_sum · U/N, with U and N this micro-batch's units and pairs summed over DP.
    After Megatron divides by the global unit count the term is the per-pair mean of the
    contrastive loss — exactly when every micro-batch of the step has the same U/N, otherwise
    the U-weighted mean of the micro-batches' means. Constant factor: no gradient through it."""
    totals = torch.stack([units.detach().float().reshape(()), count.detach().float().reshape(())])
    if dp_group is not None and dp_group.size() > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=dp_group)
    return loss_sum * (totals[0] / totals[1])
