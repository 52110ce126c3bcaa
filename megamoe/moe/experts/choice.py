"""`model.moe.experts: auto` (the default): the expert back end per device kind, from
tools/bench_fp8.py's measurements, resolved when the model is built (the config keeps `auto`, so
a run resumed on another device gets that device's back end; checkpoints are the same for both).

Both back ends hold the same parameters and checkpoint keys and compute the same function
(grouped = sequential within 1e-6 relative: tests/unit/test_grouped_experts.py), so the choice
is one of speed only.
"""

from __future__ import annotations

import dataclasses

# device kind -> (back end, where the figure comes from)
BY_DEVICE = {
    # tools/bench_fp8.py on the 2-core CPU host, 2026-12-04, quiet (one thread, median of 20,
    # fwd+bwd, balanced routing): at the quickstart's expert shape (T=256, D=64, F=128, E=4,
    # k=2) fp32 expert GEMMs 2.66 ms sequential vs 1.66 ms grouped (1.61x; bf16 1.71x), the
    # whole MoE layer 3.71 vs 2.77 ms (1.34x). At T=2048, D=512, F=1024, E=8 they tie: fp32
    # 0.99x, bf16 1.01x (layer 0.94x, 1.00x), because the GEMMs dominate there: sequential
    # reaches 99% (fp32) and 95% (bf16) of the bench's dense bound, the same FLOPs as one dense
    # MLP. CPU runs are quickstart-sized (a D=512 model does not train on CPU in useful time),
    # so grouped is the CPU entry; at large shapes the choice hardly matters on CPU.
    "cpu": ("grouped", "tools/bench_fp8.py on CPU: grouped 1.61x sequential at the quickstart "
                       "shape, 0.99x at D=512 (GEMM-bound there)"),
    # NOT MEASURED: no GPU was lent when this was written. Megatron's SequentialMLP stays the
    # CUDA default: it is what tests/gpu/test_gpu_smoke.py trains in fp32 and bf16, and torch
    # 2.13's shape checks of _grouped_mm (torch/_meta_registrations.py, "checks from
    # _grouped_mm_cuda()") take bf16 operands only, so fp32 runs could not use grouped.
    # tests/gpu/run_gpu_checks.sh measures both back ends on a lent GPU for this entry.
    "cuda": ("sequential", "not measured on CUDA yet: the fallback, Megatron's SequentialMLP"),
}
FALLBACK = "sequential"        # devices without an entry, and shapes grouped cannot take
_ROW_ELEMENTS = 8              # torch._grouped_mm: row strides of 16 bytes (8 bf16 elements)


def _grouped_fits(cfg) -> bool:
    """Whether every expert GEMM's row lengths suit `torch._grouped_mm` (GroupedExperts refuses
    the others, naming the field; `auto` quietly takes the sequential experts instead)."""
    m = cfg.model
    widths = [m.hidden_size, m.moe.ffn_hidden_size // cfg.parallel.expert_tensor_size]
    if m.family == "vlm":
        widths.append(m.vlm.encoder_hidden_size)
    return all(w % _ROW_ELEMENTS == 0 for w in widths)


def resolve_experts(cfg, device_type: str) -> tuple[str, str]:
    """(back end, why) that `model.moe.experts` means on `device_type` ("cpu", "cuda")."""
    experts = cfg.model.moe.experts
    if experts != "auto":
        return experts, "model.moe.experts"
    chosen, why = BY_DEVICE.get(device_type, (FALLBACK, f"no table entry for {device_type}"))
    if chosen == "grouped" and not _grouped_fits(cfg):
        return FALLBACK, (f"auto on {device_type}: widths not multiples of {_ROW_ELEMENTS}, "
                          "which torch._grouped_mm needs")
    return chosen, f"auto on {device_type}: {why}"


def with_resolved_experts(cfg, device_type: str):
    """`cfg` with `model.moe.experts` resolved for `device_type` (a copy; `cfg` if no change)."""
    chosen, _ = resolve_experts(cfg, device_type)
    moe = cfg.model.moe
    if chosen == moe.experts:
        return cfg
    model = dataclasses.replace(cfg.model, moe=dataclasses.replace(moe, experts=chosen))
    return dataclasses.replace(cfg, model=model)
