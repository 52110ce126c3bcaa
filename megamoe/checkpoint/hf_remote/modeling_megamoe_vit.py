"""megamoe's ViT / V-MoE image classifier as a transformers model: what megamoe's Megatron
model (megamoe.models.vit) computes in eval mode, for folders exported by `megamoe convert`.
Shipped next to configuration_megamoe_vit.py and routers_megamoe.py; imports only torch and
transformers. Load with
    AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)

- Embedding: pixels (uint8 → x/127.5 − 1; float taken as already in [−1, 1]) cut into
  patch_size² patches in row-major order, each flattened channel-major (c, dy, dx), a biased
  linear to D; a class token prepended with `pool` "cls"; positions added (learned, or fixed
  2-D sin-cos: the first D/2 channels encode the row, the rest the column, [sin, cos] of
  p·10000^(−i/(D/4)); the class token's position is zero); with `pre_norm` a LayerNorm over
  the result (CLIP's pre_layrnorm); the patch linear without bias when not `patch_bias`. This
  restates megamoe.blocks.embeddings, which the folder cannot import.
- Block (pre-LN, bidirectional): x += Attn(LN(x)); x += FFN(LN(x)). LayerNorm in fp32 with
  bias; attention with biased q, k, v, o projections, query head h reading KV head h // (H/G),
  softmax(q·kᵀ/√d) without a mask; FFN: fc2(act(fc1(x))) with biases (act: GELU, or CLIP's
  quick_gelu x·σ(1.702x) with `hidden_act` "quick_gelu"), or in MoE layers
  Σ_e p_e·E_e(x) over the routed experts (+ a shared expert), routed by megamoe's eval-mode
  router family (routers_megamoe.py) over the tokens of the call in Megatron's [S, B] order,
  so routers that choose across the batch (a V-MoE capacity, expert choice) see the batch as
  megamoe's micro-batch does.
- Head: final LayerNorm, then the class token (or the token mean) → classifier.

Legend: B images, S tokens, D hidden, H query heads, G KV heads, d head dim, T = S·B,
E experts, F expert FFN size, K classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

try:                                    # transformers 5: initialisers that skip loaded tensors
    from transformers import initialization as init
except ImportError:                     # pragma: no cover - transformers 4
    from torch.nn import init

from .configuration_megamoe_vit import MegamoeViTConfig
from .routers_megamoe import RoutingInputs, build_router


def quick_gelu(x):
    """CLIP's activation (Megatron's `quick_gelu`, transformers' QuickGELUActivation)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


def patchify(images_BCHW, patch: int):
    B, C, H, W = images_BCHW.shape
    x = images_BCHW.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def sincos_2d(side: int, dim: int):
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64),
                                torch.arange(side, dtype=torch.float64), indexing="ij")

    def encode(pos):
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class MegamoeLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class MegamoeViTEmbeddings(nn.Module):
    def __init__(self, config: MegamoeViTConfig):
        super().__init__()
        D, side = config.hidden_size, config.image_size // config.patch_size
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size ** 2, D,
                                         bias=config.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, D)) if config.pool == "cls" else None
        if config.position_embedding == "learned":
            self.position_embeddings = nn.Parameter(torch.zeros(config.num_tokens, D))
        else:   # computed in forward: transformers materialises modules from the meta
            self.position_embeddings = None      # device, and a non-persistent buffer made
            self.side, self.with_cls = side, config.pool == "cls"   # here would be lost
        self.pre_layernorm = (MegamoeLayerNorm(D, eps=config.layer_norm_eps)
                              if config.pre_norm else None)

    def forward(self, pixel_values_BCHW):
        x = pixel_values_BCHW.to(self.patch_embedding.weight.dtype)
        if not pixel_values_BCHW.is_floating_point():
            x = x / 127.5 - 1.0
        x_BND = self.patch_embedding(patchify(x, self.patch_size))
        if self.cls_token is not None:
            x_BND = torch.cat([self.cls_token.expand(x_BND.shape[0], 1, -1), x_BND], dim=1)
        pos = self.position_embeddings
        if pos is None:
            pos = sincos_2d(self.side, x_BND.shape[-1]).to(x_BND)
            if self.with_cls:
                pos = torch.cat([torch.zeros_like(pos[:1]), pos])
        x_BND = x_BND + pos
        return x_BND if self.pre_layernorm is None else self.pre_layernorm(x_BND)


class MegamoeViTAttention(nn.Module):
    def __init__(self, config: MegamoeViTConfig):
        super().__init__()
        D, d = config.hidden_size, config.head_dim
        self.H, self.G, self.d = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(D, self.H * d)
        self.k_proj = nn.Linear(D, self.G * d)
        self.v_proj = nn.Linear(D, self.G * d)
        self.o_proj = nn.Linear(self.H * d, D)

    def forward(self, x_BSD):
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.H, self.d).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, self.G, self.d).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.G, self.d).transpose(1, 2)
        k = k.repeat_interleave(self.H // self.G, dim=1)
        v = v.repeat_interleave(self.H // self.G, dim=1)
        scores = (q @ k.transpose(-1, -2)) / self.d ** 0.5
        out = scores.float().softmax(dim=-1).to(v.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.H * self.d))


class MegamoeViTMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, act: str = "gelu"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MegamoeViTExperts(nn.Module):
    """E biased GELU (or quick_gelu) experts stored fused: fc1_weight [E, F, D],
    fc1_bias [E, F], fc2_weight [E, D, F], fc2_bias [E, D]."""

    def __init__(self, config: MegamoeViTConfig):
        super().__init__()
        E, D, Fe = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.fc1_weight = nn.Parameter(torch.empty(E, Fe, D))
        self.fc1_bias = nn.Parameter(torch.zeros(E, Fe))
        self.fc2_weight = nn.Parameter(torch.empty(E, D, Fe))
        self.fc2_bias = nn.Parameter(torch.zeros(E, D))
        self.act = ACTIVATIONS[config.hidden_act]

    def expert_ffn(self, e: int, x_ND):
        h = self.act(F.linear(x_ND, self.fc1_weight[e], self.fc1_bias[e]))
        return F.linear(h, self.fc2_weight[e], self.fc2_bias[e])

    def forward(self, x_TD, probs_TE, map_TE):
        y_TD = torch.zeros_like(x_TD)
        for e in map_TE.any(dim=0).nonzero().flatten().tolist():
            token_N = map_TE[:, e].nonzero().flatten()
            out_ND = self.expert_ffn(e, x_TD[token_N])
            y_TD.index_add_(0, token_N, out_ND * probs_TE[token_N, e, None].to(x_TD.dtype))
        return y_TD


class MegamoeViTMoE(nn.Module):
    def __init__(self, config: MegamoeViTConfig, layer_idx: int):
        super().__init__()
        self.router_kind = config.router
        self.gate = build_router(config, layer_idx)
        self.experts = MegamoeViTExperts(config)
        self.shared_expert = (MegamoeViTMLP(config.hidden_size,
                                            config.shared_expert_intermediate_size,
                                            config.hidden_act)
                              if config.shared_expert_intermediate_size else None)

    def forward(self, x_BSD):
        B, S, D = x_BSD.shape
        x_TD = x_BSD.transpose(0, 1).reshape(S * B, D)        # Megatron's [S, B] order
        if self.router_kind == "soft":
            y_TD = self.gate.mix(x_TD, self.experts.expert_ffn, B)
        else:
            probs_TE, map_TE = self.gate(x_TD, RoutingInputs(batch=B))
            y_TD = self.experts(x_TD, probs_TE, map_TE)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        return y_TD.view(S, B, D).transpose(0, 1)


class MegamoeViTLayer(nn.Module):
    def __init__(self, config: MegamoeViTConfig, layer_idx: int):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.layernorm_before = MegamoeLayerNorm(D, eps=eps)
        self.attention = MegamoeViTAttention(config)
        self.layernorm_after = MegamoeLayerNorm(D, eps=eps)
        self.mlp = (MegamoeViTMoE(config, layer_idx) if config.moe_layers[layer_idx]
                    else MegamoeViTMLP(D, config.intermediate_size, config.hidden_act))

    def forward(self, x_BSD):
        x_BSD = x_BSD + self.attention(self.layernorm_before(x_BSD))
        return x_BSD + self.mlp(self.layernorm_after(x_BSD))


class MegamoeViTEncoder(nn.Module):
    def __init__(self, config: MegamoeViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(MegamoeViTLayer(config, i)
                                   for i in range(config.num_hidden_layers))

    def forward(self, x_BSD):
        for layer in self.layer:
            x_BSD = layer(x_BSD)
        return x_BSD


class MegamoeViTPreTrainedModel(PreTrainedModel):
    config_class = MegamoeViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"

    def _init_weights(self, module):
        """Only for tensors a folder does not hold (a fresh model); loaded ones are kept."""
        std = self.config.initializer_range
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MegamoeViTExperts):
            for name in ("fc1_weight", "fc2_weight"):
                init.normal_(getattr(module, name), mean=0.0, std=std)
            for name in ("fc1_bias", "fc2_bias"):
                init.zeros_(getattr(module, name))
        elif isinstance(module, MegamoeViTEmbeddings):
            for p in (module.cls_token, module.position_embeddings):
                if p is not None:
                    init.normal_(p, mean=0.0, std=std)
        elif hasattr(module, "init_router_weights"):      # routers_megamoe.py
            module.init_router_weights(init, std)


class MegamoeViTModel(MegamoeViTPreTrainedModel):
    def __init__(self, config: MegamoeViTConfig):
        super().__init__(config)
        self.embeddings = MegamoeViTEmbeddings(config)
        self.encoder = MegamoeViTEncoder(config)
        self.layernorm = MegamoeLayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, pixel_values):
        return self.layernorm(self.encoder(self.embeddings(pixel_values)))


class MegamoeViTForImageClassification(MegamoeViTPreTrainedModel):
    def __init__(self, config: MegamoeViTConfig):
        super().__init__(config)
        self.vit = MegamoeViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values=None, labels=None, return_dict=None, **kwargs):
        hidden_BSD = self.vit(pixel_values)
        pooled_BD = hidden_BSD[:, 0] if self.config.pool == "cls" else hidden_BSD.mean(dim=1)
        logits_BK = self.classifier(pooled_BD)
        loss = None if labels is None else F.cross_entropy(logits_BK.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits_BK, hidden_states=None)
