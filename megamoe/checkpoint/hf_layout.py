"""megamoe's decoder ⇄ Hugging Face's Mixtral-style decoders (Mixtral, Qwen2-MoE, Qwen3-MoE and
megamoe's own remote code): tensor names and layouts. Config fields: `hf_fields`.

Legend: E experts, F FFN hidden size, D hidden size, H query heads, G query groups (KV heads),
d head dim. Layouts (read in Megatron-Core 0.16.1 and transformers 5.23, checked by the logit
tests in tests/unit/test_hf_convert.py and test_hf_families.py):
- Megatron's fused `linear_qkv` rows [G·(H/G + 2)·d, D] are per query group: the group's H/G
  query heads, then its key head, then its value head. HF keeps q_proj [H·d, D] and
  k_proj/v_proj [G·d, D]; query head h reads KV head h // (H/G) in both. Biases alike.
- SwiGLU `linear_fc1` [2F, D] is [gate; up] and computes silu(gate)·up, as HF's
  [gate_proj; up_proj] (Mixtral: [w1; w3]); `linear_fc2` [D, F] is down_proj (w2).
- Experts: Megatron's `experts.experts.linear_fc1.weight` [E, 2F, D] is transformers 5.x's fused
  `experts.gate_up_proj`; on disk (what `save_pretrained` writes) each expert is separate.
- The router weight [E, D] is HF's `gate.weight` (megamoe's remote code: every router tensor
  `mlp.router.<name>`, parameters and exported buffers alike, is `mlp.gate.<name>`); the gated
  shared expert's `gate_weight` [1, D] is Qwen2-MoE's `shared_expert_gate.weight` (both:
  σ(x·w)·shared(x)).
- QK-norm: Megatron's `q_layernorm`/`k_layernorm` [d] (RMSNorm over each head's d channels,
  before RoPE) are Qwen3-MoE's `q_norm`/`k_norm`.
- RMSNorm, RoPE (rotate-half, θ = rotary_base) and the 1/√d attention scale match as they are.
- Mixture-of-Recursions (megamoe's remote code only): the unique first/last layers
  `decoder.layers.{0,1}` are `model.layers.{0,1}`, the shared pool `decoder.recursion.layers.{j}`
  is `model.recursion.layers.{j}` (same per-layer names), and every depth-router tensor
  `decoder.recursion.router.<name>` (expert-choice `routers.<r>.weight`, token-choice
  `router.weight` and the loss-free `router_bias` buffer) is `model.recursion.router.<name>`.
  Per-recursion LoRA `decoder.recursion.lora.{r}.{j}.{target}.{A,B}` is
  `model.recursion.lora.{r}.{j}.{target}.{A,B}`, unchanged except qkv's B [(H + 2G)·d, rank]:
  Megatron's per-group rows (as linear_qkv's) become the remote code's [q; k; v] rows (q_proj's
  H·d, k_proj's G·d, v_proj's G·d). fc1's B is [gate; up] in both (as linear_fc1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.checkpoint.global_load import num_layers, unstack_layers

DENSE = ("gate_proj", "up_proj", "down_proj")   # HF names of a SwiGLU MLP's linears
MOR_ROUTER = ("decoder.recursion.router.", "model.recursion.router.")   # megamoe, HF prefixes
MOR_LORA = ("decoder.recursion.lora.", "model.recursion.lora.")


@dataclass(frozen=True)
class Names:
    """HF names that differ between families."""
    moe_block: str                     # the MoE FFN inside a layer ("block_sparse_moe", "mlp")
    expert: tuple[str, str, str]       # gate, up and down linear of one expert
    fused_experts: bool = False        # on disk as experts.gate_up_proj [E, 2F, D], down_proj
    router_state: bool = False         # other router tensors: mlp.router.<n> ⇄ <block>.gate.<n>


@dataclass(frozen=True)
class DecoderShape:
    """What the tensor conversion needs to know about a model."""
    moe_layers: tuple[bool, ...]
    num_experts: int
    heads: int
    groups: int
    head_dim: int
    qkv_bias: bool
    qk_norm: bool
    shared_expert: bool
    shared_gate: bool
    tied: bool
    # Mixture-of-Recursions: the stored layers (`moe_layers` order) are `mor_unique` unique
    # layers, then the shared pool (see `layer_prefixes`); None: a plain decoder
    mor_unique: int | None = None

    @classmethod
    def from_config(cls, cfg) -> "DecoderShape":
        from megamoe.specs.gpt_moe import moe_layer_pattern

        m, moe = cfg.model, cfg.model.moe
        moe_layers, mor_unique = tuple(moe_layer_pattern(m.num_layers, moe.layer_freq,
                                                         moe.num_experts)), None
        mor = getattr(m, "mor", None)
        if mor is not None and mor.enabled:
            mor_unique, moe_layers = mor_stored_layers(mor.sharing, mor.num_recursions,
                                                       moe_layers)
        return cls(moe_layers=moe_layers,
                   num_experts=moe.num_experts, heads=m.num_attention_heads,
                   groups=m.num_query_groups or m.num_attention_heads,
                   head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
                   qkv_bias=m.add_qkv_bias, qk_norm=m.qk_layernorm,
                   shared_expert=bool(moe.shared_expert_ffn_hidden_size),
                   shared_gate=moe.shared_expert_gate, tied=m.tie_embeddings,
                   mor_unique=mor_unique)

    def layer_prefixes(self) -> list[tuple[str, str]]:
        """(megamoe prefix, HF prefix) of every stored layer, in `moe_layers` order."""
        if self.mor_unique is None:
            return [(f"decoder.layers.{i}.", f"model.layers.{i}.")
                    for i in range(len(self.moe_layers))]
        pool = range(len(self.moe_layers) - self.mor_unique)
        return ([(f"decoder.layers.{i}.", f"model.layers.{i}.") for i in range(self.mor_unique)]
                + [(f"decoder.recursion.layers.{j}.", f"model.recursion.layers.{j}.")
                   for j in pool])


def mor_stored_layers(sharing: str, num_recursions: int, unrolled_moe) -> tuple[int, tuple]:
    """(unique layers, MoE flag of every stored layer) of a Mixture-of-Recursions decoder of
    len(unrolled_moe) unrolled layers: the unique first/last layers (Middle-*), then the pool
    slots in order (as megamoe.mor.decoder.MoRDecoder stores them)."""
    from megamoe.mor.sharing import sharing_plan

    plan = sharing_plan(sharing, len(unrolled_moe), num_recursions)
    slot_moe: dict = {}
    for ell, slot in enumerate(plan.pool_index):
        if slot_moe.setdefault(slot, bool(unrolled_moe[ell])) != bool(unrolled_moe[ell]):
            raise ValueError(f"MoE layer pattern {[int(x) for x in unrolled_moe]}: unrolled "
                             f"layers sharing pool slot {slot} (sharing {sharing!r}) differ")
    unique = [s for s in (plan.first_unique, plan.last_unique) if s is not None]
    pool = sorted({s for step in plan.recursion_steps() for s in step})
    return len(unique), tuple(slot_moe[s] for s in unique + pool)


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

    def names_under(self, prefix: str) -> list[str]:
        """The remaining names that start with `prefix`, without it."""
        return sorted(k[len(prefix):] for k in self._t if k.startswith(prefix))

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


def lora_qkv_to_hf(B_OR: torch.Tensor, s: DecoderShape) -> torch.Tensor:
    """qkv adapter's B: Megatron's per-group rows → [q; k; v] rows."""
    return torch.cat(split_qkv(B_OR, s), dim=0)


def lora_qkv_from_hf(B_OR: torch.Tensor, s: DecoderShape, where: str) -> torch.Tensor:
    q_rows, kv_rows = s.heads * s.head_dim, s.groups * s.head_dim
    if B_OR.shape[0] != q_rows + 2 * kv_rows:
        raise ValueError(f"{where}: qkv LoRA B has {B_OR.shape[0]} rows, the config implies "
                         f"{q_rows + 2 * kv_rows} ((heads + 2·kv heads) × head_dim)")
    return fuse_qkv(*B_OR.split([q_rows, kv_rows, kv_rows]), s, where)


def _lora(pool: TensorPool, src: str, convert_qkv) -> dict:
    """Every LoRA tensor under prefix `src`, by its name below it; qkv's B converted."""
    return {name: (convert_qkv(pool.take(src + name)) if name.endswith("qkv.B")
                   else pool.take(src + name))
            for name in pool.names_under(src)}


# ---- megamoe → HF ------------------------------------------------------------------------------

def _swiglu_to_hf(out: dict, prefix: str, names, fc1: torch.Tensor, fc2: torch.Tensor) -> None:
    gate, up = fc1.chunk(2, dim=0)
    for name, t in zip(names, (gate, up, fc2)):
        out[f"{prefix}{name}.weight"] = t


def to_hf(tensors: dict, s: DecoderShape, names: Names) -> dict:
    """megamoe's global tensors (either layer layout) → HF tensors in the on-disk naming."""
    want = len(s.moe_layers) if s.mor_unique is None else s.mor_unique
    if num_layers(tensors) != want:
        raise ValueError(f"tensors hold {num_layers(tensors)} decoder layers (decoder.layers.*), "
                         f"the config implies {want}")
    mm = TensorPool(unstack_layers(tensors), "megamoe tensors")
    out = {"model.embed_tokens.weight": mm.take("embedding.word_embeddings.weight")}
    for (p, q), is_moe in zip(s.layer_prefixes(), s.moe_layers):
        out[q + "input_layernorm.weight"] = mm.take(p + "input_layernorm.weight")
        for kind in ("weight", "bias") if s.qkv_bias else ("weight",):
            qkv = split_qkv(mm.take(f"{p}self_attention.linear_qkv.{kind}"), s)
            for proj, t in zip("qkv", qkv):
                out[f"{q}self_attn.{proj}_proj.{kind}"] = t
        for qk in "qk" if s.qk_norm else "":
            out[f"{q}self_attn.{qk}_norm.weight"] = mm.take(
                f"{p}self_attention.{qk}_layernorm.weight")
        out[q + "self_attn.o_proj.weight"] = mm.take(p + "self_attention.linear_proj.weight")
        out[q + "post_attention_layernorm.weight"] = mm.take(p + "pre_mlp_layernorm.weight")
        if not is_moe:
            _swiglu_to_hf(out, q + "mlp.", DENSE, mm.take(p + "mlp.linear_fc1.weight"),
                          mm.take(p + "mlp.linear_fc2.weight"))
            continue
        b = f"{q}{names.moe_block}."
        out[b + "gate.weight"] = mm.take(p + "mlp.router.weight")
        if names.router_state:
            for name in mm.names_under(p + "mlp.router."):
                out[b + "gate." + name] = mm.take(p + "mlp.router." + name)
        fc1_EFD = mm.take(p + "mlp.experts.experts.linear_fc1.weight")
        fc2_EDF = mm.take(p + "mlp.experts.experts.linear_fc2.weight")
        if names.fused_experts:
            out[b + "experts.gate_up_proj"], out[b + "experts.down_proj"] = fc1_EFD, fc2_EDF
        else:
            for e in range(fc1_EFD.shape[0]):
                _swiglu_to_hf(out, f"{b}experts.{e}.", names.expert, fc1_EFD[e], fc2_EDF[e])
        if s.shared_expert:
            _swiglu_to_hf(out, b + "shared_expert.", DENSE,
                          mm.take(p + "mlp.shared_experts.linear_fc1.weight"),
                          mm.take(p + "mlp.shared_experts.linear_fc2.weight"))
        if s.shared_gate:
            out[b + "shared_expert_gate.weight"] = mm.take(p + "mlp.shared_experts.gate_weight")
    if s.mor_unique is not None:
        for name in mm.names_under(MOR_ROUTER[0]):
            out[MOR_ROUTER[1] + name] = mm.take(MOR_ROUTER[0] + name)
        for name, t in _lora(mm, MOR_LORA[0], lambda B: lora_qkv_to_hf(B, s)).items():
            out[MOR_LORA[1] + name] = t
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
    for (p, q), is_moe in zip(s.layer_prefixes(), s.moe_layers):
        out[p + "input_layernorm.weight"] = hf.take(q + "input_layernorm.weight")
        for kind in ("weight", "bias") if s.qkv_bias else ("weight",):
            qkv = [hf.take(f"{q}self_attn.{proj}_proj.{kind}") for proj in "qkv"]
            out[f"{p}self_attention.linear_qkv.{kind}"] = fuse_qkv(*qkv, s, f"{where}: {q}")
        for qk in "qk" if s.qk_norm else "":
            out[f"{p}self_attention.{qk}_layernorm.weight"] = hf.take(
                f"{q}self_attn.{qk}_norm.weight")
        out[p + "self_attention.linear_proj.weight"] = hf.take(q + "self_attn.o_proj.weight")
        out[p + "pre_mlp_layernorm.weight"] = hf.take(q + "post_attention_layernorm.weight")
        if not is_moe:
            fc1, fc2 = _swiglu_from_hf(hf, q + "mlp.", DENSE)
            out[p + "mlp.linear_fc1.weight"], out[p + "mlp.linear_fc2.weight"] = fc1, fc2
            continue
        block = names.moe_block if hf.has(f"{q}{names.moe_block}.gate.weight") else "mlp"
        b = f"{q}{block}."
        out[p + "mlp.router.weight"] = hf.take(b + "gate.weight")
        if names.router_state:
            for name in hf.names_under(b + "gate."):
                out[p + "mlp.router." + name] = hf.take(b + "gate." + name)
        fc1_EFD, fc2_EDF = _experts_from_hf(hf, b, s, names)
        out[p + "mlp.experts.experts.linear_fc1.weight"] = fc1_EFD
        out[p + "mlp.experts.experts.linear_fc2.weight"] = fc2_EDF
        if s.shared_expert:
            fc1, fc2 = _swiglu_from_hf(hf, b + "shared_expert.", DENSE)
            out[p + "mlp.shared_experts.linear_fc1.weight"] = fc1
            out[p + "mlp.shared_experts.linear_fc2.weight"] = fc2
        if s.shared_gate:
            out[p + "mlp.shared_experts.gate_weight"] = hf.take(b + "shared_expert_gate.weight")
    if s.mor_unique is not None:
        for name in hf.names_under(MOR_ROUTER[1]):
            out[MOR_ROUTER[0] + name] = hf.take(MOR_ROUTER[1] + name)
        qkv = lambda B: lora_qkv_from_hf(B, s, f"{where}: {MOR_LORA[1]}")   # noqa: E731
        for name, t in _lora(hf, MOR_LORA[1], qkv).items():
            out[MOR_LORA[0] + name] = t
    out["decoder.final_layernorm.weight"] = hf.take("model.norm.weight")
    if s.tied:
        hf.discard("lm_head.weight")
    else:
        out["output_layer.weight"] = hf.take("lm_head.weight")
    for key in [k for k in hf_tensors if k.endswith("rotary_emb.inv_freq")]:
        hf.discard(key)                # a buffer some old checkpoints saved
    hf.expect_empty("tensors megamoe has no place for")
    return out
