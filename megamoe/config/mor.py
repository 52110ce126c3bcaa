"""`model.mor`: Mixture-of-Recursions (Bae et al., arXiv 2507.10524; papers.md §1), off by default.

With `enabled`, `model.num_layers` is the *unrolled* depth L: Middle-Cycle (the paper's default)
keeps the first and last layers unique and applies a pool of K = (L−2)/N_r shared layers N_r
times, each recursion step to the tokens its depth router keeps (megamoe.mor).

Defaults are the official code's (`util/config.py`, `conf/pretrain/250720_*`): expert-choice
α = 0.1 (σ gate), BCE aux loss 0.001, C_r = (N_r − r + 1)/N_r; token-choice α = 1 (softmax),
balancing loss 0.1, z-loss 1e-5 (the appendix caption says 1e-3). `None` means "the router's
default" for `alpha` and `z_loss_coeff`.

Pipeline parallelism: stages hold whole units — the unique first layer, the recursion block
(never split), the unique last layer — split to balance training FLOPs (megamoe.mor.stages), so
`parallel.pipeline` ≤ 3 (Middle-*) or 1 (Cycle / Sequence: the block only), `model.num_layers`
need not divide by it, and `parallel.virtual_pipeline` is refused.

Causality: expert-choice takes a top-k over the sequence in training, so future tokens decide
whether a token recurses; it is refused in the causal decoder unless `model.mor.allow_non_causal`
is set. This is MoR's own opt-in (not `model.moe.allow_non_causal`), so that opting in for an MoE
router family never silently admits a non-causal depth router too. At inference the σ > 0.5
rule (`inference_rule: threshold`) is causal.

Relaxed recursion (Relaxed Recursive Transformers, Bae et al. 2024; papers.md §2): with
`lora_rank` > 0 every application of a shared layer — recursion step r, layer j of the step —
adds its own LoRA to the targeted linears, W x + (α/rank)·B^{r,j} A^{r,j} x (B = 0 at
initialisation, so the model starts as the unrelaxed one; the unique first/last layers get
none). `lora_alpha` None means 2·rank (the RRT code's default). `lora_targets` names Megatron's
linears: `qkv` (default) is the *fused* query/key/value projection, so it adapts q, k and v
where the reference code adapts q and v only; `proj` the attention output, `fc1`/`fc2` a dense
FFN (refused on MoE pool slots). `lora_dropout` (RRT: 0.1) drops adapter inputs; the default 0
keeps runs layout-independent (dropout masks depend on the TP/SP layout).

Checks against other sections (L against the sharing scheme, pipeline stages, MoE families,
causality) are `megamoe.mor.checks`, run by `megamoe.models.checks.check_config`.

MoE layers with MoR must be `model.moe.router: topk` or `modality` (VLMo without VL layers, or
Uni-MoE pools): the recursion block hands them its compact batches' pads as padding (left out of
routing, losses and counts) and the per-token routing context (modality ids) gathered like the
hidden states, under any parallel layout, TP included; other families take no padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from megamoe.config.errors import at_least, fail, greater_than, in_range, one_of

SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
DEPTH_ROUTERS = ("expert", "token")
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
# α of the depth routers when `alpha` is unset (official code; megamoe.mor's routers read these):
EXPERT_CHOICE_ALPHA = 0.1                                  # α·σ(z)
TOKEN_CHOICE_ALPHA = {"softmax": 1.0, "sigmoid": 0.1}      # by model.mor.token.score (§1.5)


@dataclass
class MoRTokenOptions:
    """Token-choice depth routing (papers.md §1.5)."""
    SECTION: ClassVar[str] = "model.mor.token"

    score: str = "softmax"           # softmax·α (α = 1) | sigmoid·α (α = 0.1)
    balancing: str = "loss"          # loss: Σ f_i P_i | loss_free: selection bias b, sign rule
    balance_coeff: float = 0.1
    bias_rate: float = 0.001         # u of the loss-free update

    def validate(self) -> None:
        one_of(self, "score", ("softmax", "sigmoid"))
        one_of(self, "balancing", ("loss", "loss_free"))
        at_least(self, "balance_coeff", 0)
        at_least(self, "bias_rate", 0)


@dataclass
class MoRConfig:
    SECTION: ClassVar[str] = "model.mor"

    enabled: bool = False
    num_recursions: int = 3                  # N_r
    sharing: str = "middle_cycle"
    router: str = "expert"                   # expert-choice (the paper's choice) | token-choice
    capacities: list[float] | None = None    # expert: C_r per step; None: (N_r − r + 1)/N_r
    alpha: float | None = None               # gate scale; None: 0.1 expert/sigmoid, 1.0 softmax
    temperature: float = 1.0                 # router input is H / temperature
    aux_loss_coeff: float = 0.001            # expert: BCE on top-k membership (§1.4.7)
    z_loss_coeff: float | None = None        # None: 0 (expert), 1e-5 (token)
    inference_rule: str = "threshold"        # expert at eval: σ(z) > 0.5 (causal) | topk
    gating: str = "weighted"                 # H + g·f(H) | additive H + f(H)
    kv_sharing: bool = False                 # recursive KV sharing (§1.6): needs C_1 = 1
    allow_non_causal: bool = False           # opt in to expert-choice training in a decoder
    lora_rank: int = 0                       # RRT per-recursion LoRA rank; 0: off
    lora_alpha: float | None = None          # None: 2·lora_rank
    lora_targets: list[str] = field(default_factory=lambda: ["qkv"])   # ⊆ LORA_TARGETS
    lora_dropout: float = 0.0                # on the adapter input (RRT code: 0.1)
    token: MoRTokenOptions = field(default_factory=MoRTokenOptions)

    def validate(self) -> None:
        at_least(self, "num_recursions", 1)
        one_of(self, "sharing", SHARING)
        one_of(self, "router", DEPTH_ROUTERS)
        greater_than(self, "alpha", 0)
        greater_than(self, "temperature", 0)
        at_least(self, "aux_loss_coeff", 0)
        at_least(self, "z_loss_coeff", 0)
        one_of(self, "inference_rule", ("threshold", "topk"))
        one_of(self, "gating", ("weighted", "additive"))
        self.token.validate()
        self._validate_capacities()
        self._validate_lora()

    def _validate_lora(self) -> None:
        at_least(self, "lora_rank", 0)
        greater_than(self, "lora_alpha", 0)
        in_range(self, "lora_dropout", 0, 1, high_open=True)
        targets = self.lora_targets
        if not targets or len(set(targets)) != len(targets) or \
                any(t not in LORA_TARGETS for t in targets):
            fail("model.mor.lora_targets", f"{targets}: a non-empty list of distinct names from "
                 f"{' | '.join(LORA_TARGETS)}")

    def _validate_capacities(self) -> None:
        caps = self.capacities
        if caps is None:
            return
        if self.router != "expert":
            fail("model.mor.capacities", "only expert-choice routing has per-step capacities "
                 "(token-choice depths come from the router); leave it unset")
        if len(caps) != self.num_recursions:
            fail("model.mor.capacities", f"{len(caps)} values for model.mor.num_recursions="
                 f"{self.num_recursions}")
        if any(not 0 < c <= 1 for c in caps) or any(a < b for a, b in zip(caps, caps[1:])):
            fail("model.mor.capacities", f"{caps}: each in (0, 1] and non-increasing "
                 "(hierarchical filtering keeps a subset of the previous step)")
        if self.kv_sharing and caps[0] < 1:
            fail("model.mor.kv_sharing", f"needs capacity 1 at the first recursion (its K/V "
                 f"cover the whole sequence), got model.mor.capacities={caps}")

    def resolved_alpha(self) -> float:
        """α of the depth router with `None` resolved to the router's default."""
        if self.alpha is not None:
            return float(self.alpha)
        if self.router == "expert":
            return EXPERT_CHOICE_ALPHA
        return TOKEN_CHOICE_ALPHA[self.token.score]

    def resolved_lora_alpha(self) -> float | None:
        """The LoRA scale's α (`None`: 2·rank, the RRT code's default); None without LoRA."""
        if not self.lora_rank:
            return None
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank)
