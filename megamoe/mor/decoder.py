"""The Mixture-of-Recursions decoder inside Megatron's `GPTModel` (Bae et al., arXiv 2507.10524,
§2.1–§2.2; papers.md §1.2–§1.5).

`MoRDecoder` is a `TransformerBlock` whose layers are, for Middle-Cycle / Middle-Sequence,
the unique first layer → `RecursionBlock` (the shared pool applied N_r times) → the unique
last layer → final norm; for Cycle / Sequence only the recursion block and the norm. GPTModel's rotary table
of the full sequence ([S, 1, 1, d]) is passed through to the block, which gathers it at the
original positions of each step's tokens.

Pipeline parallelism: each stage's `MoRDecoder` holds its stage's units (stages.py: the unique
first layer, the recursion block, the unique last layer, split to balance FLOPs; the block never
split). A stage after the first reads its input from `input_tensor` (Megatron's schedules set
it); the hidden states between stages have the usual [S(/TP), B, D] shape. Only the stage
holding the block has `recursion` (else None) and attaches the depth-router loss.

Under tensor + sequence parallelism the decoder's hidden states are SP shards [S/TP, B, D];
the recursion block gathers the sequence itself (block.py), so every TP rank routes the same
tokens; the depth-router loss is attached on every TP rank (its gradient is replicated, like
the router's computation, and the router weights get no TP reduction).

Depth-router loss: the block's term (coeff · Σ_r BCE, or the token-choice balance / z-loss) is a
mean over the micro-batch's tokens. It joins the LM loss through Megatron's
`MoEAuxLossAutoScaler` exactly like Megatron's MoE aux losses under `calculate_per_token_loss`:
multiplied by the micro-batch's token count S·B, since `finalize_model_grads` divides every
gradient by the global token count (megamoe.moe.routers.topk, docstring).

Checkpoint keys (non-homogeneous, layout-independent, also over pipeline stages):
`decoder.layers.{0,1}` (the unique first and last layer, whichever stage holds them; the
local `layers` list and the module's own state_dict hold this stage's only),
`decoder.recursion.layers.{j}` (pool), `decoder.recursion.router.*` (router weights and the
loss-free `router_bias` buffer), `decoder.final_layernorm`. Every layer's `layer_number` is
its pool slot + 1 (Megatron's MoE loss tracker indexes by it).

Shapes: S sequence, B batch, D hidden, d rotary dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
)
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import WrappedTensor, make_viewless_tensor

from megamoe.blocks.norms import RMSNorm
from megamoe.blocks.recompute import checkpoint_in_context
from megamoe.mor.block import RecursionBlock, build_shared_layers
from megamoe.mor.expert_choice import ExpertChoiceDepthRouter
from megamoe.mor.lora import attach_lora
from megamoe.mor.sharing import SharingPlan, sharing_plan
from megamoe.mor.stages import decoder_units, stage_units
from megamoe.mor.token_choice import Z_LOSS_COEFF, TokenChoiceDepthRouter


def placeholder_spec() -> TransformerBlockSubmodules:
    """The empty block spec MoRDecoder hands its TransformerBlock base (it builds its own
    units instead of a layer list)."""
    return TransformerBlockSubmodules(layer_specs=[], layer_norm=RMSNorm)


def depth_router(mor, hidden_size: int, init_std: float) -> nn.Module:
    """The `model.mor` section's depth router (papers.md §1.4 / §1.5 defaults)."""
    if mor.router == "expert":
        return ExpertChoiceDepthRouter(
            hidden_size, mor.num_recursions, capacities=mor.capacities,
            alpha=mor.resolved_alpha(),
            temperature=mor.temperature, aux_loss_coeff=mor.aux_loss_coeff,
            z_loss_coeff=mor.z_loss_coeff or 0.0, init_std=init_std,
            inference_rule=mor.inference_rule)
    t = mor.token
    return TokenChoiceDepthRouter(
        hidden_size, mor.num_recursions, score=t.score, alpha=mor.resolved_alpha(),
        temperature=mor.temperature, balancing=t.balancing, balance_coeff=t.balance_coeff,
        z_loss_coeff=Z_LOSS_COEFF if mor.z_loss_coeff is None else mor.z_loss_coeff,
        bias_rate=t.bias_rate, init_std=init_std)


class MoRDecoder(TransformerBlock):
    """This pipeline stage's units of the MoR decoder (see module doc); `units` ⊆ ("first",
    "block", "last") in order, `router` None when the block is elsewhere."""

    UNIQUE_KEYS = {"first": 0, "last": 1}       # checkpoint index of the unique layers

    def __init__(self, config, plan: SharingPlan, router: nn.Module | None, moe_slots: set,
                 layer_spec_kwargs: dict, pg_collection, *, kv_sharing: bool = False,
                 gating: str = "weighted", units: tuple | None = None,
                 pre_process: bool = True, post_process: bool = True):
        units = decoder_units(plan.strategy) if units is None else tuple(units)
        assert units and ("block" in units) == (router is not None), (units, router)
        self.units = units
        self._mor_args = (plan, router, moe_slots, layer_spec_kwargs, kv_sharing, gating)
        super().__init__(config=config, spec=placeholder_spec(), pre_process=pre_process,
                         post_process=post_process, pg_collection=pg_collection)
        del self._mor_args

    def _build_layers(self):
        super()._build_layers()            # the final norm (no layers in the placeholder spec)
        plan, router, moe_slots, kwargs, kv_sharing, gating = self._mor_args
        pg = self.pg_collection
        slots = {"first": plan.first_unique, "last": plan.last_unique}
        unique = [u for u in self.units if u != "block"]
        self.layers = build_shared_layers(self.config, [slots[u] for u in unique], moe_slots,
                                          pg, **kwargs)
        self.layer_keys = [self.UNIQUE_KEYS[u] for u in unique]
        self.recursion = None
        if "block" in self.units:
            steps = plan.recursion_steps()
            pool_slots = sorted({s for step in steps for s in step})
            index = {slot: i for i, slot in enumerate(pool_slots)}
            pool = build_shared_layers(self.config, pool_slots, moe_slots, pg, **kwargs)
            sp_group = pg.tp if self.config.sequence_parallel else None
            self.recursion = RecursionBlock(pool, [tuple(index[s] for s in st) for st in steps],
                                            router, kv_sharing=kv_sharing, gating=gating,
                                            sp_group=sp_group)

    def forward(self, hidden_states, attention_mask, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, padding_mask=None, **_):
        if inference_context is not None or packed_seq_params is not None:
            raise NotImplementedError("model.mor: Megatron inference contexts and packed "
                                      "sequences are not supported by the recursion block; "
                                      "generate with megamoe.mor.generate.MoRGenerator")
        if not self.pre_process:            # the previous stage's output (set_input_tensor)
            hidden_states = self.input_tensor
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        h_SBD = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        runs = self._unit_runs(attention_mask)
        for start, end, checkpointed in self._recompute_groups(len(runs)):
            def run(h_SBD, rope, start=start, end=end):
                for unit_run in runs[start:end]:
                    h_SBD = unit_run(h_SBD, rope)
                return h_SBD
            if checkpointed:
                h_SBD = checkpoint_in_context(run, self.config.distribute_saved_activations,
                                              h_SBD, rotary_pos_emb)
            else:
                h_SBD = run(h_SBD, rotary_pos_emb)
        if self.final_layernorm is not None:
            h_SBD = make_viewless_tensor(inp=self.final_layernorm(h_SBD), requires_grad=True,
                                         keep_graph=True)
        return h_SBD

    def _unit_runs(self, attention_mask) -> list:
        """One function (h, rope) → h per unit of this stage; the block's attaches the depth
        router's loss inside, so that a recomputed block attaches it to its rebuilt graph."""
        unique = iter(self.layers)
        runs = []
        for unit in self.units:
            if unit == "block":
                runs.append(lambda h, rope: self._with_aux_loss(self.recursion(h, rope)))
            else:
                layer = next(unique)
                runs.append(lambda h, rope, layer=layer: layer(
                    hidden_states=h, attention_mask=attention_mask, rotary_pos_emb=rope)[0])
        return runs

    def _recompute_groups(self, n: int) -> list:
        """(start, end, checkpointed) over the n units; full recompute treats each unit (a
        unique layer, or the whole recursion block with its own depth routing, K/V cache and
        LoRA selection) as one layer of Megatron's `uniform` / `block` methods."""
        c = self.config
        if c.recompute_granularity != "full" or not self.training:
            return [(0, n, False)]
        k = c.recompute_num_layers
        if c.recompute_method == "uniform":
            return [(i, min(i + k, n), True) for i in range(0, n, k)]
        return [(i, i + 1, i < k) for i in range(n)]

    def _with_aux_loss(self, h_SBD: torch.Tensor) -> torch.Tensor:
        """Attach the depth router's loss (a mean over the micro-batch) scaled per token."""
        aux = self.recursion.last_aux_loss
        if aux is None or not (self.training and torch.is_grad_enabled()) or not aux.requires_grad:
            return h_SBD
        if self.config.calculate_per_token_loss:     # the micro-batch's S·B (all SP shards)
            sp = self.recursion.sp_group
            aux = aux * (h_SBD.shape[0] * h_SBD.shape[1] * (sp.size() if sp is not None else 1))
        if MoEAuxLossAutoScaler.main_loss_backward_scale is None:
            # Megatron's schedule sets the scale only for MoE models; set it as it would (its
            # [1] shape: a later MoE model in this process copies into it), loss scale 1
            MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=h_SBD.device))
        return MoEAuxLossAutoScaler.apply(h_SBD, aux)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        assert not sharded_offsets, "MoR checkpoint keys carry no pipeline offsets"
        out = {}
        for i, (key, layer) in enumerate(zip(self.layer_keys, self.layers)):
            # the module's own (local) name in the dict, the global one in the checkpoint
            layer_sd = layer.sharded_state_dict(f"{prefix}layers.{i}.", (), metadata)
            replace_prefix_for_sharding(layer_sd, f"{prefix}layers.{i}.", f"{prefix}layers.{key}.")
            out.update(layer_sd)
        if self.recursion is not None:
            for j, layer in enumerate(self.recursion.layers):
                out.update(layer.sharded_state_dict(f"{prefix}recursion.layers.{j}.", (),
                                                    metadata))
            out.update(sharded_state_dict_default(self.recursion.router,
                                                  f"{prefix}recursion.router.", (), metadata,
                                                  tp_group=self.tp_group))
            if self.recursion.lora is not None:  # RRT adapters: recursion.lora.{r}.{j}.{target}
                out.update(self.recursion.lora.sharded_state_dict(f"{prefix}recursion.lora.", (),
                                                                  metadata))
        if self.final_layernorm is not None:
            out.update(sharded_state_dict_default(self.final_layernorm,
                                                  f"{prefix}final_layernorm.", (), metadata,
                                                  tp_group=self.tp_group))
        return out


def build_mor_decoder(cfg, tconfig, pg_collection, layer_spec_kwargs: dict, *,
                      vocab_size: int, pre_process: bool = True,
                      post_process: bool = True) -> MoRDecoder:
    """The decoder `build_lm` builds for `model.mor.enabled` (the LMModel's decoder): this
    pipeline stage's units (stages.stage_units, FLOP-balanced)."""
    from megamoe.mor.checks import mor_moe_slots
    from megatron.core.utils import get_pg_rank

    m, mor = cfg.model, cfg.model.mor
    plan = sharing_plan(mor.sharing, m.num_layers, mor.num_recursions)
    pp = tconfig.pipeline_model_parallel_size
    units = (stage_units(cfg, vocab_size, pp)[get_pg_rank(pg_collection.pp)] if pp > 1
             else decoder_units(mor.sharing))
    router = (depth_router(mor, m.hidden_size, m.init_method_std).to(tconfig.params_dtype)
              if "block" in units else None)
    decoder = MoRDecoder(tconfig, plan, router, mor_moe_slots(cfg) if tconfig.num_moe_experts
                         else set(), layer_spec_kwargs, pg_collection, kv_sharing=mor.kv_sharing,
                         gating=mor.gating, units=units, pre_process=pre_process,
                         post_process=post_process)
    if decoder.recursion is not None:
        attach_lora(decoder.recursion, mor)
    return decoder


def mor_decoders(chunks) -> list[MoRDecoder]:
    """The MoR decoders of `chunks` that hold a recursion block (under pipeline parallelism
    one stage's; the others' list is empty)."""
    return [mod for c in chunks for mod in c.modules()
            if isinstance(mod, MoRDecoder) and mod.recursion is not None]


@torch.no_grad()
def mor_after_step(chunks, dp_group=None) -> None:
    """End of an optimizer step: the token-choice loss-free bias update, with the assignment
    ratios of the step's micro-batches averaged over every data-parallel rank first."""
    for decoder in mor_decoders(chunks):
        router = decoder.recursion.router
        if not isinstance(router, TokenChoiceDepthRouter):
            continue
        if router.balancing == "loss_free" and dist.is_initialized() and \
                dist.get_world_size(dp_group) > 1:
            dist.all_reduce(router.ratio_sum, group=dp_group)
            dist.all_reduce(router.ratio_count, group=dp_group)
        router.update_bias()
