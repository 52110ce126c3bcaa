"""FP8 experts: every expert GEMM (fc1, fc2; forward, input and weight gradients) in FP8 with
per-expert scales (megamoe.fp8), the activation, probabilities, router and losses in high
precision; biased experts' biases are added in high precision around the FP8 GEMMs.

A subclass of Megatron's `SequentialMLP` like `GroupedExperts`: the same parameters,
checkpoint keys and resharding, plus the per-expert scaling state (`fp8_state.amax_history`,
saved per global expert and resharded with the experts). Replicas of an expert on
expert-data-parallel and expert-tensor-parallel ranks all-reduce their amaxes so their scales
stay identical. `grouped` (`model.moe.experts=grouped`) lets the back end run one grouped FP8
GEMM per projection where the device has one (megamoe.fp8.backends); on CPU both run one
`torch._scaled_mm` per expert.

Legend: T permuted tokens on this rank, D hidden, F expert FFN size (this TP shard),
G = 2F with a gated linear unit else F, E local experts.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megamoe.fp8 import FP8Call, FP8ScalingState, fp8_grouped_linear, make_recipe
from megamoe.fp8.backends import resolve_backend
from megamoe.moe.experts.grouped import GroupedExperts, expert_biases, probs_on_input

FC1, FC2 = 0, 1


class FP8Experts(SequentialMLP):
    """`SequentialMLP` whose expert GEMMs run in FP8 (`model.moe.fp8`)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, *, fp8,
                 grouped: bool = False):
        super().__init__(num_local_experts, config, submodules, pg_collection)
        assert not (self.config.fp8 or self.config.fp4), "FP8 experts replace Megatron's TE FP8"
        assert not self.config.use_te_activation_func
        self.recipe = make_recipe(fp8.recipe, fp8.grad_format, fp8.amax_history_len, fp8.margin)
        self.backend_args = (fp8.backend, fp8.recipe, grouped)
        self.grad_format = fp8.grad_format
        # expert-TP: fc1 holds a slice of its output features, fc2 of its input features; the
        # GEMMs contracting a slice take whole-row scales over this group (megamoe.fp8.linear).
        # A negative control sets it to None (each shard then scales its own slice).
        self.split_group = (self.tp_group if self.tp_group is not None
                            and self.tp_group.size() > 1 else None)
        resolve_backend(*self.backend_args, torch.cuda.is_available(), fp8.grad_format,
                        self.expert_tp)
        if torch.cuda.is_available() and config.moe_token_dispatcher_type != "alltoall":
            raise ValueError("model.moe.token_dispatcher: FP8 experts on CUDA need alltoall, "
                             "which pads each expert's rows to 16 in the routing map")
        self.fp8_state = FP8ScalingState(num_local_experts, 2, self.recipe.history_len)
        self.fp8_state.replica_groups = [g for g in (self.dp_group, self.tp_group)
                                         if g is not None and g.size() > 1]

    _activation = GroupedExperts._activation

    @property
    def expert_tp(self) -> int:
        return self.tp_group.size() if self.tp_group is not None else 1

    def _linear(self, x_TK, w_ENK, counts, proj: int, record: bool):
        call = FP8Call(self.recipe, self.fp8_state, proj, record,
                       split="n" if proj == FC1 else "k", split_group=self.split_group)
        backend = resolve_backend(*self.backend_args, x_TK.is_cuda, self.grad_format,
                                  self.expert_tp)
        if backend == "scaled_grouped_mm":
            from megamoe.fp8.grouped import fp8_scaled_grouped_linear
            return fp8_scaled_grouped_linear(x_TK, w_ENK, counts, call)
        return fp8_grouped_linear(x_TK, w_ENK, counts, call)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x_TD, probs_T = probs_on_input(self.config, permuted_local_hidden_states,
                                       permuted_probs)
        counts = [int(c) for c in torch.as_tensor(tokens_per_expert, device="cpu")]
        assert len(counts) == self.num_local_experts and sum(counts) == x_TD.shape[0]
        # rows routed with probability 0 (the routing map's alignment padding) are zeroed on the
        # way in and out: their output and gradients are 0 anyway, and so neither they nor their
        # upstream gradients can move any amax or scale
        live_T1 = (probs_T != 0).unsqueeze(-1).to(x_TD.dtype)
        x_TD = x_TD * live_T1
        # the no-grad first pass of activation recompute does not record: its repeat does
        record = torch.is_grad_enabled() or not self.training
        w1_EGD = torch.stack([e.linear_fc1.weight for e in self.local_experts])
        w2_EDF = torch.stack([e.linear_fc2.weight for e in self.local_experts])
        b1_TG, b2_TD = expert_biases(self.local_experts, torch.tensor(counts), x_TD.device)
        h_TG = self._linear(x_TD, w1_EGD, counts, FC1, record)
        if b1_TG is not None:          # biases stay in high precision, outside the FP8 GEMMs
            h_TG = h_TG + b1_TG
        a_TF = self._activation(h_TG)
        a_TF = (a_TF * probs_T.unsqueeze(-1)).to(a_TF.dtype)
        y_TD = self._linear(a_TF, w2_EDF, counts, FC2, record)
        if b2_TD is not None:
            y_TD = y_TD + b2_TD * probs_T.unsqueeze(-1)
        return y_TD * live_T1, None

    def fp8_counters(self) -> dict:
        """Overflow/underflow casts since the last call (for the step metrics)."""
        return self.fp8_state.read_counters()

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The parent's expert parameters plus the scaling state as one tensor
        `{prefix}fp8_state.amax_history` [E_global, 2, 3, H], sharded over EP like the experts
        (replicated over expert-TP and expert-DP: the amaxes are all-reduced there)."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        tp_rank = self.tp_group.rank() if self.tp_group is not None else 0
        dp_rank = self.dp_group.rank() if self.dp_group is not None else 0
        out.update(self.fp8_state.sharded_state(
            f"{prefix}fp8_state.amax_history", sharded_offsets, self.ep_group.rank(),
            self.ep_group.size(), replica_id=(0, tp_rank, dp_rank)))
        return out
