"""Grouped experts: every local expert's GEMMs in one `torch._grouped_mm` call per projection
(fc1 with SwiGLU's gate and up fused, then fc2), instead of `SequentialMLP`'s loop over experts.

A subclass of Megatron's `SequentialMLP`: the parameters, `sharded_state_dict`, checkpoint keys
and resharding are the parent's, so a checkpoint moves between the two back ends and any layout.
Only `forward` differs; it reproduces `MLP.forward`'s math (GLU split, activation, probs applied
after the activation, before fc2). Biased experts (the vit, vlm-encoder and dit families') add
each token's expert biases around the grouped GEMMs as `MLP.forward` does: fc1's before the
activation, fc2's scaled by the token's probability (`expert_biases`). Under expert-TP the weights are the local shard and the
linears do no communication of their own (`explicit_expert_comm`: the dispatcher reduces), so
the grouped path needs none either.

Legend: T permuted tokens on this rank, D hidden, F expert FFN size (this TP shard),
G = 2F with a gated linear unit else F, E local experts.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

# torch._grouped_mm needs every row stride (D, G, F) to be a multiple of 16 bytes
_ALIGN_BYTES = 16


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the upstream gradient contiguous: `_grouped_mm`'s backward
    refuses a strided one (e.g. the gradient of a `chunk` slice)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class GroupedExperts(SequentialMLP):
    """`SequentialMLP` whose forward runs one grouped GEMM per projection."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection)
        assert not (self.config.fp8 or self.config.fp4), "grouped experts: FP8/FP4 not supported"
        assert not self.config.use_te_activation_func
        for expert in self.local_experts:
            # the expert linears must not communicate: then per-expert TP shards compute exactly
            assert (expert.linear_fc1.explicit_expert_comm
                    or self.tp_group is None or self.tp_group.size() == 1)
        fc1_GD = self.local_experts[0].linear_fc1.weight
        fc2_DF = self.local_experts[0].linear_fc2.weight
        for name, size in (("model.hidden_size", fc1_GD.shape[1]),
                           ("model.moe.ffn_hidden_size (per expert-TP shard)", fc2_DF.shape[1])):
            if size * fc1_GD.element_size() % _ALIGN_BYTES:
                raise ValueError(f"{name}: {size} is not a multiple of "
                                 f"{_ALIGN_BYTES // fc1_GD.element_size()}, which "
                                 "model.moe.experts=grouped (torch._grouped_mm) needs")

    def _activation(self, h_TG: torch.Tensor) -> torch.Tensor:
        """`MLP.forward`'s unfused activation (of the biased fc1 output)."""
        cfg = self.config
        if not cfg.gated_linear_unit:
            return self.local_experts[0].activation_func(h_TG)
        glu_TF, lin_TF = torch.chunk(h_TG, 2, dim=-1)
        if (val := cfg.activation_func_clamp_value) is not None:
            glu_TF = glu_TF.clamp(min=None, max=val)
            lin_TF = lin_TF.clamp(min=-val, max=val)
        return cfg.activation_func(glu_TF) * (lin_TF + cfg.glu_linear_offset)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x_TD, probs_T = probs_on_input(self.config, permuted_local_hidden_states,
                                       permuted_probs)
        counts = torch.as_tensor(tokens_per_expert, device="cpu").to(torch.int64)
        assert counts.numel() == self.num_local_experts and int(counts.sum()) == x_TD.shape[0]
        offs_E = torch.cumsum(counts, 0).to(device=x_TD.device, dtype=torch.int32)

        w1_EDG = torch.stack([e.linear_fc1.weight for e in self.local_experts]).transpose(1, 2)
        w2_EFD = torch.stack([e.linear_fc2.weight for e in self.local_experts]).transpose(1, 2)
        b1_TG, b2_TD = expert_biases(self.local_experts, counts, x_TD.device)
        h_TG = torch._grouped_mm(x_TD.contiguous(), w1_EDG, offs=offs_E)
        if b1_TG is not None:
            h_TG = h_TG + b1_TG
        a_TF = self._activation(_ContiguousGrad.apply(h_TG))
        a_TF = (a_TF * probs_T.unsqueeze(-1)).to(a_TF.dtype)
        y_TD = _ContiguousGrad.apply(torch._grouped_mm(a_TF.contiguous(), w2_EFD, offs=offs_E))
        if b2_TD is not None:
            y_TD = y_TD + b2_TD * probs_T.unsqueeze(-1)
        return y_TD, None


def probs_on_input(config, x_TD: torch.Tensor, probs_T: torch.Tensor):
    """The permuted tokens and probabilities a grouped forward works on: with
    `moe_apply_probs_on_input` (top-1 only, as in Megatron's experts) the probability scales the
    input and 1 stands in for it afterwards."""
    assert x_TD.dim() == 2, f"expected permuted tokens [T, D], got {tuple(x_TD.shape)}"
    if not config.moe_apply_probs_on_input:
        return x_TD, probs_T
    assert config.moe_router_topk == 1, \
        "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
    return (probs_T.unsqueeze(-1) * x_TD).to(x_TD.dtype), torch.ones_like(probs_T)


def expert_biases(experts, counts: torch.Tensor, device):
    """Each permuted token's fc1 and fc2 biases ([T, G], [T, D]), gathered from its expert's
    (tokens arrive grouped by local expert, `counts` per expert), or (None, None) for experts
    without biases. The fc2 bias is the one `MLP.forward` adds scaled by the token's probability
    (Megatron's expert fc2 returns it apart: `skip_bias_add`)."""
    fc1, fc2 = experts[0].linear_fc1, experts[0].linear_fc2
    if fc1.bias is None and fc2.bias is None:
        return None, None
    assert fc2.skip_bias_add and fc2.bias is not None and fc1.bias is not None
    expert_T = torch.repeat_interleave(
        torch.arange(len(experts), device=device), counts.to(device=device, dtype=torch.int64))
    b1_EG = torch.stack([e.linear_fc1.bias for e in experts])
    b2_ED = torch.stack([e.linear_fc2.bias for e in experts])
    return b1_EG[expert_T], b2_ED[expert_T]
