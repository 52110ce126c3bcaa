"""megamoe's decoder as a transformers model: `MegamoeForCausalLM` computes what megamoe's
Megatron model computes, for the models no transformers architecture expresses (sigmoid router
scores, QK-norm with a shared expert, an ungated shared expert, …).

Shipped as remote code into exported folders, next to configuration_megamoe.py,
routers_megamoe.py and mor_megamoe.py, so it imports only torch and transformers. Load with
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The block (pre-norm, as Megatron's TransformerLayer): x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)).
- RMSNorm in fp32: x / sqrt(mean(x²) + ε) · w.
- Attention: q, k, v projections (bias on q, k, v only with `qkv_bias`); with `qk_norm` an
  RMSNorm over the head dim of each q and k head; then RoPE (rotate-half, θ = rope_theta, fp32
  frequencies); causal softmax(q·kᵀ/√d)·v with query head h reading KV head h // (H/G).
- FFN: SwiGLU down(silu(gate(x)) · up(x)) in dense layers (`moe_layers[i] == 0`) and experts;
  MoE layers: y = Σ_{e routed} p_e·E_e(x) [+ σ(x·w_g)·S(x) with the shared expert S].
- Routers (`config.router`, every megamoe family, in megamoe's eval-mode semantics): see
  routers_megamoe.py (ROUTERS), shipped alongside. Routing context: forward takes
  `modality_ids` [B, S] (router "modality") and `timesteps` [B] (router "diff_moe"); without
  them the synthetic rules recorded in `config.routing_context` apply (megamoe's
  `data.synthetic_modalities` / `data.synthetic_timesteps`), else the router raises.
  expert_choice, vmoe/limoe with an eval capacity and topk/dit_moe with Megatron's
  `capacity_factor` choose over all B·S tokens of a call: outputs depend on the batch's
  composition, as megamoe's do on its micro-batch. soft mixes each sample's own positions.
- Mixture-of-Recursions (`config.mor`): unique first/last layers around a shared pool applied
  N_r times to the tokens a depth router keeps, with per-recursion LoRA adapters when
  `mor.lora_rank` > 0, see mor_megamoe.py (shipped alongside). Such a model runs whole
  sequences: no KV cache (generation recomputes the prefix), no padding.

Legend: B batch, S query positions, K key positions (cache + S), D hidden, H query heads,
G KV heads, d head dim, T tokens (B·S), E experts, F expert FFN size, k experts per token.
Experts are stored fused: `experts.gate_up_proj` [E, 2F, D] ([gate; up] per expert) and
`experts.down_proj` [E, D, F], as transformers 5.x's MoE families hold them in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# The KV cache's name in `forward`'s arguments and outputs: `cache` from transformers 5.24 on
# (`generate` passes it under that name), `past_key_values` before.
CACHE_NAME = ("cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__
              else "past_key_values")

try:                                    # transformers 5: initialisers that skip loaded tensors
    from transformers import initialization as init
except ImportError:                     # pragma: no cover - transformers 4
    from torch.nn import init

from .configuration_megamoe import MegamoeConfig
from .mor_megamoe import LoRALinear, MegamoeRecursion, mor_layout, slot_is_moe
from .routers_megamoe import (
    RoutingInputs, build_router, synthetic_modality_ids, synthetic_timesteps, timestep_embedding,
)


class MegamoeRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


# ---- attention ---------------------------------------------------------------------------------

def rope_cos_sin(position_ids_BS: torch.Tensor, head_dim: int, theta: float):
    """cos, sin [B, S, d] of RoPE's rotate-half layout (frequencies repeated for both halves)."""
    exponent_d2 = torch.arange(0, head_dim, 2, dtype=torch.float32,
                               device=position_ids_BS.device) / head_dim
    inv_freq_d2 = 1.0 / (theta ** exponent_d2)
    freqs_BSd2 = position_ids_BS.float()[..., None] * inv_freq_d2
    emb_BSd = torch.cat([freqs_BSd2, freqs_BSd2], dim=-1)
    return emb_BSd.cos(), emb_BSd.sin()


def apply_rope(x_BHSd: torch.Tensor, cos_BSd: torch.Tensor, sin_BSd: torch.Tensor):
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos_BSd[:, None].to(x_BHSd.dtype), sin_BSd[:, None].to(x_BHSd.dtype)
    return x_BHSd * cos + rotated * sin


class MegamoeAttention(nn.Module):
    def __init__(self, config: MegamoeConfig, layer_idx: int):
        super().__init__()
        D, d = config.hidden_size, config.head_dim
        self.H, self.G, self.d = config.num_attention_heads, config.num_key_value_heads, d
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(D, self.H * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, self.G * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, self.G * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.H * d, D, bias=False)
        if config.qk_norm:
            self.q_norm = MegamoeRMSNorm(d, config.rms_norm_eps)
            self.k_norm = MegamoeRMSNorm(d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x_BSD, cos_BSd, sin_BSd, allowed_B1SK, cache=None, kv_hook=None,
                lora=None):
        """`kv_hook(k, v) → (k, v)`: replaces the (RoPE'd) keys and values, for MoR's
        recursive KV sharing; `lora`: MoR's per-recursion adapters of this application
        ({"qkv", "proj"} → LoRALinear, mor_megamoe.py), added to the projections' outputs."""
        B, S, _ = x_BSD.shape
        q_BSo, k_BSo, v_BSo = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if lora is not None and "qkv" in lora:      # one A, B rows = [q; k; v]
            dq, dk, dv = lora["qkv"](x_BSD).split([self.H * self.d, self.G * self.d,
                                                   self.G * self.d], dim=-1)
            q_BSo, k_BSo, v_BSo = q_BSo + dq, k_BSo + dk, v_BSo + dv
        q_BSHd = q_BSo.view(B, S, self.H, self.d)
        k_BSGd = k_BSo.view(B, S, self.G, self.d)
        v_BSGd = v_BSo.view(B, S, self.G, self.d)
        if self.q_norm is not None:
            q_BSHd, k_BSGd = self.q_norm(q_BSHd), self.k_norm(k_BSGd)
        q_BHSd = apply_rope(q_BSHd.transpose(1, 2), cos_BSd, sin_BSd)
        k_BGKd = apply_rope(k_BSGd.transpose(1, 2), cos_BSd, sin_BSd)
        v_BGKd = v_BSGd.transpose(1, 2)
        if cache is not None:
            k_BGKd, v_BGKd = cache.update(k_BGKd, v_BGKd, self.layer_idx)
        if kv_hook is not None:
            k_BGKd, v_BGKd = kv_hook(k_BGKd, v_BGKd)
        rep = self.H // self.G                  # query head h reads KV head h // rep
        k_BHKd = k_BGKd.repeat_interleave(rep, dim=1)
        v_BHKd = v_BGKd.repeat_interleave(rep, dim=1)
        out_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BHKd, v_BHKd, attn_mask=allowed_B1SK)
        out_BSo = out_BHSd.transpose(1, 2).reshape(B, S, self.H * self.d)
        if lora is not None and "proj" in lora:
            return self.o_proj(out_BSo) + lora["proj"](out_BSo)
        return self.o_proj(out_BSo)


# ---- feed-forward ------------------------------------------------------------------------------

class MegamoeMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)). `lora` (MoR's per-recursion adapters, dense FFNs of
    the shared pool): "fc1" adds to [gate; up] (its B rows: gate's, then up's), "fc2" to down."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x, lora=None):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if lora is not None and "fc1" in lora:
            d_gate, d_up = lora["fc1"](x).chunk(2, dim=-1)
            gate, up = gate + d_gate, up + d_up
        h = F.silu(gate) * up
        if lora is not None and "fc2" in lora:
            return self.down_proj(h) + lora["fc2"](h)
        return self.down_proj(h)


class MegamoeExperts(nn.Module):
    """E SwiGLU experts; token t's output is Σ_e probs[t, e] · E_e(x_t) over its routed experts
    (Diff-MoE: gate ⊙ E_e(LN(x)(1 + scale) + shift) with the calibration's rows)."""

    def __init__(self, config: MegamoeConfig):
        super().__init__()
        E, D, ffn = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * ffn, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, ffn))

    def expert_ffn(self, e: int, x_ND):
        gate_NF, up_NF = F.linear(x_ND, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate_NF) * up_NF, self.down_proj[e])

    def forward(self, x_TD, probs_TE, map_TE, modulation=None):
        y_TD = torch.zeros_like(x_TD)
        for e in map_TE.any(dim=0).nonzero().flatten().tolist():
            token_N = map_TE[:, e].nonzero().flatten()
            x_ND = x_TD[token_N]
            if modulation is not None:          # Diff-MoE expert calibration
                shift_ND, scale_ND, gate_ND = modulation(token_N, e)
                x_ND = (F.layer_norm(x_ND.float(), x_ND.shape[-1:]) * (1 + scale_ND)
                        + shift_ND).to(x_TD.dtype)
                out_ND = (self.expert_ffn(e, x_ND).float() * gate_ND).to(x_TD.dtype)
            else:
                out_ND = self.expert_ffn(e, x_ND)
            y_TD.index_add_(0, token_N, out_ND * probs_TE[token_N, e, None].to(x_TD.dtype))
        return y_TD


class MegamoeMoE(nn.Module):
    """Routed experts (+ shared expert). Tokens are routed in Megatron's [S, B] order, so that
    routers choosing over the call's tokens see them as megamoe's micro-batch; inside a
    Mixture-of-Recursions step only the step's tokens, in the order of megamoe's compacted
    batch (`ctx.token_order`; the others get 0, their outputs are discarded), so that capacity
    dropping chooses among the same tokens. MoR admits per-token routers only (topk), which
    read no other routing context."""

    def __init__(self, config: MegamoeConfig, layer_idx: int):
        super().__init__()
        self.router_kind = config.router
        self.gate = build_router(config, layer_idx)
        self.experts = MegamoeExperts(config)
        self.shared_expert = self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = MegamoeMLP(config.hidden_size,
                                            config.shared_expert_intermediate_size)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x_BSD, ctx: RoutingInputs):
        B, S, D = x_BSD.shape
        x_TD = x_BSD.transpose(0, 1).reshape(S * B, D)
        order_N = ctx.token_order
        if order_N is None:
            y_TD = self._mix(x_TD, ctx)
        else:
            y_TD = torch.zeros_like(x_TD).index_copy(0, order_N, self._mix(x_TD[order_N], ctx))
        return y_TD.view(S, B, D).transpose(0, 1)

    def _mix(self, x_TD, ctx: RoutingInputs):
        if self.router_kind == "soft":
            y_TD = self.gate.mix(x_TD, self.experts.expert_ffn, ctx.batch)
        else:
            probs_TE, map_TE = self.gate(x_TD, ctx)
            if self.router_kind == "diff_moe":     # calibrated experts + Σ_topk s_e·x
                y_TD = self.experts(x_TD, probs_TE, map_TE, self.gate.modulation(ctx))
                y_TD = y_TD + x_TD * probs_TE.sum(dim=-1, keepdim=True).to(x_TD.dtype)
            else:
                y_TD = self.experts(x_TD, probs_TE, map_TE)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        return y_TD


# ---- the model ---------------------------------------------------------------------------------

class MegamoeDecoderLayer(nn.Module):
    """`is_moe`: the FFN kind (default: `config.moe_layers[layer_idx]`; MoR layers pass their
    pool slot's kind)."""

    def __init__(self, config: MegamoeConfig, layer_idx: int, is_moe: bool | None = None):
        super().__init__()
        self.input_layernorm = MegamoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MegamoeAttention(config, layer_idx)
        self.post_attention_layernorm = MegamoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = bool(config.moe_layers[layer_idx] if is_moe is None else is_moe)
        self.mlp = (MegamoeMoE(config, layer_idx) if self.is_moe
                    else MegamoeMLP(config.hidden_size, config.intermediate_size))

    def forward(self, x_BSD, cos_BSd, sin_BSd, allowed_B1SK, cache=None, ctx=None,
                kv_hook=None, lora=None):
        """`lora`: MoR's adapters of this application of a shared layer (mor_megamoe.py)."""
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos_BSd, sin_BSd,
                                       allowed_B1SK, cache, kv_hook, lora)
        h_BSD = self.post_attention_layernorm(x_BSD)
        return x_BSD + (self.mlp(h_BSD, ctx) if self.is_moe else self.mlp(h_BSD, lora))


class MegamoePreTrainedModel(PreTrainedModel):
    config_class = MegamoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["MegamoeDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MegamoeRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MegamoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif hasattr(module, "init_router_weights"):      # routers_megamoe.py
            module.init_router_weights(init, std)
        elif isinstance(module, LoRALinear):              # mor_megamoe.py: B = 0
            init.normal_(module.A, mean=0.0, std=module.A.shape[1] ** -0.5)
            init.zeros_(module.B)


def kv_cache_argument(cache, past_key_values):
    """The KV cache a forward was given under either name (None: none)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("cache / past_key_values: pass the KV cache under one name")
    return past_key_values if cache is None else cache


def allowed_mask(attention_mask_BK, past: int, B: int, S: int, device) -> torch.Tensor:
    """[B, 1, S, K] bool: key j is visible to query i when j <= past + i and j is not padding.
    A query always sees itself, so a padding row stays finite."""
    q_S1 = past + torch.arange(S, device=device)[:, None]
    k_1K = torch.arange(past + S, device=device)[None, :]
    allowed_BSK = (k_1K <= q_S1).expand(B, S, past + S)
    if attention_mask_BK is not None:
        if attention_mask_BK.dim() != 2 or attention_mask_BK.shape[-1] != past + S:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask_BK.shape)}; expected "
                             f"[batch, {past + S}] (1 keep, 0 padding)")
        allowed_BSK = (allowed_BSK & attention_mask_BK[:, None, :].bool()) | (k_1K == q_S1)
    return allowed_BSK[:, None]


class MegamoeModel(MegamoePreTrainedModel):
    """`layers` then the final norm; with `config.mor` (Mixture-of-Recursions) `layers` are
    the unique first and last layers (none for Cycle / Sequence sharing) around `recursion`,
    the shared pool `recursion.layers` and its depth router `recursion.router`."""

    def __init__(self, config: MegamoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.mor:
            self._build_mor(config)
        else:
            self.layers = nn.ModuleList(MegamoeDecoderLayer(config, i)
                                        for i in range(config.num_hidden_layers))
            self.recursion = None
        self.norm = MegamoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def _build_mor(self, config: MegamoeConfig) -> None:
        mor = config.mor
        unique, pool, steps = mor_layout(mor["sharing"], config.num_hidden_layers,
                                         mor["num_recursions"])
        moe = slot_is_moe(mor["sharing"], config.moe_layers, mor["num_recursions"])
        self.layers = nn.ModuleList(MegamoeDecoderLayer(config, i, moe[slot])
                                    for i, slot in enumerate(unique))
        shared = nn.ModuleList(MegamoeDecoderLayer(config, j, moe[slot])
                               for j, slot in enumerate(pool))
        self.recursion = MegamoeRecursion(config, shared, steps)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def routing_inputs(self, input_ids, B: int, S: int, modality_ids=None, timesteps=None):
        """The routing context of this call: explicit `modality_ids` [B, S] / `timesteps` [B],
        else the synthetic rules the model was trained with (config `routing_context`)."""
        rc = self.config.routing_context
        if modality_ids is None and rc.get("synthetic_modalities") and input_ids is not None:
            modality_ids = synthetic_modality_ids(input_ids, rc["synthetic_modalities"])
        if timesteps is None and rc.get("synthetic_timesteps") and input_ids is not None:
            timesteps = synthetic_timesteps(input_ids)
        modality_T = timestep_BC = None
        if modality_ids is not None:
            if tuple(modality_ids.shape) != (B, S):
                raise ValueError(f"modality_ids: shape {tuple(modality_ids.shape)}, expected "
                                 f"[{B}, {S}] like input_ids")
            modality_T = modality_ids.transpose(0, 1).reshape(-1)     # Megatron's [S, B] order
        if timesteps is not None:
            timesteps = torch.as_tensor(timesteps, device=self.embed_tokens.weight.device)
            timestep_BC = timestep_embedding(timesteps.reshape(-1).expand(B),
                                             self.config.hidden_size)
        return RoutingInputs(batch=B, modality_T=modality_T, timestep_BC=timestep_BC)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, modality_ids=None,
                timesteps=None, cache=None, **kwargs):
        """The KV cache comes as `cache` (transformers ≥ 5.24) or `past_key_values` (before)
        and goes out under the installed version's name (CACHE_NAME)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: pass exactly one")
        cache = kv_cache_argument(cache, past_key_values)
        x_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = x_BSD.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.recursion is not None:
            use_cache = self._check_mor_call(cache, attention_mask, position_ids)
        if use_cache and cache is None:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:      # left padding: count only real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -S:]
            else:
                position_ids = torch.arange(past, past + S, device=x_BSD.device).expand(B, S)
        cos_BSd, sin_BSd = rope_cos_sin(position_ids, self.config.head_dim,
                                        self.config.rope_theta)
        allowed_B1SK = allowed_mask(attention_mask, past, B, S, x_BSD.device)
        ctx = self.routing_inputs(input_ids, B, S, modality_ids, timesteps)
        if self.recursion is not None:
            x_BSD = self._mor_layers(x_BSD, cos_BSd, sin_BSd, allowed_B1SK, ctx)
        else:
            for layer in self.layers:
                x_BSD = layer(x_BSD, cos_BSd, sin_BSd, allowed_B1SK, cache, ctx)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x_BSD),
                                       **{CACHE_NAME: cache if use_cache else None})

    def _check_mor_call(self, cache, attention_mask, position_ids) -> bool:
        """MoR runs whole sequences: no KV cache (generation recomputes the prefix), no
        padding, positions 0..S−1 (returns use_cache: False)."""
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"{CACHE_NAME}: a Mixture-of-Recursions model has no KV cache "
                             "yet; call it with use_cache=False on the whole sequence")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask: padding is not supported by Mixture-of-"
                             "Recursions models yet (depth routing would count the pads)")
        if position_ids is not None:
            S = position_ids.shape[-1]
            if not torch.equal(position_ids.reshape(-1, S)[0].cpu(), torch.arange(S)):
                raise ValueError("position_ids: a Mixture-of-Recursions model runs whole "
                                 "sequences at positions 0..S-1")
        return False

    def _mor_layers(self, x_BSD, cos_BSd, sin_BSd, allowed_B1SK, ctx):
        """Unique first layer → recursion block → unique last layer (mor_megamoe.py)."""
        if len(self.layers):
            x_BSD = self.layers[0](x_BSD, cos_BSd, sin_BSd, allowed_B1SK, None, ctx)
        x_BSD = self.recursion(x_BSD, cos_BSd, sin_BSd, ctx)
        if len(self.layers):
            x_BSD = self.layers[-1](x_BSD, cos_BSd, sin_BSd, allowed_B1SK, None, ctx)
        return x_BSD


def causal_lm_output(out, lm_head, labels=None, logits_to_keep=0) -> CausalLMOutputWithPast:
    """Logits of the decoder's last hidden states (the last `logits_to_keep` positions when
    positive), the next-token loss when `labels` are given (-100 ignored), and the cache."""
    h_BSD = out.last_hidden_state
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
        h_BSD = h_BSD[:, -logits_to_keep:]
    logits_BSV = lm_head(h_BSD)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1).float(),
                               labels[:, 1:].flatten().to(logits_BSV.device), ignore_index=-100)
    return CausalLMOutputWithPast(loss=loss, logits=logits_BSV,
                                  **{CACHE_NAME: getattr(out, CACHE_NAME)})


class MegamoeForCausalLM(MegamoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MegamoeConfig):
        super().__init__(config)
        self.model = MegamoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, modality_ids=None, timesteps=None, cache=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids,
                         cache=kv_cache_argument(cache, past_key_values),
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         modality_ids=modality_ids, timesteps=timesteps)
        return causal_lm_output(out, self.lm_head, labels, logits_to_keep)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """With the KV cache only new tokens are fed: the synthetic timestep (a function of the
        first token) is computed here from the whole sequence. A Mixture-of-Recursions model
        has no KV cache: every step feeds the whole sequence."""
        if self.config.mor:             # no cache under either name: the whole sequence
            kwargs.pop("cache", None)
            kwargs.pop("past_key_values", None)
            kwargs.update(next_sequence_length=None, position_ids=None, use_cache=False)
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if (self.config.routing_context.get("synthetic_timesteps")
                and inputs.get("timesteps") is None):
            inputs["timesteps"] = synthetic_timesteps(input_ids)
        return inputs
