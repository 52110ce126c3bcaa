"""megamoe's decoder ⇄ Hugging Face's Mixtral-style decoders (Mixtral, Qwen2-MoE): the tensor
names and layouts and the config fields both families share.

Legend: E experts, F FFN hidden size, D hidden size, H query heads, G query groups (KV heads),
d head dim. Layouts (read in Megatron-Core 0.16.1 and transformers 5.23, checked by the logit
tests in tests/unit/test_hf_convert.py):
- Megatron's fused `linear_qkv` rows [G·(H/G + 2)·d, D] are per query group: the group's H/G
  query heads, then its key head, then its value head. HF keeps q_proj [H·d, D] and
  k_proj/v_proj [G·d, D]; query head h reads KV head h // (H/G) in both. Biases alike.
- SwiGLU `linear_fc1` [2F, D] is [gate; up] and computes silu(gate)·up, as HF's
  [gate_proj; up_proj] (Mixtral: [w1; w3]); `linear_fc2` [D, F] is down_proj (w2).
- Experts: Megatron's `experts.experts.linear_fc1.weight` [E, 2F, D] is transformers 5.x's fused
  `experts.gate_up_proj`; on disk (what `save_pretrained` writes) each expert is separate.
- The router weight [E, D] is HF's `gate.weight`; the gated shared expert's `gate_weight` [1, D]
  is Qwen2-MoE's `shared_expert_gate.weight` (both: σ(x·w)·shared(x)).
- RMSNorm, RoPE (rotate-half, θ = rotary_base) and the 1/√d attention scale match as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.checkpoint.global_load import num_layers, unstack_layers

DENSE = ("gate_proj", "up_proj", "down_proj")   # HF names of a SwiGLU MLP's linears


@dataclass(frozen=True)
class Names:
    """HF names that differ between families."""
    moe_block: str                     # the MoE FFN inside a layer ("block_sparse_moe", "mlp")
    expert: tuple[str, str, str]       # gate, up and down linear of one expert


@dataclass(frozen=True)
class DecoderShape:
    """What the tensor conversion needs to know about a model."""
    moe_layers: tuple[bool, ...]
    num_experts: int
    heads: int
    groups: int
    head_dim: int
    qkv_bias: bool
    shared_expert: bool
    tied: bool

    @classmethod
    def from_config(cls, cfg) -> "DecoderShape":
        from megamoe.models.specs.gpt_moe import moe_layer_pattern

        m, moe = cfg.model, cfg.model.moe
        return cls(moe_layers=tuple(moe_layer_pattern(m.num_layers, moe.layer_freq,
                                                      moe.num_experts)),
                   num_experts=moe.num_experts, heads=m.num_attention_heads,
                   groups=m.num_query_groups or m.num_attention_heads,
                   head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
                   qkv_bias=m.add_qkv_bias, shared_expert=bool(moe.shared_expert_ffn_hidden_size),
                   tied=m.tie_embeddings)


class TensorPool:
    """Tensors taken one by one by name; a missing or left-over tensor is a clear error."""

    def __init__(self, tensors: dict, where: str):
        self._t, self.where = dict(tensors), where

    def has(self, key: str) -> bool:
        return key in self._t

    def take(self, key: str) -> torch.Tensor:
        if key not in self._t:
            raise ValueError(f"{self.where}: missing tensor {key!r}")
        return self._t.pop(key)

    def discard(self, key: str) -> None:
        self._t.pop(key, None)

    def expect_empty(self, what: str) -> None:
        if self._t:
            names = sorted(self._t)
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            raise ValueError(f"{self.where}: {what}: {', '.join(names[:8])}{more}")


# ---- attention ---------------------------------------------------------------------------------

def split_qkv(w: torch.Tensor, s: DecoderShape) -> tuple:
    """Megatron's per-group fused rows → (q [H·d, …], k [G·d, …], v [G·d, …])."""
    rest = tuple(w.shape[1:])
    per_group = s.heads // s.groups
    w = w.reshape(s.groups, per_group + 2, s.head_dim, *rest)
    q, k, v = w.split([per_group, 1, 1], dim=1)
    return (q.reshape(s.heads * s.head_dim, *rest), k.reshape(s.groups * s.head_dim, *rest),
            v.reshape(s.groups * s.head_dim, *rest))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: DecoderShape,
             where: str) -> torch.Tensor:
    d, rest = s.head_dim, tuple(q.shape[1:])
    for name, t, rows in (("q", q, s.heads * d), ("k", k, s.groups * d), ("v", v, s.groups * d)):
        if t.shape[0] != rows:
            raise ValueError(f"{where}: {name}_proj has {t.shape[0]} rows, the config implies "
                             f"{rows} (heads × head_dim)")
    parts = [q.reshape(s.groups, s.heads // s.groups, d, *rest), k.reshape(s.groups, 1, d, *rest),
             v.reshape(s.groups, 1, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


# ---- megamoe → HF ------------------------------------------------------------------------------

def _swiglu_to_hf(out: dict, prefix: str, names, fc1: torch.Tensor, fc2: torch.Tensor) -> None:
    gate, up = fc1.chunk(2, dim=0)
    for name, t in zip(names, (gate, up, fc2)):
        out[f"{prefix}{name}.weight"] = t


def to_hf(tensors: dict, s: DecoderShape, names: Names) -> dict:
    """megamoe's global tensors (either layer layout) → HF tensors in the on-disk naming."""
    if num_layers(tensors) != len(s.moe_layers):
        raise ValueError(f"tensors hold {num_layers(tensors)} decoder layers, "
                         f"model.num_layers is {len(s.moe_layers)}")
    mm = TensorPool(unstack_layers(tensors), "megamoe tensors")
    out = {"model.embed_tokens.weight": mm.take("embedding.word_embeddings.weight")}
    for i, is_moe in enumerate(s.moe_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = mm.take(p + "input_layernorm.weight")
        for kind in ("weight", "bias") if s.qkv_bias else ("weight",):
            qkv = split_qkv(mm.take(f"{p}self_attention.linear_qkv.{kind}"), s)
            for proj, t in zip("qkv", qkv):
                out[f"{q}self_attn.{proj}_proj.{kind}"] = t
        out[q + "self_attn.o_proj.weight"] = mm.take(p + "self_attention.linear_proj.weight")
        out[q + "post_attention_layernorm.weight"] = mm.take(p + "pre_mlp_layernorm.weight")
        if not is_moe:
            _swiglu_to_hf(out, q + "mlp.", DENSE, mm.take(p + "mlp.linear_fc1.weight"),
                          mm.take(p + "mlp.linear_fc2.weight"))
            continue
        b = f"{q}{names.moe_block}."
        out[b + "gate.weight"] = mm.take(p + "mlp.router.weight")
        fc1_EFD = mm.take(p + "mlp.experts.experts.linear_fc1.weight")
        fc2_EDF = mm.take(p + "mlp.experts.experts.linear_fc2.weight")
        for e in range(fc1_EFD.shape[0]):
            _swiglu_to_hf(out, f"{b}experts.{e}.", names.expert, fc1_EFD[e], fc2_EDF[e])
        if s.shared_expert:
            _swiglu_to_hf(out, b + "shared_expert.", DENSE,
                          mm.take(p + "mlp.shared_experts.linear_fc1.weight"),
                          mm.take(p + "mlp.shared_experts.linear_fc2.weight"))
            out[b + "shared_expert_gate.weight"] = mm.take(p + "mlp.shared_experts.gate_weight")
    out["model.norm.weight"] = mm.take("decoder.final_layernorm.weight")
    if not s.tied:
        out["lm_head.weight"] = mm.take("output_layer.weight")
    mm.expect_empty("tensors this Hugging Face family has no place for")
    return out


# ---- HF → megamoe ------------------------------------------------------------------------------

def _swiglu_from_hf(hf: TensorPool, prefix: str, names) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up, down = (hf.take(f"{prefix}{n}.weight") for n in names)
    return torch.cat([gate, up], dim=0), down


def _experts_from_hf(hf: TensorPool, b: str, s: DecoderShape, names: Names) -> tuple:
    """[E, 2F, D] and [E, D, F] from transformers 5.x's fused tensors or per-expert ones."""
    if hf.has(b + "experts.gate_up_proj"):
        return hf.take(b + "experts.gate_up_proj"), hf.take(b + "experts.down_proj")
    pairs = [_swiglu_from_hf(hf, f"{b}experts.{e}.", names.expert) for e in range(s.num_experts)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def from_hf(hf_tensors: dict, s: DecoderShape, names: Names, where: str) -> dict:
    """HF tensors (on-disk or transformers 5.x naming) → megamoe's per-layer global keys."""
    hf = TensorPool(hf_tensors, where)
    out = {"embedding.word_embeddings.weight": hf.take("model.embed_tokens.weight")}
    for i, is_moe in enumerate(s.moe_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = hf.take(q + "input_layernorm.weight")
        for kind in ("weight", "bias") if s.qkv_bias else ("weight",):
            qkv = [hf.take(f"{q}self_attn.{proj}_proj.{kind}") for proj in "qkv"]
            out[f"{p}self_attention.linear_qkv.{kind}"] = fuse_qkv(*qkv, s, f"{where}: {q}")
        out[p + "self_attention.linear_proj.weight"] = hf.take(q + "self_attn.o_proj.weight")
        out[p + "pre_mlp_layernorm.weight"] = hf.take(q + "post_attention_layernorm.weight")
        if not is_moe:
            fc1, fc2 = _swiglu_from_hf(hf, q + "mlp.", DENSE)
            out[p + "mlp.linear_fc1.weight"], out[p + "mlp.linear_fc2.weight"] = fc1, fc2
            continue
        block = names.moe_block if hf.has(f"{q}{names.moe_block}.gate.weight") else "mlp"
        b = f"{q}{block}."
        out[p + "mlp.router.weight"] = hf.take(b + "gate.weight")
        fc1_EFD, fc2_EDF = _experts_from_hf(hf, b, s, names)
        out[p + "mlp.experts.experts.linear_fc1.weight"] = fc1_EFD
        out[p + "mlp.experts.experts.linear_fc2.weight"] = fc2_EDF
        if s.shared_expert:
            fc1, fc2 = _swiglu_from_hf(hf, b + "shared_expert.", DENSE)
            out[p + "mlp.shared_experts.linear_fc1.weight"] = fc1
            out[p + "mlp.shared_experts.linear_fc2.weight"] = fc2
            out[p + "mlp.shared_experts.gate_weight"] = hf.take(b + "shared_expert_gate.weight")
    out["decoder.final_layernorm.weight"] = hf.take("model.norm.weight")
    if s.tied:
        hf.discard("lm_head.weight")
    else:
        out["output_layer.weight"] = hf.take("lm_head.weight")
    for key in [k for k in hf_tensors if k.endswith("rotary_emb.inv_freq")]:
        hf.discard(key)                # a buffer some old checkpoints saved
    hf.expect_empty("tensors megamoe has no place for")
    return out


# ---- config fields both families share ---------------------------------------------------------

def common_problems(cfg) -> list[str]:
    """What neither Mixtral nor Qwen2-MoE can express (field: reason)."""
    m, moe = cfg.model, cfg.model.moe
    bad = []
    if m.qk_layernorm:
        bad.append("model.qk_layernorm: QK-norm (RMSNorm over the head dim) has no "
                   "Mixtral/Qwen2-MoE equivalent")
    if not moe.num_experts:
        bad.append("model.moe.num_experts: 0 (a dense model) is not an MoE family")
    if moe.router != "topk":
        bad.append(f"model.moe.router: {moe.router!r}; HF MoE families route token-choice top-k")
    if moe.score_function != "softmax":
        bad.append(f"model.moe.score_function: {moe.score_function!r}; HF Mixtral/Qwen2-MoE "
                   "weight experts by softmax")
    if moe.capacity_factor is not None:
        bad.append("model.moe.capacity_factor: token dropping; HF Mixtral/Qwen2-MoE are dropless")
    return bad


def decoder_config(cfg, vocab_size: int) -> dict:
    m, moe = cfg.model, cfg.model.moe
    s = DecoderShape.from_config(cfg)
    return {
        "vocab_size": vocab_size, "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.groups, "head_dim": s.head_dim,
        "hidden_act": "silu", "rms_norm_eps": m.norm_epsilon,
        # megamoe.models.lm hands Megatron int(rotary_base)
        "rope_parameters": {"rope_type": "default", "rope_theta": float(int(m.rotary_base))},
        "max_position_embeddings": m.seq_length, "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": m.init_method_std,
        "num_experts_per_tok": moe.topk, "router_aux_loss_coef": moe.aux_loss_coeff,
        "output_router_logits": False, "use_cache": True, "dtype": "float32",
    }


def decoder_overrides(c, where: str) -> tuple[list[str], int, int, int]:
    """Overrides from the fields of an HF config object both families share; also (H, G, d)."""
    if c.hidden_act != "silu":
        raise ValueError(f"{where}: hidden_act {c.hidden_act!r}; megamoe's SwiGLU uses silu")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: rope_parameters.rope_type {rope['rope_type']!r}; megamoe's "
                         "RoPE is the unscaled default")
    if theta is None or not float(theta).is_integer():
        raise ValueError(f"{where}: rope_theta {theta!r}; megamoe needs a whole number")
    heads = c.num_attention_heads
    groups = c.num_key_value_heads or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return [
        f"model.num_layers={c.num_hidden_layers}", f"model.hidden_size={c.hidden_size}",
        f"model.num_attention_heads={heads}", f"model.num_query_groups={groups}",
        f"model.kv_channels={head_dim}", f"model.vocab_size={c.vocab_size}",
        f"model.norm_epsilon={float(c.rms_norm_eps)!r}", f"model.rotary_base={float(theta)!r}",
        f"model.tie_embeddings={str(bool(c.tie_word_embeddings)).lower()}",
        f"model.init_method_std={float(c.initializer_range)!r}", "model.qk_layernorm=false",
        f"model.moe.topk={c.num_experts_per_tok}", "model.moe.router=topk",
        "model.moe.score_function=softmax", "model.moe.capacity_factor=null",
        f"model.moe.aux_loss_coeff={float(c.router_aux_loss_coef)!r}",
    ], heads, groups, head_dim


def layer_freq_override(moe_layers) -> str:
    pattern = [int(x) for x in moe_layers]
    return "model.moe.layer_freq=" + ("1" if all(pattern) else str(pattern))
