"""Options of the router families that need more than `model.moe`'s common keys, one nested
section per family (`model.moe.<family>`), validated only when that family is in use.

Add a family: a dataclass here with `SECTION: ClassVar[str] = "model.moe.<family>"`, defaults
from papers.md (values papers.md marks [unverified] are documented next to the field), a
`validate()` and an `in_use(self, moe) -> bool` method (e.g. `moe.router == "race"`); then a
field `<family>: <Options> = field(default_factory=<Options>)` in `schema.MoEConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from megamoe.config.errors import at_least, fail, greater_than, in_range, one_of


def validate_families(moe) -> None:
    """Validate the section of every family the config uses (the router's own, and add-ons
    such as entropy losses that apply to any router)."""
    import dataclasses

    for f in dataclasses.fields(moe):
        section = getattr(moe, f.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
            in_use = getattr(section, "in_use", None)
            if in_use is None or in_use(moe):
                section.validate()
                if hasattr(section, "validate_with"):    # checks against model.moe's keys
                    section.validate_with(moe)


def _refuse_capacity(moe, why: str) -> None:
    if moe.capacity_factor is not None:
        fail("model.moe.capacity_factor", f"must be unset for router '{moe.router}': {why}")


@dataclass
class MoEEOptions:
    """MoEE soft mixing (papers.md §12): every token goes to every expert with softmax weights."""
    SECTION: ClassVar[str] = "model.moe.moee"

    def validate(self) -> None:
        pass

    def in_use(self, moe) -> bool:
        return moe.router == "moee"

    def validate_with(self, moe) -> None:
        if moe.topk != moe.num_experts:
            fail("model.moe.topk", f"router 'moee' sends every token to every expert: set it to "
                 f"model.moe.num_experts ({moe.num_experts}), got {moe.topk}")
        _refuse_capacity(moe, "every token goes to every expert, nothing is dropped")


@dataclass
class DiTMoEOptions:
    """DiT-MoE (papers.md §6): softmax top-k with raw probabilities, shared experts and the
    expert-level balance loss α Σ f_i P_i, α = model.moe.aux_loss_coeff (paper 0.005, code 0.01)."""
    SECTION: ClassVar[str] = "model.moe.dit_moe"

    require_shared_expert: bool = True   # DiT-MoE always has one (code: hidden 2·D)

    def validate(self) -> None:
        pass

    def in_use(self, moe) -> bool:
        return moe.router == "dit_moe"

    def validate_with(self, moe) -> None:
        if self.require_shared_expert and not moe.shared_expert_ffn_hidden_size:
            fail("model.moe.shared_expert_ffn_hidden_size", "router 'dit_moe' has a shared "
                 "expert (DiT-MoE code: 2·hidden_size); set it > 0, or set "
                 "model.moe.dit_moe.require_shared_expert=false")
        if moe.score_function != "softmax":
            fail("model.moe.score_function", "router 'dit_moe' gates with softmax")
        if moe.aux_loss_type != "switch":
            fail("model.moe.aux_loss_type", "router 'dit_moe' balances over the micro-batch "
                 "(Eq. 5, seq_aux=False): use 'switch'")


@dataclass
class SoftMoEOptions:
    """Soft MoE (papers.md §13c): each sequence's slots mix all tokens of that sequence."""
    SECTION: ClassVar[str] = "model.moe.soft"

    slots_per_expert: int | None = None  # p; None: round(m·C/n), m = tokens per sequence,
    #                                      filled when the config is loaded (config.derive)
    capacity_factor: float = 1.0         # C, only used to derive slots_per_expert
    normalize: bool = True               # l2-normalise tokens and slot parameters, times a
    #                                      learnable scale (init 1), as the reference code

    def validate(self) -> None:
        at_least(self, "slots_per_expert", 1)
        greater_than(self, "capacity_factor", 0)

    def in_use(self, moe) -> bool:
        return moe.router == "soft"

    def validate_with(self, moe) -> None:
        # model.moe.topk is not read: each slot goes to its one expert
        _refuse_capacity(moe, "Soft MoE drops nothing; its slots per expert come from "
                         "model.moe.soft.capacity_factor or model.moe.soft.slots_per_expert")


def check_soft_slots(cfg) -> None:
    """The slots of a sequence (`model.moe.soft.slots_per_expert` × experts, filled by
    `config.derive`) are split evenly over the tensor-parallel ranks."""
    moe = cfg.model.moe
    if moe.router != "soft" or not moe.num_experts:
        return
    soft = moe.soft
    assert soft.slots_per_expert is not None, "filled by config.derive.fill_derived"
    slots, tp = soft.slots_per_expert * moe.num_experts, cfg.parallel.tensor
    if slots % tp:
        fail("model.moe.soft.slots_per_expert", f"{soft.slots_per_expert} slots × "
             f"{moe.num_experts} experts = {slots} slots are not divisible by parallel.tensor "
             f"({tp}), over whose ranks they are split")


FAMILY_CHECKS = (check_soft_slots,)


def check_families(cfg) -> None:
    """Checks of the router families against the other sections (model.moe's own keys are
    checked by `validate_families` when the config is loaded)."""
    for check in FAMILY_CHECKS:
        check(cfg)


@dataclass
class DiffMoEOptions:
    """Diff-MoE (papers.md §8a): timestep-conditioned gate, expert-specific low-rank adaLN."""
    SECTION: ClassVar[str] = "model.moe.diff_moe"

    calibration_rank: int = 64           # r of Linear_{D→r}, Linear_{r→3D}

    def validate(self) -> None:
        at_least(self, "calibration_rank", 1)

    def in_use(self, moe) -> bool:
        return moe.router == "diff_moe"

    def validate_with(self, moe) -> None:
        DiTMoEOptions(require_shared_expert=False).validate_with(moe)
        _refuse_capacity(moe, "the calibration runs on every (token, expert) pair (dropless)")
        if moe.token_dispatcher != "alltoall":
            fail("model.moe.token_dispatcher", "router 'diff_moe' modulates each (token, "
                 "expert) copy before the all-to-all: use 'alltoall'")


def _refuse_token_choice_losses(moe) -> None:
    if moe.z_loss_coeff:
        fail("model.moe.z_loss_coeff", f"not supported by router '{moe.router}'; set it 0")


EXPERT_CHOICE_SELECTION_GROUPS = ("micro-batch", "sequence", "data-parallel")   # default first


@dataclass
class ExpertChoiceOptions:
    """Expert choice (Zhou et al. 2022): each expert takes its top-⌈k·T/E⌉ tokens of each
    selection group of T tokens, k = model.moe.topk. model.moe.aux_loss_coeff is not used
    (balanced by construction)."""
    SECTION: ClassVar[str] = "model.moe.expert_choice"

    selection_group: str = "micro-batch"  # micro-batch | sequence (each sample, as EC-DiT per
    #                                       image) | data-parallel (micro-batch m of every DP rank)

    def validate(self) -> None:
        one_of(self, "selection_group", EXPERT_CHOICE_SELECTION_GROUPS)

    def in_use(self, moe) -> bool:
        return moe.router == "expert_choice"

    def validate_with(self, moe) -> None:
        _refuse_capacity(moe, "each expert takes ⌈k·T/E⌉ tokens, k = model.moe.topk")
        _refuse_token_choice_losses(moe)


DIFFMOE_INFERENCE_RULES = ("threshold", "pool_topk")


@dataclass
class DiffMoEPoolOptions:
    """DiffMoE (papers.md §8b): each expert takes its top-⌊C·N/E⌋ tokens of the micro-batch's
    token pool (N tokens, C = model.moe.topk, the code's `capacity`); a capacity predictor
    trained with BCE to that choice and per-expert EMA thresholds set the tokens per expert at
    inference. model.moe.aux_loss_coeff is not used."""
    SECTION: ClassVar[str] = "model.moe.diffmoe"

    predictor_loss_coeff: float = 1.0    # BCE weight (the code's CapacityPred_loss_weight: 1 in
    #                                      its S-E16 config, 0.01 as the class default)
    ema_momentum: float = 0.95           # τ_e ← m·τ_e + (1−m)·q̄_e once per optimizer step
    inference: str = "threshold"         # threshold: σ(p_te) > τ_e per token (batch-independent)
    #                                      | pool_topk: the code's k_e passing tokens, chosen by
    #                                      gate score over the batch (batch-dependent)

    def validate(self) -> None:
        at_least(self, "predictor_loss_coeff", 0)
        in_range(self, "ema_momentum", 0, 1, high_open=True)
        one_of(self, "inference", DIFFMOE_INFERENCE_RULES)

    def in_use(self, moe) -> bool:
        return moe.router == "diffmoe"

    def validate_with(self, moe) -> None:
        _refuse_capacity(moe, "each expert takes ⌊C·N/E⌋ tokens of the pool, C = model.moe.topk")
        _refuse_token_choice_losses(moe)
        if moe.score_function != "softmax":
            fail("model.moe.score_function", "router 'diffmoe' gates with softmax")


RACE_GATINGS = ("identity", "sigmoid", "softmax")
RACE_SIMILARITY_DIVISORS = ("tokens", "tokens_experts")
RACE_SIMILARITY_OFF_DIAGONALS = ("off_diagonal", "all")


RACE_SELECTION_GROUPS = ("data-parallel", "micro-batch")   # default first


@dataclass
class RaceOptions:
    """Expert Race (papers.md §7): global top-N·k over the selection group's tokens × experts,
    EMA threshold for evaluation, router-similarity loss. model.moe.aux_loss_coeff is not
    used."""
    SECTION: ClassVar[str] = "model.moe.race"

    selection_group: str = "data-parallel"  # the paper's batch-wide race (micro-batch m of
    #                                         every DP rank) | micro-batch (independent of DP)
    gating: str = "identity"             # the paper's choice: raw logits
    ema_momentum: float = 0.95           # τ_ema momentum per optimizer step [unverified: 0.95
    #                                      in one reimplementation, 0.99 in the other]
    similarity_loss_coeff: float = 1e-5  # weight of L_sim [unverified: reimplementation default]
    similarity_divisor: str = "tokens"   # L_sim ÷ N (T11) | ÷ N·E; uncertain (papers.md §16.6)
    similarity_off_diagonal: str = "off_diagonal"  # W_ij normaliser: Σ_{k≠l} M'_kl | Σ_all M'
    plr_coeff: float = 0.0               # per-layer regularisation head weight (0: off; the
    #                                      paper's weight was not retrieved [unverified])

    def validate(self) -> None:
        one_of(self, "selection_group", RACE_SELECTION_GROUPS)
        one_of(self, "gating", RACE_GATINGS)
        at_least(self, "plr_coeff", 0)
        in_range(self, "ema_momentum", 0, 1, high_open=True)
        at_least(self, "similarity_loss_coeff", 0)
        one_of(self, "similarity_divisor", RACE_SIMILARITY_DIVISORS)
        one_of(self, "similarity_off_diagonal", RACE_SIMILARITY_OFF_DIAGONALS)

    def in_use(self, moe) -> bool:
        return moe.router == "race"

    def validate_with(self, moe) -> None:
        _refuse_capacity(moe, "the race budget is N·k, k = model.moe.topk")
        _refuse_token_choice_losses(moe)


VMOE_PRIORITIES = ("none", "max", "sum")


@dataclass
class VMoEOptions:
    """V-MoE routing (papers.md §4), also LIMoE's routing: noisy top-k, capacity per
    micro-batch with top-1-before-top-2 buffer order, Batch Prioritized Routing, importance and
    load losses. model.moe.aux_loss_coeff is not used."""
    SECTION: ClassVar[str] = "model.moe.vmoe"

    noise_std: float = 1.0               # σ = noise_std / E, training only
    capacity_ratio: float | None = 1.05  # C (training); None: dropless (causal)
    eval_capacity_ratio: float | None = None  # C in eval mode; None: capacity_ratio
    capacity_multiple_of: int = 4        # capacity rounded up to a multiple of this
    priority: str = "none"               # BPR: none | max (top-1 gate, the code's) | sum (top-k)
    importance_loss_coeff: float = 0.005
    load_loss_coeff: float = 0.005
    noise_seed: int = 0                  # noise = f(noise_seed, step, layer, global position)

    def validate(self) -> None:
        at_least(self, "noise_std", 0)
        greater_than(self, "capacity_ratio", 0)
        greater_than(self, "eval_capacity_ratio", 0)
        at_least(self, "capacity_multiple_of", 1)
        one_of(self, "priority", VMOE_PRIORITIES)
        at_least(self, "importance_loss_coeff", 0)
        at_least(self, "load_loss_coeff", 0)
        at_least(self, "noise_seed", 0)

    def in_use(self, moe) -> bool:
        return moe.router in ("vmoe", "limoe")

    def validate_with(self, moe) -> None:
        _refuse_capacity(moe, "V-MoE's capacity is model.moe.vmoe.capacity_ratio")
        _refuse_token_choice_losses(moe)
        if self.priority != "none" and self.capacity_ratio is None \
                and self.eval_capacity_ratio is None:
            fail("model.moe.vmoe.priority", "batch prioritized routing only matters with a "
                 "capacity: set model.moe.vmoe.capacity_ratio, or priority none")


@dataclass
class LIMoEOptions:
    """LIMoE entropy losses (papers.md §5), one entry per modality m = 0..M−1 (the lists'
    length). The paper's coefficients and τ were not retrieved [unverified]: the defaults
    (0.01 each, no threshold) are placeholders to tune; the paper thresholds text's global loss
    at τ = log(number of experts it should use)."""
    SECTION: ClassVar[str] = "model.moe.limoe"

    local_coeff: list[float] = field(default_factory=lambda: [0.01, 0.01])
    global_coeff: list[float] = field(default_factory=lambda: [0.01, 0.01])
    global_threshold: list[float | None] = field(default_factory=lambda: [None, None])  # τ

    def validate(self) -> None:
        n = len(self.local_coeff)
        if n == 0:
            fail("model.moe.limoe.local_coeff", "needs one coefficient per modality")
        for name in ("global_coeff", "global_threshold"):
            if len(getattr(self, name)) != n:
                fail(f"model.moe.limoe.{name}", f"needs {n} entries (one per modality, as "
                     f"model.moe.limoe.local_coeff), got {len(getattr(self, name))}")
        for name in ("local_coeff", "global_coeff", "global_threshold"):
            for i, value in enumerate(getattr(self, name)):
                if value is not None and not value >= 0:
                    fail(f"model.moe.limoe.{name}[{i}]", f"must be >= 0, got {value!r}")

    def in_use(self, moe) -> bool:
        return moe.router == "limoe"


MODALITY_MODES = ("vlmo", "pools")


@dataclass
class ModalityOptions:
    """Modality experts (papers.md §10 VLMo, §11 Uni-MoE). vlmo: modality m → expert m, and
    in the top `vl_ffn_layers` layers every token → the VL expert (index num_modalities).
    pools: modality m → top-k inside its pool of `pool_sizes[m]` consecutive experts
    ([]: num_experts split evenly), softmax over the k selected logits."""
    SECTION: ClassVar[str] = "model.moe.modality"

    mode: str = "vlmo"
    num_modalities: int = 2
    vl_ffn_layers: int = 0               # vlmo: VLMo-Base uses the top 2 of 12, Large 3 of 24
    pool_sizes: list[int] = field(default_factory=list)

    def validate(self) -> None:
        one_of(self, "mode", MODALITY_MODES)
        at_least(self, "num_modalities", 1)
        at_least(self, "vl_ffn_layers", 0)
        for i, size in enumerate(self.pool_sizes):
            if not size >= 1:
                fail(f"model.moe.modality.pool_sizes[{i}]", f"must be >= 1, got {size!r}")

    def in_use(self, moe) -> bool:
        return moe.router == "modality"

    def validate_with(self, moe) -> None:
        _refuse_capacity(moe, "modality routing drops nothing")
        _refuse_token_choice_losses(moe)
        E, M = moe.num_experts, self.num_modalities
        if self.mode == "vlmo":
            used = M + (1 if self.vl_ffn_layers else 0)
            if E < used:
                fail("model.moe.num_experts", f"router 'modality' (vlmo) needs {M} modality "
                     f"experts{' + 1 VL expert' if self.vl_ffn_layers else ''} = {used}, got {E}")
            return
        sizes = self.pool_sizes
        if sizes and len(sizes) != M:
            fail("model.moe.modality.pool_sizes", f"needs {M} entries (num_modalities), "
                 f"got {len(sizes)}")
        if sizes and sum(sizes) != E:
            fail("model.moe.modality.pool_sizes", f"must add up to model.moe.num_experts "
                 f"({E}), got {sum(sizes)}")
        if not sizes and E % M:
            fail("model.moe.modality.pool_sizes", f"unset splits model.moe.num_experts ({E}) "
                 f"evenly over {M} modalities: not divisible; give the sizes")
        smallest = min(sizes) if sizes else E // M
        if moe.topk == 1:
            fail("model.moe.topk", "router 'modality' (pools) weights the k selected experts "
                 "by a softmax over their logits: with k = 1 the weight is always 1 and the "
                 "router gets no gradient; use k >= 2 (Uni-MoE: 2)")
        if moe.topk > smallest:
            fail("model.moe.topk", f"{moe.topk} > the smallest modality pool ({smallest})")
