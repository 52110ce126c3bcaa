"""`MegamoeConfig`: the architecture of a megamoe decoder, for `modeling_megamoe.py`.

Shipped into every Hugging Face folder that `megamoe convert --to hf` writes for a model no
transformers architecture expresses (`auto_map` in its config.json), so this file must stay
self-contained: it imports only transformers and mor_megamoe.py (shipped alongside).

Fields follow transformers' names where a family has one (Qwen2/3-MoE); megamoe's names in
parentheses:
- qkv_bias (model.add_qkv_bias): biases on q, k and v only, never on o_proj.
- qk_norm (model.qk_layernorm): RMSNorm over the head dim of every query and key head.
- moe_layers (model.moe.layer_freq): 0/1 per layer; 1 is an MoE FFN, 0 a dense SwiGLU FFN of
  `intermediate_size`.
- router (model.moe.router): the routing family, see ROUTERS in routers_megamoe.py.
  score_function: "softmax" | "sigmoid"; norm_topk_prob (model.moe.renormalize; false for
  dit_moe/diff_moe): divide the k selected scores by their sum.
- router_options (model.moe.<section>): the family's option sections as saved by megamoe,
  {section: {option: value}} (e.g. {"vmoe": {"eval_capacity_ratio": 0.5, …}}).
- router_z_loss_coef (model.moe.z_loss_coeff): training only, kept for imports.
- loss_free_bias_rate (model.moe.loss_free_bias_rate): > 0 when the model has the loss-free
  `selection_bias` buffer (topk, dit_moe, diff_moe).
- routing_context (data.synthetic_modalities, data.synthetic_timesteps): the synthetic rules
  that derive modality ids / timesteps from the tokens when forward is not given them.
- capacity_factor (model.moe.capacity_factor, null: dropless), token_drop_policy
  (model.moe.drop_policy, "probs" | "position") and pad_to_capacity (model.moe.pad_to_capacity):
  Megatron's token dropping for the top-k routers (topk, dit_moe), over the B·S tokens of a
  call (routers_megamoe.py `drop_over_capacity`; in a MoR step over its active tokens);
  outputs then depend on the batch.
- soft_moe_groups ("sequence"; router "soft" only): the token groups of the Soft MoE slots.
  Each input sequence has its own slots (megamoe issue 12); folders exported before, whose
  slots mixed the whole batch, lack it and are refused.
- shared_expert_intermediate_size (model.moe.shared_expert_ffn_hidden_size, 0: none) and
  shared_expert_gate: σ(x·w_g) times the shared expert's output.
- mor (model.mor, Mixture-of-Recursions; null: a plain decoder): {num_recursions, sharing,
  router ("expert" | "token"), capacities (C_r per step, expert), alpha, temperature,
  inference_rule ("threshold" | "topk", expert), gating ("weighted" | "additive"), kv_sharing,
  token_score ("softmax" | "sigmoid"), token_balancing ("loss" | "loss_free": the
  `router_bias` selects depths), lora_rank (0: none), lora_alpha, lora_targets (per-recursion
  LoRA adapters, optional keys: absent means none)} and megamoe's training-only options
  (`training`, kept for imports). num_hidden_layers and moe_layers count the unrolled layers;
  see mor_megamoe.py.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .mor_megamoe import LORA_TARGETS, mor_layout, slot_is_moe

ROUTER_KINDS = ("topk", "dit_moe", "diff_moe", "moee", "vmoe", "limoe", "expert_choice",
                "race", "modality", "soft", "diffmoe")
# the option sections each family reads (router_options)
ROUTER_SECTIONS = {"diff_moe": ("diff_moe",), "vmoe": ("vmoe",), "limoe": ("vmoe",),
                   "race": ("race",), "modality": ("modality",), "soft": ("soft",),
                   "diffmoe": ("diffmoe",)}
SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOR_FIELDS = ("num_recursions", "sharing", "router", "capacities", "alpha", "temperature",
              "inference_rule", "gating", "kv_sharing", "token_score", "token_balancing")
MOR_CHOICES = {"sharing": ("cycle", "sequence", "middle_cycle", "middle_sequence"),
               "router": ("expert", "token"), "inference_rule": ("threshold", "topk"),
               "gating": ("weighted", "additive"), "token_score": ("softmax", "sigmoid"),
               "token_balancing": ("loss", "loss_free")}
MOR_MOE_ROUTERS = ("topk",)      # per-token routers: inactive tokens cannot change the others
CAPACITY_ROUTERS = ("topk", "dit_moe")      # Megatron's token dropping (capacity_factor)
DROP_POLICIES = ("probs", "position")


class MegamoeConfig(PretrainedConfig):
    model_type = "megamoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32000, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=None,
                 head_dim=None, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=2048, initializer_range=0.02, qkv_bias=False,
                 qk_norm=False, moe_layers=None, num_experts=4, moe_intermediate_size=128,
                 router="topk", num_experts_per_tok=2, score_function="softmax",
                 norm_topk_prob=True, shared_expert_intermediate_size=0,
                 shared_expert_gate=False, router_aux_loss_coef=0.0, tie_word_embeddings=False,
                 use_cache=True, router_options=None, loss_free_bias_rate=0.0,
                 routing_context=None, router_z_loss_coef=0.0, mor=None,
                 capacity_factor=None, token_drop_policy="probs", pad_to_capacity=False,
                 soft_moe_groups=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        if moe_layers is None:
            moe_layers = [int(num_experts > 0)] * num_hidden_layers
        self.moe_layers = [int(x) for x in moe_layers]
        self.num_experts = num_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.router = router
        self.num_experts_per_tok = num_experts_per_tok
        self.score_function = score_function
        self.norm_topk_prob = norm_topk_prob
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gate = shared_expert_gate
        self.router_aux_loss_coef = router_aux_loss_coef
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
        self.router_options = dict(router_options or {})
        self.loss_free_bias_rate = float(loss_free_bias_rate)
        self.routing_context = dict(routing_context or {})
        self.router_z_loss_coef = router_z_loss_coef
        self.mor = dict(mor) if mor else None
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.token_drop_policy = token_drop_policy
        self.pad_to_capacity = bool(pad_to_capacity)
        self.soft_moe_groups = soft_moe_groups
        self._validate()
        self._validate_capacity()
        if self.mor:
            self._validate_mor()
        super().__init__(**kwargs)

    def _validate(self) -> None:
        """A folder this code cannot run is refused with the field, not mis-run."""
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act: {self.hidden_act!r}; the experts are SwiGLU (silu)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        if len(self.moe_layers) != self.num_hidden_layers or set(self.moe_layers) - {0, 1}:
            raise ValueError(f"moe_layers: {self.moe_layers}; needs one 0/1 entry per layer "
                             f"(num_hidden_layers is {self.num_hidden_layers})")
        if any(self.moe_layers):
            if self.router not in ROUTER_KINDS:
                raise ValueError(f"router: {self.router!r}; this code implements "
                                 f"{', '.join(ROUTER_KINDS)}")
            if self.score_function not in SCORE_FUNCTIONS:
                raise ValueError(f"score_function: {self.score_function!r}; one of "
                                 f"{', '.join(SCORE_FUNCTIONS)}")
            for section in ROUTER_SECTIONS.get(self.router, ()):
                if not isinstance(self.router_options.get(section), dict):
                    raise ValueError(f"router_options: router {self.router!r} needs the "
                                     f"{section!r} section")
            if self.router == "soft" and self.soft_moe_groups != "sequence":
                raise ValueError(f"soft_moe_groups: {self.soft_moe_groups!r}; exported before "
                                 "Soft MoE's slots became per input sequence (megamoe issue "
                                 "12), its slots mixed the whole batch: this code cannot run "
                                 "it (\"sequence\" is the only rule)")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok: {self.num_experts_per_tok}; needs 1 to "
                                 f"num_experts ({self.num_experts})")
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise ValueError("shared_expert_gate: true needs shared_expert_intermediate_size > 0")

    def _validate_capacity(self) -> None:
        if self.capacity_factor is None:
            return
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor: {self.capacity_factor}; must be > 0 (null: "
                             "dropless)")
        if self.router not in CAPACITY_ROUTERS or not any(self.moe_layers):
            raise ValueError(f"capacity_factor: set, but router {self.router!r} has no token "
                             f"dropping (only {', '.join(CAPACITY_ROUTERS)} MoE layers)")
        if self.token_drop_policy not in DROP_POLICIES:
            raise ValueError(f"token_drop_policy: {self.token_drop_policy!r}; one of "
                             f"{', '.join(DROP_POLICIES)}")

    def _validate_mor(self) -> None:
        mor = self.mor
        missing = [f for f in MOR_FIELDS if f not in mor]
        if missing:
            raise ValueError(f"mor: missing {', '.join(missing)}")
        for field, choices in MOR_CHOICES.items():
            if mor[field] not in choices:
                raise ValueError(f"mor.{field}: {mor[field]!r}; one of {', '.join(choices)}")
        R = mor["num_recursions"]
        if mor["router"] == "expert":
            caps = mor["capacities"]
            if not isinstance(caps, list) or len(caps) != R or any(
                    not 0 < c <= 1 for c in caps):
                raise ValueError(f"mor.capacities: {caps!r}; {R} values in (0, 1]")
            if mor["kv_sharing"] and caps[0] < 1:
                raise ValueError("mor.kv_sharing: needs capacity 1 at the first recursion")
        if any(self.moe_layers) and self.router not in MOR_MOE_ROUTERS:
            raise ValueError(f"router: {self.router!r} inside the recursion block; MoR models "
                             f"have {', '.join(MOR_MOE_ROUTERS)} MoE layers")
        slot_moe = slot_is_moe(mor["sharing"], self.moe_layers, R)   # also checks L splits
        self._validate_lora(slot_moe)

    def _validate_lora(self, slot_moe: dict) -> None:
        mor = self.mor
        rank = mor.get("lora_rank", 0)
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"mor.lora_rank: {rank!r}; an integer >= 0 (0: no adapters)")
        if not rank:
            return
        alpha, targets = mor.get("lora_alpha"), mor.get("lora_targets")
        if not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"mor.lora_alpha: {alpha!r}; a number > 0")
        if (not isinstance(targets, list) or not targets or len(set(targets)) != len(targets)
                or set(targets) - set(LORA_TARGETS)):
            raise ValueError(f"mor.lora_targets: {targets!r}; distinct names from "
                             f"{', '.join(LORA_TARGETS)}")
        _, pool, _ = mor_layout(mor["sharing"], self.num_hidden_layers, mor["num_recursions"])
        ffn = [t for t in targets if t in ("fc1", "fc2")]
        if ffn and any(slot_moe[slot] for slot in pool):
            raise ValueError(f"mor.lora_targets: {ffn} adapt dense FFNs, but the shared pool "
                             "has MoE layers")
