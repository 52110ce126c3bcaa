"""The class-conditional diffusion transformer on Megatron-Core (DiT, Peebles & Xie 2023;
DiT-MoE, papers.md §6): patch embedding with fixed 2-D sin-cos positions → adaLN-Zero blocks
(megamoe.specs.dit; dense or MoE FFNs) → final adaLN layer → unpatchify.

Conditioning. c = TimestepEmbedder(t) + ClassEmbedder(y) [B, D] is computed in the model's
forward from the raw timesteps and (already dropped) labels of the context, then bound as the
context's `timestep_emb_BD`, where every block (and Diff-MoE's router) reads it.

Pipeline parallelism. Raw (t, y) travel in the context, which the task builds on every stage;
nothing but the hidden states is sent point to point. The two embedders are therefore
replicated on every pipeline chunk, with identical values (initialisation is a function of the
global parameter name) and identical updates: `embedder_grad_sync` (the family's `grad_sync`)
sums their gradients over the chunks of the rank and the pipeline group before Megatron's DP
reduction, as Megatron does for tied word embeddings. In checkpoints only the first chunk's
copy is the main replica, and only its gradient counts in the gradient norm (the others
carry Megatron's `shared` mark, as a tied output layer does). The alternative, sending c
between stages, needs a second p2p tensor per micro-batch and a backward for it, which
Megatron's schedules do not carry; the embedders are small (about D² + (F + K)·D).

Sequence parallelism. The patch embedding runs on the whole image and is scattered along the
sequence (its backward gathers: replicated parameters, whole gradient). The final layer runs on
this rank's token slice, so every use of c is a partial sum over TP, and the embedders, the
blocks' and the final layer's modulations carry Megatron's `sequence_parallel` mark; the
prediction is then gathered with a backward that only splits, and every TP rank computes the
same loss.

EMA. Each chunk keeps an fp32 exponential moving average of its parameters (megamoe.models.dit
.ema), saved and resharded with them.

Shapes: B images, C channels, H = W image side, P patch side, S = N tokens (this rank's slice
under SP), D width.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from megatron.core.enums import ModelType
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from megamoe.blocks.context import Context, bind
from megamoe.blocks.embeddings import (ClassEmbedder, PatchEmbedding, TimestepEmbedder,
                                       unpatchify)
from megamoe.blocks.recompute import ContextTransformerBlock
from megamoe.config.diffusion import dit_grid_side
from megamoe.models.dit.ema import EMAShadow, with_ema_entries
from megamoe.models.lm.model import mark_expert_replicas
from megamoe.models.transformer_config import shared_settings
from megamoe.moe.routers import router_builder
from megamoe.specs.dit import PlainLayerNorm, dit_block_spec, modulate
from megamoe.specs.gpt_moe import moe_layer_pattern

CHANNELS = 3
EMBEDDERS = ("t_embedder.", "y_embedder.")     # replicated on every pipeline chunk


def transformer_config(cfg, dims, *, sequence_parallel: bool, dtype: torch.dtype
                       ) -> TransformerConfig:
    """DiT's block: biased linears, GELU MLPs (dense and experts), multi-head attention
    (grouped-query with `model.num_query_groups`); the norms are the spec's (no affine)."""
    m = cfg.model
    return TransformerConfig(
        **shared_settings(cfg, dims, sequence_parallel=sequence_parallel, dtype=dtype),
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        kv_channels=m.kv_channels,
        normalization="LayerNorm",
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu,
    )


class FinalLayer(MegatronModule):
    """DiT's final layer: LN → modulate with (shift, scale) = W·SiLU(c) + b → Linear D → P²·C.
    The modulation and the projection start at zero (adaLN-Zero), so the first prediction is
    0 for every input."""

    def __init__(self, config, patch_size: int, channels: int = CHANNELS):
        super().__init__(config)
        D, dtype, out = config.hidden_size, config.params_dtype, patch_size ** 2 * channels
        self.norm = PlainLayerNorm(config, D, eps=config.layernorm_epsilon)
        self.adaln_zero_weight = torch.nn.Parameter(torch.zeros(2 * D, D, dtype=dtype))
        self.adaln_zero_bias = torch.nn.Parameter(torch.zeros(2 * D, dtype=dtype))
        self.adaln_zero_out_weight = torch.nn.Parameter(torch.zeros(out, D, dtype=dtype))
        self.adaln_zero_out_bias = torch.nn.Parameter(torch.zeros(out, dtype=dtype))
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x_SBD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        mod_B2D = torch.nn.functional.linear(torch.nn.functional.silu(c_BD),
                                             self.adaln_zero_weight, self.adaln_zero_bias)
        shift_1BD, scale_1BD = mod_B2D[None].chunk(2, dim=-1)
        h_SBD = modulate(self.norm(x_SBD), shift_1BD, scale_1BD)
        return torch.nn.functional.linear(h_SBD, self.adaln_zero_out_weight,
                                          self.adaln_zero_out_bias)


def dit_context(sample_index_B, timesteps_B, labels_B, step: int | None = None,
                targets_BSP=None) -> Context:
    """The context of a DiT micro-batch: raw timesteps (the embedder's units) and labels (after
    the classifier-free-guidance drop), built on every pipeline stage; in training also the
    patchified diffusion target per token (`targets_BSP`, what Race's PLR head predicts)."""
    return Context(sample_index_B=sample_index_B, class_labels_B=labels_B, step=step,
                   targets_BSP=targets_BSP, extras={"timesteps_B": timesteps_B})


def dit_router(moe, patch_size: int):
    """The MoE layers' router builder; Race's PLR head (`race.plr_coeff` > 0) regresses the
    per-token diffusion target, p²·C values (megamoe.moe.routers.race)."""
    builder = router_builder(moe)
    if moe.num_experts and moe.router == "race" and moe.race.plr_coeff > 0:
        builder = functools.partial(builder, plr_regression_size=patch_size ** 2 * CHANNELS)
    return builder


class DiTModel(MegatronModule):
    """One pipeline chunk of the DiT (module docstring). `forward(x_t, target, context=...)`
    returns the per-image mean squared error [B] on the last stage when `target` is given,
    the prediction [B, C, H, W] without it, and the hidden states [S, B, D] on other stages."""

    def __init__(self, config: TransformerConfig, spec, *, image_size: int, patch_size: int,
                 num_classes: int, frequency_size: int, pre_process: bool, post_process: bool,
                 pg_collection, vp_stage: int | None = None, replica_index: int = 0):
        super().__init__(config)
        self.pre_process, self.post_process = pre_process, post_process
        self.tp_group, self.patch_size = pg_collection.tp, patch_size
        self.replica_index = replica_index   # 0 on the first chunk: its embedders are main
        self.model_type = ModelType.encoder_or_decoder
        # Megatron's finalize_model_grads asks every first/last stage for a tied embedding
        self.share_embeddings_and_output_weights = False
        if pre_process:
            self.x_embedder = PatchEmbedding(config, image_size=image_size,
                                             patch_size=patch_size, class_token=False,
                                             position_embedding="sincos")
        self.t_embedder = TimestepEmbedder(config, frequency_size)
        self.y_embedder = ClassEmbedder(config, num_classes)
        for module in (self.t_embedder, self.y_embedder):
            for p in module.parameters():
                p.sequence_parallel = config.sequence_parallel
                # a copy: counted once in the gradient norm (Megatron's tied-embedding mark)
                p.shared = replica_index > 0
        self.decoder = ContextTransformerBlock(config=config, spec=spec, pre_process=pre_process,
                                               post_process=post_process,
                                               pg_collection=pg_collection, vp_stage=vp_stage,
                                               post_layer_norm=False)
        if post_process:
            self.final_layer = FinalLayer(config, patch_size)
        self.ema = None      # EMAShadow, attached once the parameters are final (build_dit)

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's pipeline schedules hand a stage its input here."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "one input tensor per chunk"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def conditioning(self, context: Context) -> torch.Tensor:
        """c [B, D] = t_embedder(t) + y_embedder(y) of the context's raw timesteps and labels."""
        t_B = context.extras.get("timesteps_B")
        if t_B is None or context.class_labels_B is None:
            raise ValueError("the dit model needs the batch's timesteps and class labels in "
                             "its context (megamoe.models.dit.model.dit_context)")
        device = self.t_embedder.mlp_in.weight.device
        return self.t_embedder(t_B.to(device)) + self.y_embedder(context.class_labels_B.to(device))

    def forward(self, x_t_BCHW, target_BCHW=None, *, context: Context):
        c_BD = self.conditioning(context)
        with bind(dataclasses.replace(context, timestep_emb_BD=c_BD)):
            hidden_SBD = None
            if self.pre_process:
                hidden_SBD = self.x_embedder(x_t_BCHW.float().to(c_BD.dtype))
                if self.config.sequence_parallel:
                    hidden_SBD = scatter_to_sequence_parallel_region(hidden_SBD,
                                                                     group=self.tp_group)
            hidden_SBD = self.decoder(hidden_states=hidden_SBD, attention_mask=None)
            if not self.post_process:
                return hidden_SBD
            out_SBP = self.final_layer(hidden_SBD, c_BD)
        if self.config.sequence_parallel:
            out_SBP = gather_from_sequence_parallel_region(
                out_SBP, tensor_parallel_output_grad=False, group=self.tp_group)
        pred_BCHW = unpatchify(out_SBP.transpose(0, 1), self.patch_size, CHANNELS)
        if target_BCHW is None:
            return pred_BCHW
        err_BCHW = (pred_BCHW.float() - target_BCHW.to(pred_BCHW.device).float()) ** 2
        return err_BCHW.mean(dim=(1, 2, 3))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """Megatron's, with the embedders of every chunk but the first marked as replicas and
        the EMA of each parameter sharded exactly like it (key `ema.` + its key)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.replica_index:
            for name, sh in sd.items():
                if name[len(prefix):].startswith(EMBEDDERS):
                    assert isinstance(sh.replica_id, tuple), (name, sh.replica_id)
                    sh.replica_id = (self.replica_index, *sh.replica_id[1:])
        return with_ema_entries(self, sd, prefix)


def build_dit(cfg, tconfig: TransformerConfig, pg_collection, num_classes: int) -> list:
    """This rank's chunks (one per virtual pipeline stage) of the DiT `cfg` describes,
    initialised (as a function of the global parameter) and with their EMA set to the initial
    weights, as DiT's training starts it."""
    from megamoe.models.init import init_global
    from megamoe.models.vit.model import drop_router_biases

    m, moe, d = cfg.model, cfg.model.moe, cfg.model.dit
    dit_grid_side(cfg)
    pattern = moe_layer_pattern(m.num_layers, moe.layer_freq, tconfig.num_moe_experts or 0)
    vp = tconfig.virtual_pipeline_model_parallel_size
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    chunks = []
    for vp_stage in (range(vp) if vp else [None]):
        spec = dit_block_spec(tconfig, pattern, router=dit_router(moe, d.patch_size),
                              shared_expert=bool(moe.shared_expert_ffn_hidden_size),
                              pg_collection=pg_collection, experts=moe.experts,
                              fp8=moe.fp8, vp_stage=vp_stage, pp_rank=pp_rank)
        chunks.append(DiTModel(
            tconfig, spec, image_size=cfg.data.image_size, patch_size=d.patch_size,
            num_classes=num_classes, frequency_size=d.frequency_embedding_size,
            pre_process=pp_rank == 0 and vp_stage in (None, 0),
            post_process=pp_rank == pp_size - 1 and vp_stage in (None, (vp or 1) - 1),
            pg_collection=pg_collection, vp_stage=vp_stage,
            replica_index=pp_rank + pp_size * (vp_stage or 0)))
    drop_router_biases(chunks)
    mark_expert_replicas(chunks, tconfig)
    for chunk in chunks:
        chunk.ema = EMAShadow(chunk, d.ema_decay)
    init_global(chunks, cfg.run.seed, m.init_method_std, m.num_layers)
    for chunk in chunks:
        chunk.ema.reset()
    return chunks


def embedder_grad_sync(chunks, grids):
    """The family's `grad_sync`: the embedders' gradients summed over this rank's chunks and
    the pipeline group (module docstring); None with one chunk in all."""
    pp = grids.lm.pp
    if len(chunks) == 1 and pp.size() == 1:
        return None
    import torch.distributed as dist

    def named(chunk):
        return {n: p for n, p in chunk.named_parameters() if n.startswith(EMBEDDERS)}

    copies = [named(c) for c in chunks]

    def sync():
        for name in copies[0]:
            total = sum(c[name].main_grad for c in copies)
            if pp.size() > 1:
                dist.all_reduce(total, group=pp)
            for c in copies:
                c[name].main_grad.copy_(total)

    return sync


@torch.no_grad()
def predict(chunks, x_t_BCHW: torch.Tensor, timesteps_B: torch.Tensor, labels_B: torch.Tensor
            ) -> torch.Tensor:
    """The model's prediction [B, C, H, W] (v for rectified flow, ε for DDPM) for noisy images
    at the scheduler's `timesteps_B` (diffusers' units: σ·T, or the DDPM step) and labels (the
    null class `num_classes` for the unconditional half of classifier-free guidance), in eval
    mode. The model must be whole on this rank (one chunk, no pipeline split)."""
    assert len(chunks) == 1, "predict runs a model that is whole on this rank"
    model = getattr(chunks[0], "module", chunks[0])
    assert model.pre_process and model.post_process, "predict needs every stage"
    was_training = model.training
    model.eval()
    try:
        return model(x_t_BCHW, context=dit_context(None, timesteps_B, labels_B))
    finally:
        model.train(was_training)
