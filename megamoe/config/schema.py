"""The typed config: one dataclass per YAML section, each validating its own fields.

Checks that involve two sections (TP vs heads, batch vs data-parallel size) live in
`megamoe.config.checks`, run with the other concerns' by `megamoe.models.checks.check_config`.
Field names follow Megatron where it has one (`num_query_groups`, `kv_channels`,
`capacity_factor`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from megamoe.config.errors import at_least, fail, greater_than, in_range, one_of
from megamoe.config.moe_families import (
    DiffMoEOptions,
    DiffMoEPoolOptions,
    DiTMoEOptions,
    ExpertChoiceOptions,
    MoEEOptions,
    RaceOptions,
    SoftMoEOptions,
    LIMoEOptions,
    ModalityOptions,
    VMoEOptions,
    validate_families,
)
from megamoe.config.audio import AudioOptions
from megamoe.config.diffusion import DiTOptions
from megamoe.config.fp8 import FP8Options
from megamoe.config.mor import MoRConfig
from megamoe.config.vision import (SCENES_MAX_SHAPES, SHAPES_MAX_CLASSES, SHAPES_MIN_IMAGE_SIZE,
                                   ViTOptions)
from megamoe.config.vlm import VLMOptions

# model families (`model.family`): the one list; megamoe.models registers a record for each
MODEL_FAMILIES = ("lm", "vit", "vlm", "dit")
# router families; megamoe.moe.routers.ROUTERS implements them
KNOWN_ROUTERS = ("topk", "moee", "dit_moe", "soft", "diff_moe", "expert_choice", "race",
                 "vmoe", "limoe", "modality", "diffmoe")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
AUX_LOSS_TYPES = ("switch", "sequence", "global")
DROP_POLICIES = ("probs", "position")
TOKEN_DISPATCHERS = ("alltoall", "allgather")
LR_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("auto", "fp32", "bf16")
ENGINES = ("megatron", "deepspeed")
ZERO_STAGES = (1, 2)
DATA_KINDS = ("markov", "indexed", "shapes", "scenes", "sounds", "clips", "energon")
PACKABLE_KINDS = ("scenes", "energon")   # data.packing: the vlm family's sample formats
PACKED_ATTENTION = ("mask", "thd")   # data.packed_attention: megamoe.blocks.packed
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# expert back ends; megamoe.specs.gpt_moe picks the module
EXPERT_BACKENDS = ("auto", "sequential", "grouped")
# Megatron's selective modules that megamoe's layers have (no grouped GEMM, no MLA)
RECOMPUTE_MODULES = ("core_attn", "moe", "shared_experts", "mlp", "layernorm")
# the layers' two norms (megamoe.blocks.norms): plain, or CogVideoX's expert adaptive norm
MODALITY_NORMS = ("none", "expert_adaln")


@dataclass
class RunConfig:
    SECTION: ClassVar[str] = "run"

    name: str = "quickstart"
    dir: str | None = None           # None: runs/<name>-<YYYYmmdd-HHMMSS>, see resolve_run_dir()
    seed: int = 1234
    log_interval: int = 1
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            fail("run.name", f"must be a non-empty name without '/', got {self.name!r}")
        at_least(self, "seed", 0)
        at_least(self, "log_interval", 1)


@dataclass
class MoEConfig:
    SECTION: ClassVar[str] = "model.moe"

    num_experts: int = 4             # 0: dense model
    topk: int = 2
    layer_freq: int | list[int] = 1  # N: layer i is MoE iff i % N == 0; list: 0/1 per layer
    ffn_hidden_size: int = 128       # per expert
    router: str = "topk"
    score_function: str = "softmax"
    renormalize: bool = True         # the k > 1 weights sum to 1 (softmax: = top-k before softmax)
    aux_loss_coeff: float = 0.01
    aux_loss_type: str = "switch"    # Switch loss per micro-batch | per sequence | global batch
    loss_free_bias_rate: float = 0.0  # DeepSeek loss-free balancing: bias step u (0: off)
    z_loss_coeff: float = 0.0
    capacity_factor: float | None = None   # None: dropless
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    token_dispatcher: str = "alltoall"
    experts: str = "auto"            # sequential: Megatron's loop over experts; grouped: one
                                     # torch._grouped_mm per projection; auto: the device's
                                     # measured choice (megamoe.moe.experts.choice)
    shared_expert_ffn_hidden_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False
    allow_non_causal: bool = False
    moee: MoEEOptions = field(default_factory=MoEEOptions)
    dit_moe: DiTMoEOptions = field(default_factory=DiTMoEOptions)
    soft: SoftMoEOptions = field(default_factory=SoftMoEOptions)
    diff_moe: DiffMoEOptions = field(default_factory=DiffMoEOptions)
    expert_choice: ExpertChoiceOptions = field(default_factory=ExpertChoiceOptions)
    race: RaceOptions = field(default_factory=RaceOptions)
    diffmoe: DiffMoEPoolOptions = field(default_factory=DiffMoEPoolOptions)
    vmoe: VMoEOptions = field(default_factory=VMoEOptions)
    limoe: LIMoEOptions = field(default_factory=LIMoEOptions)
    modality: ModalityOptions = field(default_factory=ModalityOptions)
    fp8: FP8Options = field(default_factory=FP8Options)   # FP8 experts (megamoe.config.fp8)

    def validate(self) -> None:
        at_least(self, "num_experts", 0)
        if self.num_experts > 0:
            at_least(self, "topk", 1)
            if self.topk > self.num_experts:
                fail("model.moe.topk",
                     f"{self.topk} > model.moe.num_experts ({self.num_experts})")
        self._validate_layer_freq()
        at_least(self, "ffn_hidden_size", 1)
        at_least(self, "shared_expert_ffn_hidden_size", 0)
        one_of(self, "router", KNOWN_ROUTERS)
        one_of(self, "score_function", SCORE_FUNCTIONS)
        one_of(self, "aux_loss_type", AUX_LOSS_TYPES)
        at_least(self, "loss_free_bias_rate", 0)
        one_of(self, "drop_policy", DROP_POLICIES)
        one_of(self, "token_dispatcher", TOKEN_DISPATCHERS)
        one_of(self, "experts", EXPERT_BACKENDS)
        at_least(self, "aux_loss_coeff", 0)
        at_least(self, "z_loss_coeff", 0)
        greater_than(self, "capacity_factor", 0)
        if self.pad_to_capacity and self.capacity_factor is None:
            fail("model.moe.pad_to_capacity", "needs model.moe.capacity_factor (dropless "
                 "experts have no capacity to pad to)")
        if self.shared_expert_gate and not self.shared_expert_ffn_hidden_size:
            fail("model.moe.shared_expert_gate",
                 "needs model.moe.shared_expert_ffn_hidden_size > 0")
        validate_families(self)

    def _validate_layer_freq(self) -> None:
        if isinstance(self.layer_freq, int):
            at_least(self, "layer_freq", 1)
        elif any(x not in (0, 1) for x in self.layer_freq):
            fail("model.moe.layer_freq", f"a list must hold only 0 and 1, got {self.layer_freq}")


@dataclass
class ModelConfig:
    SECTION: ClassVar[str] = "model"

    family: str = "lm"               # what is built and trained: lm (decoder-only language model),
                                     # vit (image classifier, model.vit), vlm (image + text:
                                     # encoder, connector, MoE LM; model.vlm), dit
                                     # (class-conditional diffusion transformer; model.dit)
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 128       # dense FFN (layers that are not MoE)
    num_attention_heads: int = 4
    num_query_groups: int | None = None   # None: num_attention_heads (MHA)
    kv_channels: int | None = None        # None: hidden_size // num_attention_heads
    vocab_size: int | None = None         # None: taken from the data (tokenizer)
    make_vocab_size_divisible_by: int = 128   # embedding rows padded to a multiple of this × TP
    seq_length: int = 64
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    qk_layernorm: bool = False
    add_qkv_bias: bool = False
    modality_norm: str = "none"     # expert_adaln: per-modality modulation of both layer norms
    num_modalities: int = 2         # M of modality_norm (modality ids 0..M-1 in the batches)
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    recompute_granularity: str | None = None  # activation recompute: null (off), full, selective
    recompute_method: str = "uniform"   # full: uniform (groups of N layers) or block (first N)
    recompute_num_layers: int = 1       # full: N, layers per group (uniform) or per stage (block)
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])  # selective
    moe: MoEConfig = field(default_factory=MoEConfig)
    mor: MoRConfig = field(default_factory=MoRConfig)   # Mixture-of-Recursions, off by default
    vit: ViTOptions = field(default_factory=ViTOptions)  # family vit: patches, pooling, head
    vlm: VLMOptions = field(default_factory=VLMOptions)  # family vlm: encoder, connector
    dit: DiTOptions = field(default_factory=DiTOptions)  # family dit: patches, objective, EMA

    def validate(self) -> None:
        one_of(self, "family", MODEL_FAMILIES)
        one_of(self, "modality_norm", MODALITY_NORMS)
        at_least(self, "num_modalities", 1)
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "vocab_size",
                     "make_vocab_size_divisible_by"):
            at_least(self, name, 1)
        at_least(self, "seq_length", 2)
        for name in ("rotary_base", "norm_epsilon", "init_method_std"):
            greater_than(self, name, 0)
        groups = self.num_query_groups
        if groups is not None and self.num_attention_heads % groups:
            fail("model.num_query_groups", f"model.num_attention_heads "
                 f"({self.num_attention_heads}) is not divisible by {groups}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            fail("model.hidden_size", f"{self.hidden_size} is not divisible by "
                 f"model.num_attention_heads ({self.num_attention_heads}); set model.kv_channels")
        self.validate_recompute()
        self.moe.validate()
        self.mor.validate()
        if self.family in ("vit", "vlm"):
            self.vit.validate()
        if self.family == "vlm":
            self.vlm.validate()
        if self.family == "dit":
            self.dit.validate()
        freq = self.moe.layer_freq
        if isinstance(freq, list) and len(freq) != self.num_layers:
            fail("model.moe.layer_freq", f"has {len(freq)} entries, "
                 f"model.num_layers is {self.num_layers}")
        bad = [k for k in self.moe.fp8.keep_high_precision_layers
               if not -self.num_layers <= k < self.num_layers]
        if bad:
            fail("model.moe.fp8.keep_high_precision_layers", f"{bad} outside the "
                 f"{self.num_layers} layers (0..{self.num_layers - 1}, or negative from the end)")


    def validate_recompute(self) -> None:
        if self.recompute_granularity is not None:
            one_of(self, "recompute_granularity", RECOMPUTE_GRANULARITIES)
        one_of(self, "recompute_method", RECOMPUTE_METHODS)
        at_least(self, "recompute_num_layers", 1)
        unknown = [m for m in self.recompute_modules if m not in RECOMPUTE_MODULES]
        if unknown or not self.recompute_modules:
            fail("model.recompute_modules", f"{unknown or 'empty'}: choose from "
                 f"{list(RECOMPUTE_MODULES)}")
        if (self.recompute_granularity == "selective" and "layernorm" in self.recompute_modules
                and self.modality_norm != "none"):
            # Megatron re-runs the norm in backward, outside the context's scope
            fail("model.recompute_modules", "'layernorm' cannot be recomputed with "
                 f"model.modality_norm '{self.modality_norm}' (it reads the batch's modality "
                 "ids); drop it or use full recompute")


@dataclass
class ParallelConfig:
    SECTION: ClassVar[str] = "parallel"

    world_size: int = 1              # ranks; spawned locally when not under a launcher
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    expert: int = 1
    expert_tensor: int | None = None      # None: same as tensor
    sequence_parallel: bool | None = None  # None: on when tensor > 1
    distributed_optimizer: bool = False
    # vlm: the vision encoder's own TP (its grid on the first pipeline stage; its DP follows:
    # tensor x data / vision_tensor). None: the encoder shares the LM's TP and DP.
    vision_tensor: int | None = None

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)

    @property
    def vision_tensor_size(self) -> int:
        return self.tensor if self.vision_tensor is None else self.vision_tensor

    @property
    def vision_data(self) -> int:
        """The encoder's data-parallel size: the first stage's ranks over its TP."""
        return self.tensor * self.data // self.vision_tensor_size

    @property
    def expert_tensor_size(self) -> int:
        return self.tensor if self.expert_tensor is None else self.expert_tensor

    @property
    def expert_data(self) -> int:
        return self.world_size // (self.expert_tensor_size * self.expert * self.pipeline)

    def validate(self) -> None:
        for name in ("world_size", "tensor", "pipeline", "expert", "expert_tensor",
                     "virtual_pipeline", "vision_tensor"):
            at_least(self, name, 1)
        if self.virtual_pipeline is not None and self.pipeline == 1:
            fail("parallel.virtual_pipeline", "needs parallel.pipeline > 1")
        self._validate_grid("parallel.tensor * parallel.pipeline",
                            self.tensor * self.pipeline, "data-parallel")
        etp = "parallel.expert_tensor" + (" (= tensor)" if self.expert_tensor is None else "")
        self._validate_grid(f"{etp} * parallel.expert * parallel.pipeline",
                            self.expert_tensor_size * self.expert * self.pipeline,
                            "expert-data-parallel")

    def _validate_grid(self, product: str, size: int, rest: str) -> None:
        """Both grids tile the ranks: attention TP×DP×PP and MoE ETP×EP×EDP×PP."""
        if self.world_size % size:
            fail("parallel.world_size", f"{self.world_size} is not divisible by {product} = "
                 f"{size} (the {rest} size must be a whole number >= 1)")


@dataclass
class TrainConfig:
    SECTION: ClassVar[str] = "train"

    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    lr_schedule: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    optimizer: str = "adamw"
    clip_grad: float = 1.0           # 0: off
    eval_interval: int = 50          # 0: validate only at the end (if eval_iters > 0)
    eval_iters: int = 4
    save_interval: int = 0           # 0: only the final checkpoint
    async_save: bool = False         # write interval checkpoints in the background
    exit_interval: int = 0           # save and exit when the step is a multiple (0: never)
    keep_last: int = 3               # complete checkpoints kept (older ones are deleted); 0: all
    resume: str = "auto"             # auto: newest complete checkpoint of run.dir, if any;
                                     # none: start fresh; or a checkpoint root / step directory
    reset_schedule: bool = False     # on a resume with more train.steps than the checkpoint's
                                     # schedule: decay again from lr (else: min_lr stays)
    precision: str = "auto"          # auto: bf16 on GPU, fp32 on CPU
    deterministic: bool = True
    engine: str = "megatron"         # megatron | deepspeed (ZeRO; TP = PP = 1)
    zero_stage: int = 1              # train.engine=deepspeed: ZeRO stage 1 or 2

    def validate(self) -> None:
        for name in ("steps", "micro_batch_size", "global_batch_size"):
            at_least(self, name, 1)
        greater_than(self, "lr", 0)
        at_least(self, "min_lr", 0)
        if self.min_lr > self.lr:
            fail("train.min_lr", f"{self.min_lr} > train.lr ({self.lr})")
        at_least(self, "warmup_steps", 0)
        if self.warmup_steps > self.steps:
            fail("train.warmup_steps", f"{self.warmup_steps} > train.steps ({self.steps})")
        for name in ("adam_beta1", "adam_beta2"):
            in_range(self, name, 0, 1, high_open=True)
        greater_than(self, "adam_eps", 0)
        for name in ("weight_decay", "clip_grad", "eval_interval", "eval_iters",
                     "save_interval", "keep_last", "exit_interval"):
            at_least(self, name, 0)
        one_of(self, "lr_schedule", LR_SCHEDULES)
        one_of(self, "optimizer", OPTIMIZERS)
        one_of(self, "precision", PRECISIONS)
        one_of(self, "engine", ENGINES)
        if self.zero_stage not in ZERO_STAGES:
            fail("train.zero_stage", f"must be 1 or 2 (ZeRO-3 is not supported), got "
                 f"{self.zero_stage!r}")
        if not self.resume:
            fail("train.resume", "must be 'auto', 'none' or a checkpoint path")


@dataclass
class DataConfig:
    SECTION: ClassVar[str] = "data"

    kind: str = "markov"
    path: str | None = None          # indexed: dataset prefix without .bin/.idx; energon: folder
    tokenizer: str | None = None     # sentencepiece .model (indexed)
    valid_fraction: float = 0.05
    markov_vocab_size: int = 64
    markov_branching: int = 4        # successors per state
    markov_seed: int = 7
    synthetic_modalities: int = 0    # M > 0: modality id of a token = token id mod M
    synthetic_timesteps: bool = False  # per-sample timestep embedding from the tokens
    image_size: int = 32             # shapes: square RGB images of this side (energon: resized to)
    num_classes: int = 12            # shapes: classes (shape kind x colour, at most 24)
    shapes_seed: int = 0             # shapes, scenes, sounds: a sample = f(seed, index)
    max_shapes: int = 3              # scenes: 1 … max_shapes shapes per image (one per 2x2 cell)
    caption_fraction: float = 0.25   # scenes: share of captions; the rest are questions
    num_frames: int = 4              # clips: frames T per clip (direction needs >= 2)
    # vlm: several samples per sequence, each attending only within itself, positions
    # restarting per sample (megamoe.data.pack, megamoe.blocks.packed)
    packing: bool = False
    # scenes + packing: each k consecutive samples of a micro-batch form one sequence (a fixed
    # k keeps a micro-batch a function of consumed samples); train.micro_batch_size counts
    # samples and must be a multiple of k
    pack_samples: int = 2
    packed_attention: str = "mask"   # mask: block-diagonal causal mask | thd: TE (not built)
    strict: bool = False             # energon: a bad sample or shard stops all ranks (else skipped)
    num_workers: int = 0             # energon: loader worker processes per DP rank (0: in-process)
    shuffle_buffer: int = 100        # energon: samples shuffled together (0: shard order only)
    audio: AudioOptions = field(default_factory=AudioOptions)   # sounds (megamoe.config.audio)

    def validate(self) -> None:
        one_of(self, "kind", DATA_KINDS)
        at_least(self, "synthetic_modalities", 0)
        if self.kind == "indexed" and not self.path:
            fail("data.path", "required when data.kind is 'indexed' (dataset prefix without "
                 ".bin/.idx)")
        if self.kind == "energon" and not self.path:
            fail("data.path", "required when data.kind is 'energon' (a prepared dataset folder: "
                 "tools/preprocess_data.py --kind image-text)")
        at_least(self, "num_workers", 0)
        at_least(self, "shuffle_buffer", 0)
        in_range(self, "valid_fraction", 0, 0.5, low_open=True)
        at_least(self, "markov_vocab_size", 2)
        at_least(self, "markov_branching", 1)
        if self.markov_branching > self.markov_vocab_size:
            fail("data.markov_branching", f"{self.markov_branching} > data.markov_vocab_size "
                 f"({self.markov_vocab_size})")
        at_least(self, "markov_seed", 0)
        at_least(self, "image_size", SHAPES_MIN_IMAGE_SIZE)
        in_range(self, "num_classes", 2, SHAPES_MAX_CLASSES)
        at_least(self, "shapes_seed", 0)
        in_range(self, "max_shapes", 1, SCENES_MAX_SHAPES)
        in_range(self, "caption_fraction", 0, 1)
        at_least(self, "num_frames", 2)
        at_least(self, "pack_samples", 1)
        one_of(self, "packed_attention", PACKED_ATTENTION)
        if self.packing and self.kind not in PACKABLE_KINDS:
            fail("data.packing", f"packs image+text samples (data.kind "
                 f"{' | '.join(PACKABLE_KINDS)}), got data.kind {self.kind!r}")
        self.audio.validate()


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
