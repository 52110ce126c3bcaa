#!/usr/bin/env python
"""Forward+backward time of the expert GEMMs and of the whole MoE layer: fp32 and bf16 with
sequential and grouped experts, and FP8 experts per recipe, side by side in one run.

One process, one thread (a rank's share of a CPU), balanced routing for the expert-GEMM timing
(the layer's own router for the layer timing); the variants run interleaved after warm-up and
the median of --iters is reported. Shapes: the quickstart's experts (D=64, F=128, E=4, k=2,
T=256 tokens) and T=2048, D=512, F=1024, E=8, k=2; on a GPU (`--device cuda`) also the
Mixtral proxy layer of Megatron's moe_perf test (`mixtral`: hidden 4096, FFN 14336, 8 experts,
top-2, 4096 tokens), whose expert-GEMM timing has forced balance (equal tokens per expert; the
layer timing routes with the layer's own router on random inputs). On CUDA the FP8 variants run
on bf16 parameters and activations (their reference is bf16), with CUDA synchronisation around
each timing, and `fp8 rowwise grouped` adds the `torch._scaled_grouped_mm` back end. A variant
the device refuses (torch._grouped_mm takes bf16 only on CUDA) is reported with its error.
Every ratio against fp32 sequential (and bf16 sequential) is printed; the last line is JSON with
grouped_speedup_fp32 and grouped_speedup_bf16 (sequential ms / grouped ms at the last shape) and
every time. A dense bound per dtype times the same GEMMs as one dense MLP over all the rows
(one expert's weights, no split into experts): sequential ms / dense-bound ms
(dense_bound_speedup_*) is the most any grouping of the expert GEMMs could gain. The CPU goal
(grouped ≥ 1.3× sequential at the larger shape) and the GPU goals (FP8 expert GEMMs ≥ 1.5×
bf16, FP8 layer ≥ 1.2× bf16) are measured, not asserted.

examples:
  python tools/bench_fp8.py
  python tools/bench_fp8.py --iters 20 --shapes large
  python tools/bench_fp8.py --device cuda --shapes mixtral     # tests/gpu/run_gpu_checks.sh
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECIPES = ("tensorwise", "delayed", "rowwise", "blockwise")
SHAPES = {"quickstart": dict(T=256, D=64, F=128, E=4, k=2),
          "large": dict(T=2048, D=512, F=1024, E=8, k=2),
          "mixtral": dict(T=4096, D=4096, F=14336, E=8, k=2)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20, help="timed iterations (median; ≥ 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--shapes", default="quickstart,large",
                   help="comma list of quickstart,large,mixtral")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where to run (cuda: one GPU)")
    args = p.parse_args(argv)
    if args.iters < 20:
        p.error("--iters must be ≥ 20 (the median of at least 20)")
    args.shapes = [s for s in args.shapes.split(",") if s]
    if not args.shapes or set(args.shapes) - set(SHAPES):
        p.error(f"--shapes: choose from {', '.join(SHAPES)}")
    return args


def variants(device: str):
    """(name, dtype, experts, fp8 recipe)."""
    import torch
    out = [("fp32 sequential", torch.float32, "sequential", "none"),
           ("fp32 grouped", torch.float32, "grouped", "none"),
           ("bf16 sequential", torch.bfloat16, "sequential", "none"),
           ("bf16 grouped", torch.bfloat16, "grouped", "none")]
    fp8_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out += [(f"fp8 {r}", fp8_dtype, "sequential", r) for r in RECIPES]
    if device == "cuda":
        out.append(("fp8 rowwise grouped", fp8_dtype, "grouped", "rowwise"))
    return out


def build_layer(shape, dtype, experts, recipe, pg, init: bool = True):
    """One MoE layer; `init=False` skips the weights' initialisation (they are loaded)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from megamoe.config.fp8 import FP8Options
    from megamoe.specs.gpt_moe import moe_spec

    config = TransformerConfig(
        num_layers=1, hidden_size=shape["D"], num_attention_heads=1, ffn_hidden_size=shape["F"],
        num_moe_experts=shape["E"], moe_router_topk=shape["k"], moe_ffn_hidden_size=shape["F"],
        moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none", moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall", add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, perform_initialization=init, params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        moe_permute_fusion=False, moe_router_fusion=False, calculate_per_token_loss=True)
    cuda = torch.cuda.is_available() and os.environ.get("MEGAMOE_DEVICE") != "cpu"
    if recipe != "none" and cuda:
        # CUDA FP8 GEMMs: each expert's rows a multiple of 16 (as megamoe.models.lm.model sets)
        config.moe_router_padding_for_quantization = True
    spec = moe_spec("topk", False, pg, experts, FP8Options(recipe=recipe))
    return build_module(spec, config=config, layer_number=1)


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd_experts(layer, x_TD, counts, probs_T):
    x = x_TD.clone().requires_grad_()
    y, _ = layer.experts(x, counts, probs_T)
    y.float().sum().backward()


def _fwd_bwd_layer(layer, x_SBD):
    x = x_SBD.clone().requires_grad_()
    y, _ = layer(x)
    y.float().sum().backward()


def _fwd_bwd_dense(w1_GD, w2_DF, x_TD, probs_T):
    """The expert GEMMs' work as one dense SwiGLU MLP over all T·k rows with one expert's
    weights: the same FLOPs and element-wise steps with no split into experts, which bounds what
    any expert back end (grouped or not) can reach on this device."""
    import torch
    import torch.nn.functional as F

    x = x_TD.clone().requires_grad_()
    glu_TF, lin_TF = torch.chunk(F.linear(x, w1_GD), 2, dim=-1)
    a_TF = F.silu(glu_TF) * lin_TF * probs_T.unsqueeze(-1)
    F.linear(a_TF, w2_DF).float().sum().backward()


def _timed(fn, device: str, *args) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn(*args)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def bench_shape(name, shape, args, pg) -> dict:
    import torch

    torch.manual_seed(0)
    dev = args.device
    T, D, E, k = shape["T"], shape["D"], shape["E"], shape["k"]
    layers, ref_sd, failed = {}, None, {}
    for vname, dtype, experts, recipe in variants(dev):
        layer = build_layer(shape, dtype, experts, recipe, pg, init=ref_sd is None).to(dev)
        if ref_sd is None:
            ref_sd = layer.state_dict()
        else:   # the same weights everywhere (FP8 adds its scaling state)
            missing, unexpected = layer.load_state_dict(ref_sd, strict=False)
            assert not unexpected and all("fp8_state" in m for m in missing), missing
        layers[vname] = (layer, dtype)
    counts = torch.full((E,), T * k // E, dtype=torch.int64)      # balanced routing
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(T * k, D, generator=g).to(dev)
    probs_T = torch.rand(T * k, generator=g).to(dev)
    x_SBD = torch.randn(T // 4, 4, D, generator=g).to(dev)
    times = {v: {"experts": [], "layer": []} for v in layers}
    expert0 = layers["fp32 sequential"][0].experts.local_experts[0]
    bound = {dtype: [w.detach().to(dtype).clone().requires_grad_() for w in
                     (expert0.linear_fc1.weight, expert0.linear_fc2.weight)]
             for dtype in dict.fromkeys(d for _, d in layers.values())}   # fp32, then bf16
    bound_times = {dtype: [] for dtype in bound}
    for i in range(args.warmup + args.iters):
        for vname, (layer, dtype) in list(layers.items()):    # interleaved: A, B, C, …, A, …
            try:
                te = _timed(_fwd_bwd_experts, dev, layer, x_TD.to(dtype), counts.clone(),
                            probs_T.to(dtype))
                tl = _timed(_fwd_bwd_layer, dev, layer, x_SBD.to(dtype))
            except (RuntimeError, ValueError, AssertionError) as exc:   # refused on this device
                failed[vname] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                del layers[vname], times[vname]
                continue
            if i >= args.warmup:
                times[vname]["experts"].append(te)
                times[vname]["layer"].append(tl)
        for dtype, (w1_GD, w2_DF) in bound.items():
            tb = _timed(_fwd_bwd_dense, dev, w1_GD, w2_DF, x_TD.to(dtype), probs_T.to(dtype))
            if i >= args.warmup:
                bound_times[dtype].append(tb)
    med = {v: {part: statistics.median(t) for part, t in d.items()} for v, d in times.items()}
    print(f"\n{name}: T={T} tokens, D={D}, F={shape['F']}, E={E}, k={k}; forward+backward, "
          f"median of {args.iters} after {args.warmup} warm-up, "
          f"{'1 thread' if dev == 'cpu' else torch.cuda.get_device_name()}")
    print(f"{'variant':18} {'experts ms':>11} {'layer ms':>9} {'vs fp32 seq':>12} "
          f"{'vs bf16 seq':>12} {'layer vs fp32':>14} {'layer vs bf16':>14}")
    nan = {"experts": float("nan"), "layer": float("nan")}
    f32, b16 = med.get("fp32 sequential", nan), med.get("bf16 sequential", nan)
    for v, m in med.items():   # ratio > 1: faster than the reference
        print(f"{v:20} {m['experts']:11.2f} {m['layer']:9.2f} "
              f"{f32['experts'] / m['experts']:12.2f} {b16['experts'] / m['experts']:12.2f} "
              f"{f32['layer'] / m['layer']:14.2f} {b16['layer'] / m['layer']:14.2f}")
    for v, why in failed.items():
        print(f"{v:20} refused on {dev}: {why}")
        med[v] = {"experts": None, "layer": None, "error": why}
    for dtype, t in bound_times.items():    # the ceiling of grouping's gain
        name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
        ms = statistics.median(t)
        seq = med.get(f"{name} sequential", nan)["experts"]
        print(f"{name + ' dense bound':20} {ms:11.2f} {'-':>9} {f32['experts'] / ms:12.2f} "
              f"{b16['experts'] / ms:12.2f}   (one dense MLP, same FLOPs: sequential reaches "
              f"{ms / seq:.0%} of it, so grouping can gain at most {seq / ms:.2f}x)")
        med[f"{name} dense bound"] = {"experts": ms, "layer": None}
    del layers
    if dev == "cuda":
        torch.cuda.empty_cache()
    return med


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megamoe.launch.env import RankInfo, init_distributed
    from megamoe.launch.spawn import free_port
    from megamoe.parallel import ParallelDims, destroy_groups, init_groups
    from megamoe.platform.bridge import quiet_megatron_warnings

    quiet_megatron_warnings()
    if args.device == "cpu":
        os.environ["MEGAMOE_DEVICE"] = "cpu"        # gloo, also on a GPU host
        # one thread (a rank's share of a CPU); set in the environment too, or init_distributed
        # would give this lone rank all the cores (megamoe.launch.env.cpu_threads)
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    init_distributed(RankInfo(0, 1, 0, "bench"), "127.0.0.1", free_port())
    pg = init_groups(ParallelDims(world_size=1))
    results = {name: bench_shape(name, SHAPES[name], args, pg) for name in args.shapes}
    destroy_groups()
    torch.distributed.destroy_process_group()
    last = results[args.shapes[-1]]

    def ratio(ref, var, part="experts"):
        a, b = last.get(ref, {}).get(part), last.get(var, {}).get(part)
        return a / b if a and b else None

    def speedup(dtype, part="experts"):
        return ratio(f"{dtype} sequential", f"{dtype} grouped", part)

    fp8 = [v for v in last if v.startswith("fp8 ")]

    print(json.dumps({
        "bench": "fp8_experts", "shape": args.shapes[-1],
        "grouped_speedup_fp32": speedup("fp32"), "grouped_speedup_bf16": speedup("bf16"),
        "dense_bound_speedup_fp32": ratio("fp32 sequential", "fp32 dense bound"),
        "dense_bound_speedup_bf16": ratio("bf16 sequential", "bf16 dense bound"),
        "grouped_layer_speedup_fp32": speedup("fp32", "layer"),
        "grouped_layer_speedup_bf16": speedup("bf16", "layer"),
        "fp8_vs_bf16_experts": {v[4:]: ratio("bf16 sequential", v) for v in fp8},
        "fp8_vs_bf16_layer": {v[4:]: ratio("bf16 sequential", v, "layer") for v in fp8},
        "ms": results, "device": args.device if args.device == "cpu" else
        torch.cuda.get_device_name(), "threads": torch.get_num_threads()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
