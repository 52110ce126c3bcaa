"""megamoe's MoE layer: route (with the context) → dispatch → experts → combine.

Dispatch, experts and combine are Megatron-Core's (`MoELayer` phases, all-to-all or all-gather
token dispatcher, `SequentialMLP`/`GroupedMLP`); only routing goes through megamoe's router
interface so that routers can read the bound context (megamoe.blocks.context) and report
statistics. `moe_forward` runs the phases in Megatron's order; a family that needs values
between phases (Diff-MoE) overrides it and carries them as local values, never on `self`, so a
recomputed or interleaved forward cannot read another call's. Selective `moe` recompute
checkpoints `moe_forward` in the context of its micro-batch (megamoe.blocks.recompute).

A model may hold two stacks of MoE layers whose `layer_number`s overlap (the vlm family's
vision encoder and its language model). `stream` tells them apart wherever a layer is named:
"" for the model's main stack, whose names stay as they were, "encoder" for a vision tower's
(`mark_stream`). Expert logs, Megatron's aux-loss tracker, V-MoE's noise seed, router buffers
in exports and parity results key a layer by (stream, layer_number).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer

from megamoe.blocks.context import current_context
from megamoe.blocks.recompute import checkpoint_in_context


class MegamoeMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        super().__init__(config, submodules, layer_number, pg_collection)
        self.stream = ""                     # which MoE stack of the model (module docstring)
        self.register_buffer("tokens_per_expert_acc", torch.zeros(config.num_moe_experts),
                             persistent=False)
        self.stats_acc: dict = {}            # name -> [sum, count] since the last read
        # modality id -> [E] routed-token counts of that modality's tokens since the last read,
        # in evaluation, for batches whose context has modality ids (`megamoe eval`'s
        # expert-usage heat map, megamoe.commands.eval_vlm); a context marked
        # extras["auxiliary_pass"] (the vlm contrastive text-only pass) is not counted
        self.modality_usage_acc: dict = {}

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None,
                padding_mask: Optional[torch.Tensor] = None):
        """Megatron's `MoELayer.forward` (`padding_mask` [B, S], True = pad) without partial
        CUDA-graph capture."""
        assert intermediate_tensors is None, "partial CUDA-graph capture is not supported"
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("MoE with tensor parallelism needs sequence parallelism")
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        if self.moe_layer_recompute:
            return checkpoint_in_context(self.moe_forward, False, hidden_states, padding_mask)
        return self.moe_forward(hidden_states, padding_mask)

    def moe_forward(self, hidden_states: torch.Tensor,
                    padding_mask: Optional[torch.Tensor] = None):
        """route → preprocess → dispatch → experts → combine → postprocess; returns (output,
        None). `padding_mask`: bool [S, B], True = pad."""
        shared_SBD = self.shared_experts_compute(hidden_states)
        probs, routing_map = self.route(hidden_states, padding_mask)
        tokens, probs = self.preprocess(hidden_states, probs, routing_map)
        tokens, probs = self.dispatch(tokens, probs)
        output, mlp_bias = self.routed_experts_compute(tokens, probs)
        assert mlp_bias is None, "megamoe's experts have no bias"
        output = self.combine(output)
        return self.postprocess(output, shared_SBD), None

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
              **router_kwargs):
        """`padding_mask`: bool [S, B] (Megatron's `MoELayer.forward` transposes the layer's
        [B, S]), True = pad; only families with `takes_padding_mask` accept one."""
        out = self.route_output(hidden_states, padding_mask, **router_kwargs)
        return out.probs_TE, out.routing_map_TE

    def route_output(self, hidden_states, padding_mask=None, **router_kwargs):
        """The router's `RouterOutput` for the bound context; records its counts and statistics
        once per micro-batch (see `record`)."""
        context = current_context()
        if padding_mask is not None:
            if not self.router.takes_padding_mask:
                raise ValueError(f"model.moe.router: {type(self.router).__name__} does not take "
                                 "a padding mask (pads would count in its routing and losses)")
            router_kwargs["padding_mask"] = padding_mask
        out = self.router.route(hidden_states, context, **router_kwargs)
        self.record(out, context)
        return out

    def record(self, out, context=None) -> None:
        """Accumulate routed-token counts and statistics for the logs. In training only the pass
        that builds the graph records: under activation recompute the no-grad first pass is
        repeated in backward, and counting both would count the micro-batch twice."""
        if self.training and not torch.is_grad_enabled():
            return
        if out.tokens_per_expert_E is not None:
            self.tokens_per_expert_acc += out.tokens_per_expert_E.to(self.tokens_per_expert_acc)
        # an encoder's tokens are all of one modality: nothing to split by (eval_vlm)
        if (not self.training and context is not None and context.modality_ids_BS is not None
                and not context.extras.get("auxiliary_pass") and not self.stream):
            self._record_modalities(out.routing_map_TE, context)
        if self.training:
            for name, value in out.stats.items():
                acc = self.stats_acc.setdefault(name, [0.0, 0])
                acc[0], acc[1] = acc[0] + float(value), acc[1] + 1

    @torch.no_grad()
    def _record_modalities(self, routing_map_TE: torch.Tensor, context) -> None:
        """Per-modality routed-token counts of this rank's tokens (its sequence slice under
        SP), for megamoe.commands.eval_vlm.modality_usage."""
        sp = self.config.sequence_parallel
        rank, size = (self.attn_tp_group.rank(), self.attn_tp_group.size()) if sp else (0, 1)
        modality_T = context.tokens("modality_ids_BS", rank, size).to(routing_map_TE.device)
        for m in modality_T.unique().tolist():
            counts_E = routing_map_TE[modality_T == m].sum(dim=0).double().cpu()
            acc = self.modality_usage_acc.setdefault(int(m), torch.zeros_like(counts_E))
            acc += counts_E


def mark_stream(layers, stream: str) -> None:
    """Put MoE `layers` (and their routers) in `stream` (module docstring)."""
    for layer in layers:
        layer.stream = stream
        layer.router.stream = stream


def layer_key(layer) -> str:
    """A layer's name in logs and parity results: "layer N" in the main stack, "<stream>
    layer N" in another."""
    return f"{layer.stream} layer {layer.layer_number}".lstrip()
