"""Checks that span sections: parallel degrees against model shapes, batch sizes and the
pipeline schedule. Pure reads of a loaded config, before any process group exists; run by
`megamoe.models.checks.check_config` with the other concerns' checks.
"""

from __future__ import annotations

from megamoe.config.errors import fail
from megamoe.config.fp8 import check_fp8_layout
from megamoe.config.schema import Config
from megamoe.config.validate import num_microbatches, sequence_length, sequence_parallel_enabled


def check_experts(cfg: Config) -> None:
    experts, ep = cfg.model.moe.num_experts, cfg.parallel.expert
    if ep > 1 and experts == 0:
        fail("parallel.expert", f"{ep} > 1 but model.moe.num_experts is 0 (dense model)")
    if experts % ep:
        fail("model.moe.num_experts", f"{experts} is not divisible by parallel.expert ({ep})")


def check_tensor_split(cfg: Config) -> None:
    """Column/row-parallel linears split heads, query groups and FFN widths across TP ranks;
    experts split their FFN across expert-TP ranks."""
    m, tp, etp = cfg.model, cfg.parallel.tensor, cfg.parallel.expert_tensor_size
    splits = [
        ("model.num_attention_heads", m.num_attention_heads, "parallel.tensor", tp),
        ("model.num_query_groups", m.num_query_groups, "parallel.tensor", tp),
        ("model.ffn_hidden_size", m.ffn_hidden_size, "parallel.tensor", tp),
    ]
    if m.moe.num_experts > 0:
        splits.append(("model.moe.ffn_hidden_size", m.moe.ffn_hidden_size,
                       "parallel.expert_tensor", etp))
        splits.append(("model.moe.shared_expert_ffn_hidden_size",
                       m.moe.shared_expert_ffn_hidden_size, "parallel.tensor", tp))
    for name, size, degree_name, degree in splits:
        if size is not None and size % degree:
            fail(name, f"{size} is not divisible by {degree_name} ({degree})")


def check_batch(cfg: Config) -> None:
    t, dp = cfg.train, cfg.parallel.data
    if t.global_batch_size % (t.micro_batch_size * dp):
        fail("train.global_batch_size", f"{t.global_batch_size} is not divisible by "
             f"train.micro_batch_size * data-parallel size = {t.micro_batch_size} * {dp}")


def check_vision_grid(cfg: Config) -> None:
    """`parallel.vision_tensor`: the vlm encoder's own TP on the first stage, whose DP is then
    the first stage's ranks over it. Supported: 1 (a replicated encoder) or the LM's TP (the
    shared grid): the encoder's gradients fold their replicas into the LM's TP groups, and the
    gradient norm counts a replicated parameter once per LM TP group."""
    p, t = cfg.parallel, cfg.train
    if p.vision_tensor is None:
        return
    if cfg.model.family != "vlm":
        fail("parallel.vision_tensor", f"only the vlm family has a vision encoder (model.family "
             f"is {cfg.model.family!r})")
    if cfg.train.engine != "megatron":
        fail("parallel.vision_tensor", "the encoder's own grid needs the megatron engine "
             "(its gradient reduction hooks into Megatron's)")
    if p.vision_tensor not in (1, p.tensor):
        fail("parallel.vision_tensor", f"{p.vision_tensor}: must be 1 or parallel.tensor "
             f"({p.tensor})")
    if (t.micro_batch_size * p.data) % p.vision_data:
        fail("train.micro_batch_size", f"the first stage's micro-batch (micro_batch_size * "
             f"data = {t.micro_batch_size} * {p.data}) is not divisible by the vision "
             f"encoder's data-parallel size ({p.vision_data})")


def check_pipeline(cfg: Config) -> None:
    if cfg.model.mor.enabled:      # stages hold MoR units, not layers: mor.checks
        return
    layers, pp, vp = cfg.model.num_layers, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline
    stages = pp * (vp or 1)
    if layers % stages:
        what = "parallel.pipeline" + (" * parallel.virtual_pipeline" if vp else "")
        fail("model.num_layers", f"{layers} is not divisible by {what} ({stages})")
    n = num_microbatches(cfg)
    if vp is not None and (n < pp or n % pp):
        fail("parallel.virtual_pipeline", f"the interleaved schedule needs micro-batches per "
             f"step ({n} = train.global_batch_size / (micro_batch_size * data)) >= "
             f"parallel.pipeline ({pp}) and divisible by it")


def check_sequence_parallel(cfg: Config) -> None:
    p = cfg.parallel
    if p.sequence_parallel is False and p.tensor > 1 and cfg.model.moe.num_experts > 0:
        fail("parallel.sequence_parallel", "Megatron requires sequence parallelism with MoE and "
             f"tensor parallelism (parallel.tensor = {p.tensor}); set it true or leave it unset")
    S = sequence_length(cfg)
    if not sequence_parallel_enabled(cfg) or S % p.tensor == 0:
        return
    if cfg.model.family == "vit":
        fix = ("model.vit.pool", "pool 'gap' drops the class token") if cfg.model.vit.pool == "cls" \
            else ("model.vit.patch_size", "choose a patch size with a divisible patch count")
        fail(fix[0], f"{S} tokens per image (patches + class token) are not divisible by "
             f"parallel.tensor ({p.tensor}), which sequence parallelism shards them over; "
             f"{fix[1]}")
    if cfg.model.family == "dit":
        fail("model.dit.patch_size", f"{S} patch tokens per image are not divisible by "
             f"parallel.tensor ({p.tensor}), which sequence parallelism shards them over")
    fail("model.seq_length", f"{cfg.model.seq_length} is not divisible by parallel.tensor "
         f"({p.tensor}), which sequence parallelism shards it over")


def check_engine(cfg: Config) -> None:
    """DeepSpeed's engine gets megamoe's EP and expert-DP groups, not Megatron's TP/SP gradient
    reductions or its pipeline schedules; ZeRO shards the optimizer itself."""
    p = cfg.parallel
    if cfg.train.engine != "deepspeed":
        return
    if p.tensor > 1 or p.pipeline > 1:
        fail("train.engine", f"deepspeed runs parallel.tensor=1 and parallel.pipeline=1 only "
             f"(got parallel.tensor={p.tensor}, parallel.pipeline={p.pipeline})")
    if p.distributed_optimizer:
        fail("parallel.distributed_optimizer", "true with train.engine=deepspeed: ZeRO shards "
             "the optimizer state itself; set it false")
    if cfg.model.family != "lm":
        fail("train.engine", f"deepspeed runs model.family 'lm' only so far (got "
             f"{cfg.model.family!r}); use train.engine=megatron")


SECTION_CHECKS = (check_experts, check_tensor_split, check_batch, check_vision_grid,
                  check_pipeline, check_sequence_parallel, check_engine,
                  check_fp8_layout)     # config.fp8: blockwise tiles under expert-TP


def check_sections(cfg: Config) -> None:
    """Raise ConfigError for the first disagreement between sections; reads only."""
    for check in SECTION_CHECKS:
        check(cfg)
