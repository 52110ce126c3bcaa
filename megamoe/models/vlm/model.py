"""The multimodal MoE model: the `vit` family's bidirectional encoder → pixel shuffle → a
two-layer GELU connector (Megatron's `MultimodalProjector`) → the `lm` family's MoE decoder,
with the image embeddings written over the image-placeholder tokens of the text (the shape of
Megatron-Core's MIMO: modality submodules + a special token id).

Why not Megatron's `LLaVAModel`: on CPU it asserts Transformer Engine attention whenever the LM
uses sequence parallelism, its `CLIPViTModel` does not construct on CPU and the local ViT spec
is causal. So the LM is megamoe's `LMModel` (a `GPTModel`) fed `decoder_input`, the encoder is
megamoe's bidirectional block, and the projector is Megatron's own.

Layout. Encoder and connector live on the first pipeline stage (Megatron's choice too), on the
LM's grid: the encoder shares the LM's TP (and SP: its patch tokens are split along the
sequence inside the encoder and gathered at its end), its experts the LM's EP. The boundary
tensor (connector output) is TP-replicated: the connector's row-parallel output is all-reduced,
the text embedding is built without the sequence scatter, the two are merged at full length,
and only then split for SP. Backward mirrors it: the scatter's backward gathers the full
gradient on every TP rank, the column-parallel connector input all-reduces it, and the encoder's
final gather only splits — each encoder parameter's gradient is counted once.

MoE FFNs in the encoder (`model.vlm.encoder_moe_layer_freq`) take model.moe's experts and
router. Their experts live on the LM's expert grid — its EP, expert-TP and expert-DP groups,
which span the first stage's ranks whatever the encoder's own TP and DP — so tokens are
dispatched by all-to-all within the LM's EP group, on either grid. Every encoder token sits on
exactly one first-stage rank (its encoder DP slice, its SP shard), so an expert's gradient is
complete once Megatron has reduced it over the expert-DP group, like the LM's experts; on the
encoder's own grid they are therefore marked expert parameters (`allreduce=False`) and left out
of the replica sum of `encoder_grad_sync`, which is for the encoder's replicated parameters.
Their layers are the "encoder" stream (megamoe.moe.layer): logs, aux losses, router noise and
router buffers name them apart from the LM's layers of the same number.

Each stream has its own context: the encoder's (every token an image patch, `modality_ids` 1)
and the LM's (text 0, image placeholders 1), each bound by the module that runs it.

Shapes: B micro-batch, S text sequence, N patches per image, n = N / r² image tokens, E encoder
width, D LM width, V vocabulary (padded, split over TP).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import torch.distributed as dist
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import MLPSubmodules

from megamoe.blocks.context import Context, bind
from megamoe.blocks.packed import per_sample_sum, rotary_at_positions, sample_numbers
from megamoe.config.vlm import PAD_TOKEN_ID
from megamoe.models.lm.model import LMModel

TEXT, IMAGE = 0, 1      # modality ids the routers and norms see


def pixel_shuffle(features_NBE: torch.Tensor, side: int, r: int, slices: int = 1
                  ) -> torch.Tensor:
    """[N, B, E] row-major patch tokens → [N / r², B, r²·E]: each r×r block of neighbouring
    patches concatenated (row within the block, then column, then channel) into one token,
    the blocks in row-major order. Video: N = slices · side² tokens, time slice by time slice
    (megamoe.blocks.tubelets); each slice is shuffled on its own, the slices stay in order."""
    if r == 1:
        return features_NBE
    if slices > 1:            # the time slices as extra batch rows: [side², slices·B, E]
        N, B, E = features_NBE.shape
        x = features_NBE.reshape(slices, N // slices, B, E).transpose(0, 1)
        x = pixel_shuffle(x.reshape(N // slices, slices * B, E), side, r)
        n = x.shape[0]
        return x.reshape(n, slices, B, r * r * E).transpose(0, 1).reshape(n * slices, B, -1)
    N, B, E = features_NBE.shape
    x = features_NBE.permute(1, 0, 2).reshape(B, side // r, r, side // r, r, E)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, (side // r) ** 2, r * r * E)
    return x.transpose(0, 1).contiguous()


def connector(lm_config, *, input_size: int, hidden_size: int, pg_collection):
    """LLaVA-1.5's projector: Linear(input → hidden) · GELU · Linear(hidden → D), both biased,
    column- then row-parallel over TP (input and output TP-replicated: no sequence split)."""
    config = copy.copy(lm_config)
    config.ffn_hidden_size = hidden_size
    config.add_bias_linear = True
    config.gated_linear_unit = False
    config.activation_func = F.gelu
    config.sequence_parallel = False
    config.num_moe_experts = None
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return MultimodalProjector(config, submodules, "mlp", input_size, tp_group=pg_collection.tp)


def vision_context(batch: dict, step: int | None, encoder_tokens: int) -> Context:
    """The encoder stream's context: every token (patches, class token) is image."""
    B = batch["images"].shape[0]
    return Context(sample_index_B=batch.get("sample_index"),
                   modality_ids_BS=torch.full((B, encoder_tokens), IMAGE, dtype=torch.long),
                   step=step)


def _routes_pads_nowhere(decoder) -> bool:
    """Whether every MoE router of the decoder can leave pad tokens out (and the decoder is no
    MoR one, whose recursion block has its own pad rule)."""
    from megamoe.models.lm.model import moe_layers
    from megamoe.mor.decoder import MoRDecoder

    return not isinstance(decoder, MoRDecoder) and all(
        layer.router.takes_padding_mask for layer in moe_layers([decoder]))


class VLMModel(LMModel):
    """One pipeline chunk of the multimodal model (module docstring): the LM chunk, plus the
    encoder and connector on the first stage. `forward(tokens, position_ids, None, images=…,
    labels=…, context=…, vision_context=…)` returns the LM's (per-token losses [B, S],
    argmax-correct [B, S]) on the last stage with labels, its logits without, and the hidden
    states on the other stages."""

    def __init__(self, config, build_decoder, *, vision=None,
                 projector=None, image_token_id: int, patch_side: int, pixel_shuffle: int,
                 vision_grid=None, contrastive=None, packed_positions: bool = False,
                 time_slices: int = 1, **gpt_kwargs):
        super().__init__(config, build_decoder, scatter_embedding_sequence_parallel=False,
                         **gpt_kwargs)
        assert (vision is None) == (projector is None) and (vision is None) != self.pre_process
        self.vision, self.connector = vision, projector
        self.vision_grid = vision_grid      # None: the encoder shares the LM's grid
        self.contrastive = contrastive      # ContrastiveHead (one pipeline stage only)
        self.image_token_id, self.patch_side, self.shuffle = image_token_id, patch_side, \
            pixel_shuffle
        self.time_slices = time_slices      # video: tubelet time slices per clip
        self._correct = None
        self.routes_pads_nowhere = _routes_pads_nowhere(self.decoder)
        self.packed_positions = packed_positions     # data.packing: RoPE at position_ids

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        """GPTModel's, with packed sequences' RoPE read at `position_ids` (restarting per
        sample): Megatron builds the rotary table from the sequence length alone
        (megamoe.blocks.packed). Runs on every pipeline stage, each with the batch's ids."""
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if not self.packed_positions or out[1] is None or position_ids is None:
            return out
        return (out[0], rotary_at_positions(out[1], position_ids), *out[2:])

    def forward(self, input_ids, position_ids, attention_mask, *, images=None, labels=None,
                context: Context | None = None, vision_context: Context | None = None,
                caption_tokens=None, caption_end=None):
        """With a contrastive head and labels, the last stage also returns the contrastive
        (loss sum, pairs) of the micro-batch against its data-parallel peers."""
        decoder_input = image_nBD = None
        if self.pre_process:
            decoder_input, image_nBD = self.embed(input_ids, position_ids, images, context,
                                                  vision_context)
        output = super().forward(input_ids, position_ids, attention_mask,
                                 decoder_input=decoder_input, labels=labels, context=context,
                                 padding_mask=self.padding_mask(context))
        if not (self.post_process and labels is not None):
            return output
        correct, self._correct = self._correct, None
        if self.contrastive is None:
            return output, correct
        from megamoe.models.contrastive import contrastive_loss

        text_BD = self.caption_states(caption_tokens, caption_end, context)
        pair = contrastive_loss(*self.contrastive(image_nBD.mean(dim=0), text_BD),
                                dp_group=self.pg_collection.dp)
        return output, correct, pair

    def padding_mask(self, context: Context | None) -> torch.Tensor | None:
        """Megatron's `padding_mask` for this chunk's decoder: bool [B, S(/TP)], True at the
        context's pad tokens (the rest of a sample, a packed row's tail), which its MoE routers
        then route nowhere — out of the experts' work, capacity, counts and balancing losses.
        Split here under SP (Megatron's scatter; GPTModel splits it only when it embeds the
        tokens itself). None without pads in the context, or when a router of the chunk cannot
        leave tokens out (`takes_padding_mask`) or the decoder is MoR's (its block has its own
        pad rule): pads are then routed like any token."""
        pads_BS = context.padding_mask_BS if context is not None else None
        if pads_BS is None or not self.routes_pads_nowhere:
            return None
        pads_BS = pads_BS.to(next(self.parameters()).device)
        if self.config.sequence_parallel:
            pads_BS = scatter_to_sequence_parallel_region(
                pads_BS.transpose(0, 1).contiguous(), group=self.tp_group).transpose(0, 1)
        return pads_BS

    def caption_states(self, tokens_BL, end_B, context: Context | None) -> torch.Tensor:
        """[B, D]: the decoder's final-normed state at each caption's <eos>, from a text-only
        pass over the captions (positions 0…L−1, every token text). Under SP the states are
        gathered with a backward that only splits: the loss on them is TP-replicated."""
        B, L = tokens_BL.shape
        positions_BL = torch.arange(L, device=tokens_BL.device).unsqueeze(0).expand(B, -1)
        hidden = self.embedding(input_ids=tokens_BL, position_ids=positions_BL)   # [L, B, D]
        if self.config.sequence_parallel:
            hidden = scatter_to_sequence_parallel_region(hidden, group=self.tp_group)
        text = Context(sample_index_B=context.sample_index_B if context is not None else None,
                       modality_ids_BS=torch.full((B, L), TEXT, dtype=torch.long),
                       padding_mask_BS=tokens_BL == PAD_TOKEN_ID,
                       step=context.step if context is not None else None,
                       extras={"auxiliary_pass": True})
        with bind(text):
            hidden = self.decoder(hidden_states=hidden, attention_mask=None,
                                  rotary_pos_emb=self.rotary_pos_emb(L),
                                  padding_mask=self.padding_mask(text))
        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=self.tp_group)
        return hidden[end_B.to(hidden.device), torch.arange(B, device=hidden.device)]

    def embed(self, input_ids_BS, position_ids_BS, images_BCHW, context: Context | None,
              vision_context: Context | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the decoder's input [S(/TP), B, D]: text embeddings with the connector's image
        embeddings at the placeholder positions, split for SP last; the image embeddings
        [n, B, D])."""
        if self.vision_grid is None:
            features_NBE = self.vision.features(images_BCHW, context=vision_context)
        else:
            features_NBE = self.encode_on_vision_grid(images_BCHW, vision_context)
        image_nBD = self.connector(pixel_shuffle(features_NBE, self.patch_side, self.shuffle,
                                                 self.time_slices))
        text_SBD = self.embedding(input_ids=input_ids_BS, position_ids=position_ids_BS)
        placeholders_BS = input_ids_BS == self.image_token_id
        check_placeholders(placeholders_BS, image_nBD.shape[0], context, images_BCHW.shape[0],
                           vision_context.sample_index_B if vision_context is not None else None)
        merged_BSD = text_SBD.transpose(0, 1).masked_scatter(
            placeholders_BS.unsqueeze(-1), image_nBD.transpose(0, 1).to(text_SBD.dtype))
        merged_SBD = merged_BSD.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            merged_SBD = scatter_to_sequence_parallel_region(merged_SBD, group=self.tp_group)
        return merged_SBD, image_nBD

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Megatron's sharded state, with the encoder's replicas on its own grid told apart:
        Megatron derives a replica id from the module's TP group (size 1 here) and the LM's DP
        rank, which the LM's TP ranks share, so each would claim to be the main replica and
        the save is refused. Encoder TP 1 replicates it on every first-stage rank: the
        stage's rank 0 is the main replica."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.vision_grid is not None:
            replica = (0, 0, self.vision_grid.first_stage.rank())
            for key, item in state.items():
                # experts keep Megatron's ids: they are sharded on the LM's expert grid
                if (key.startswith(f"{prefix}vision.") and hasattr(item, "replica_id")
                        and ".mlp.experts." not in key):
                    item.replica_id = replica
        return state

    def encode_on_vision_grid(self, images_BCHW, vision_context: Context) -> torch.Tensor:
        """The encoder on its own grid (megamoe.parallel.grids.VisionGrid): the first stage's
        micro-batch (every LM DP rank's b samples, gathered in LM DP order = sample order)
        is split into the encoder DP ranks' slices; this rank encodes slice k, and the
        boundary hands each LM rank its own samples' features (`VisionToLM`)."""
        g, dp = self.vision_grid, self.pg_collection.dp
        b = images_BCHW.shape[0]
        images_FCHW = _gather_rows(images_BCHW, dp)            # F = b · LM DP samples
        index_F = _gather_rows(vision_context.sample_index_B, dp)
        rows = vision_rows(g.dp_rank, g.pg.dp.size(), images_FCHW.shape[0])
        context = vision_context_of(index_F[rows], vision_context)
        features_NbE = self.vision.features(images_FCHW[rows], context=context)
        return VisionToLM.apply(features_NbE, g, lm_rows(dp.rank(), b))


    def compute_language_model_loss(self, labels, logits):
        """Megatron's per-token loss; also records, for the forward that asked, whether each
        token's argmax over the (TP-split) vocabulary is its label (read back in `forward`)."""
        self._correct = argmax_is_label(logits, labels, self.pg_collection.tp)
        return super().compute_language_model_loss(labels, logits)


def _gather_rows(x_B: torch.Tensor, group) -> torch.Tensor:
    """`x` of every rank of `group`, concatenated along dim 0 in group order (no gradient:
    inputs only)."""
    if group.size() == 1:
        return x_B
    parts = [torch.empty_like(x_B) for _ in range(group.size())]
    dist.all_gather(parts, x_B.contiguous(), group=group)
    return torch.cat(parts)


def vision_rows(k: int, vision_dp: int, F: int) -> slice:
    """The first-stage micro-batch rows encoder DP rank k encodes."""
    per = F // vision_dp
    return slice(k * per, (k + 1) * per)


def lm_rows(j: int, b: int) -> slice:
    """The first-stage micro-batch rows LM DP rank j trains on."""
    return slice(j * b, (j + 1) * b)


def vision_context_of(index_b: torch.Tensor, lm_side: Context) -> Context:
    """The encoder stream's context for the rows it encodes (same fields as
    `vision_context`, for those samples)."""
    S = lm_side.modality_ids_BS.shape[1]
    return Context(sample_index_B=index_b,
                   modality_ids_BS=torch.full((len(index_b), S), IMAGE, dtype=torch.long),
                   step=lm_side.step)


class VisionToLM(torch.autograd.Function):
    """The boundary between the encoder's grid and the LM's. Forward: gather the encoder DP
    ranks' features (TP-replicated within the encoder's TP group) into the first stage's
    whole micro-batch and keep this LM rank's rows. Backward: every first-stage rank holds
    the gradient of its LM rows — identical on the LM's tl TP ranks — so the whole
    micro-batch's gradient is the sum over the stage divided by tl, of which this encoder
    rank takes its own rows. Encoder parameter gradients are then summed over the encoder's
    DP ranks (`encoder_grad_sync`) and, like every gradient, divided by the global loss-unit
    count by Megatron."""

    @staticmethod
    def forward(ctx, features_NbE, grid, rows_lm: slice):
        parts = [torch.empty_like(features_NbE) for _ in range(grid.pg.dp.size())]
        dist.all_gather(parts, features_NbE.contiguous(), group=grid.pg.dp)
        full_NFE = torch.cat(parts, dim=1)
        ctx.grid, ctx.rows_lm, ctx.F = grid, rows_lm, full_NFE.shape[1]
        return full_NFE[:, rows_lm].clone()

    @staticmethod
    def backward(ctx, grad_NbE):
        g = ctx.grid
        N, _, E = grad_NbE.shape
        full_NFE = grad_NbE.new_zeros(N, ctx.F, E)
        full_NFE[:, ctx.rows_lm] = grad_NbE
        dist.all_reduce(full_NFE, group=g.first_stage)
        full_NFE /= g.lm_tp_size
        rows = vision_rows(g.dp_rank, g.pg.dp.size(), ctx.F)
        return full_NFE[:, rows].contiguous(), None, None


def encoder_grad_sync(chunks, grids):
    """The vlm family's `grad_sync`: with the encoder on its own grid, each encoder replica
    inside an LM TP group encoded different samples; their gradients are summed over that
    group (`VisionGrid.replicas`) before Megatron sums over the LM's DP group, which together
    is the sum over the encoder's DP ranks. None when the encoder shares the LM's grid."""
    grid = grids.vision if grids is not None else None
    if grid is None or grid.replicas is None or grid.replicas.size() == 1:
        return None
    # an MoE encoder's experts (allreduce False) are complete after Megatron's expert-DP
    # reduction (module docstring): summing them here would add other tokens' shares again
    params = [p for c in chunks if getattr(c, "vision", None) is not None
              for p in c.vision.parameters() if p.requires_grad and getattr(p, "allreduce", True)]

    def sync():
        for p in params:
            dist.all_reduce(p.main_grad, group=grid.replicas)

    return sync


def check_placeholders(placeholders_BS: torch.Tensor, image_tokens: int,
                       context: Context | None, images: int | None = None,
                       image_index_N: torch.Tensor | None = None) -> None:
    """Every sample has exactly one image's worth of placeholders; else one error naming the
    sample. A packed row holds several samples (the context's `sequence_ids_BS`, the data's
    segment ids): counted per sample, in the order of the batch's `images` images (global
    sample indices `image_index_N`), which the masked scatter fills them with."""
    segments_BS = context.sequence_ids_BS if context is not None else None
    if segments_BS is None:
        counts, index = placeholders_BS.sum(dim=1), context.sample_index_B if context is not \
            None else None
    else:
        numbers_BS, n = sample_numbers(segments_BS.to(placeholders_BS.device))
        counts, index = per_sample_sum(placeholders_BS.long(), numbers_BS, n), image_index_N
        if images is not None and n != images:
            raise ValueError(f"a packed micro-batch holds {n} samples and {images} images")
    bad = (counts != image_tokens).nonzero().flatten()
    if len(bad):
        b = int(bad[0])
        name = index[b].item() if index is not None else b
        raise ValueError(f"sample {name}: {int(counts[b])} image placeholder tokens, the "
                         f"model makes {image_tokens} image embeddings per image "
                         f"(model.vit.patch_size, model.vlm.pixel_shuffle, data.image_size)")


@torch.no_grad()
def argmax_is_label(logits_SBV: torch.Tensor, labels_BS: torch.Tensor, tp_group) -> torch.Tensor:
    """[B, S] bool: the label's logit is the largest over the whole vocabulary, whose columns
    are split over `tp_group` (ties count as correct). Padded vocabulary rows are masked to
    −inf by megamoe.models.vocab."""
    logits_SBV = logits_SBV.float()
    V_local = logits_SBV.shape[-1]
    rank = tp_group.rank() if tp_group is not None else 0
    labels_SB = labels_BS.transpose(0, 1)
    local_SB = labels_SB - rank * V_local
    mine_SB = (local_SB >= 0) & (local_SB < V_local)
    picked_SB = torch.gather(logits_SBV, -1, local_SB.clamp(0, V_local - 1).unsqueeze(-1))
    label_logit_SB = torch.where(mine_SB, picked_SB.squeeze(-1), torch.zeros_like(local_SB,
                                                                             dtype=torch.float))
    best_SB = logits_SBV.max(dim=-1).values
    if tp_group is not None and tp_group.size() > 1:
        dist.all_reduce(label_logit_SB, group=tp_group)
        dist.all_reduce(best_SB, op=dist.ReduceOp.MAX, group=tp_group)
    return (label_logit_SB >= best_SB).transpose(0, 1)


def encoder_transformer_config(cfg, lm_tconfig, tp: int | None = None):
    """The encoder's Megatron config: the vit family's block (LayerNorm, GELU, biases) at the
    encoder's sizes (megamoe.config.vlm.encoder_config), on the LM's TP (or its own `tp`) and
    SP, its experts on the LM's EP and expert-TP, as one pipeline stage (it lives whole on the
    LM's first stage)."""
    from types import SimpleNamespace

    from megamoe.config.vlm import encoder_config
    from megamoe.models.vit.model import transformer_config

    enc = encoder_config(cfg)
    moe = bool(enc.model.moe.num_experts)   # a dense encoder has no expert grid (Megatron's check)
    tp = tp or lm_tconfig.tensor_model_parallel_size
    dims = SimpleNamespace(tensor=tp, pipeline=1, virtual_pipeline=None,
                           expert=lm_tconfig.expert_model_parallel_size if moe else 1,
                           expert_tensor_size=lm_tconfig.expert_tensor_parallel_size if moe
                           else tp)
    return transformer_config(enc, dims, sequence_parallel=lm_tconfig.sequence_parallel,
                              dtype=lm_tconfig.params_dtype, tower=True)


def build_vlm(cfg, tconfig, pg_collection, vocab_size: int, grids=None) -> list:
    """This rank's chunks: the LM's (megamoe.models.lm.model.build_lm) as `VLMModel`s, the
    first stage's with the encoder (on the LM's grid, or on `grids.vision`) and connector."""
    from megamoe.config.audio import encoder_channels
    from megamoe.config.vision import time_slices
    from megamoe.config.vlm import IMAGE_TOKEN_ID, encoder_config, image_tokens, patch_side
    from megamoe.models.lm.model import build_lm, moe_layers
    from megamoe.models.vit.model import build_vision_tower
    from megamoe.specs.gpt_moe import modality_norm_options

    v, enc = cfg.model.vlm, encoder_config(cfg)
    side, r = patch_side(cfg), v.pixel_shuffle
    image_tokens(cfg)

    def chunk_kwargs(first: bool, last: bool) -> dict:
        kwargs = dict(image_token_id=IMAGE_TOKEN_ID, patch_side=side, pixel_shuffle=r,
                      packed_positions=cfg.data.packing, time_slices=time_slices(cfg))
        if not first:
            return kwargs
        vision_grid = grids.vision if grids is not None else None
        enc_pg = pg_collection if vision_grid is None else vision_grid.pg
        etc = encoder_transformer_config(cfg, tconfig, tp=enc_pg.tp.size())
        vision = build_vision_tower(enc, etc, enc_pg,
                                    modality_norm=modality_norm_options(enc.model),
                                    channels=encoder_channels(cfg))
        if vision_grid is not None:
            experts = {id(p) for layer in moe_layers([vision]) for p in layer.experts.parameters()}
            # encoder TP 1 on an LM TP group: every encoder parameter is a replica on the LM's
            # TP ranks, but Megatron's linears mark their weights TP-split whatever the TP
            # size, and the gradient norm would then count them once per LM TP rank. Experts
            # are on the LM's expert grid instead (module docstring): expert parameters.
            for param in vision.parameters():
                if id(param) in experts:
                    param.allreduce = False
                else:
                    param.tensor_model_parallel = False
        projector = connector(tconfig, input_size=r * r * v.encoder_hidden_size,
                              hidden_size=v.connector_hidden_size or cfg.model.hidden_size,
                              pg_collection=pg_collection)
        if v.contrastive_coeff > 0:      # one pipeline stage (megamoe.models.vlm.family)
            from megamoe.models.contrastive import ContrastiveHead

            kwargs["contrastive"] = ContrastiveHead(
                cfg.model.hidden_size, v.contrastive_init_temperature, v.contrastive_proj_dim)
        return dict(kwargs, vision=vision, projector=projector, vision_grid=vision_grid)

    return build_lm(cfg, tconfig, pg_collection, vocab_size, model_class=VLMModel,
                    chunk_kwargs=chunk_kwargs)
