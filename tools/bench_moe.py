#!/usr/bin/env python
"""Forward+backward time of megamoe's MoE layer vs Megatron-Core's own `MoELayer`.

Both layers get the same TransformerConfig, the same weights (Megatron's state dict copied into
megamoe's) and the same tokens; for each token dispatcher they run interleaved (A, B, A, B, …)
after warm-up, and the medians are compared side by side. Before timing, the outputs and input
gradients of the two layers are compared: the exit code is 1 if they differ by more than 1e-5.
The last output line is JSON: {"bench": "moe_layer", "ratio": max over dispatchers of
megamoe ms / megatron ms, "ratios": {...}, ...}. The goal is an adapter overhead of at most 5%
(ratio ≤ 1.05); the tool measures it, it does not assert it.

examples:
  OMP_NUM_THREADS=1 python tools/bench_moe.py
  python tools/bench_moe.py --world-size 2 --expert-parallel 2 --dispatchers alltoall
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DISPATCHERS = ("alltoall", "allgather")
TOLERANCE = 1e-5          # max |Δ| allowed between the two layers' outputs and input gradients

# Shapes: S sequence, B batch, D hidden.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="hidden size D (default 256)")
    p.add_argument("--ffn", type=int, default=512,
                   help="per-expert FFN size, moe_ffn_hidden_size (default 512)")
    p.add_argument("--experts", type=int, default=8, help="number of experts E (default 8)")
    p.add_argument("--topk", type=int, default=2, help="experts per token k (default 2)")
    p.add_argument("--seq", type=int, default=256, help="sequence length S (default 256)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size B (default 4)")
    p.add_argument("--iters", type=int, default=30,
                   help="timed iterations per layer; the median is reported (default 30)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed iterations per layer before timing (default 5)")
    p.add_argument("--world-size", type=int, default=1,
                   help="local ranks (gloo on CPU, NCCL on GPUs); 1 runs in this process "
                        "(default 1)")
    p.add_argument("--expert-parallel", type=int, default=1,
                   help="expert-parallel degree EP; divides --world-size and --experts "
                        "(default 1)")
    p.add_argument("--dispatchers", default=",".join(DISPATCHERS),
                   help="comma-separated token dispatchers out of alltoall, allgather "
                        "(default alltoall,allgather)")
    p.add_argument("--perturb", type=float, default=0.0,
                   help="add this to one row of megamoe's router weight after the copy: a "
                        "negative control that must make the output check fail (default 0)")
    args = p.parse_args(argv)
    for flag in ("hidden", "ffn", "experts", "topk", "seq", "batch", "iters", "world_size",
                 "expert_parallel"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be ≥ 1")
    if args.warmup < 0:
        p.error("--warmup must be ≥ 0")
    if args.topk > args.experts:
        p.error(f"--topk {args.topk} exceeds --experts {args.experts}")
    if args.world_size % args.expert_parallel or args.experts % args.expert_parallel:
        p.error(f"--expert-parallel {args.expert_parallel} must divide --world-size "
                f"{args.world_size} and --experts {args.experts}")
    args.dispatchers = [d.strip() for d in args.dispatchers.split(",") if d.strip()]
    unknown = sorted(set(args.dispatchers) - set(DISPATCHERS))
    if unknown or not args.dispatchers:
        p.error(f"--dispatchers: unknown {unknown}, choose from {', '.join(DISPATCHERS)}")
    return args


def _config(args, dispatcher: str, device):
    """One TransformerConfig for both layers; only the MoE part matters here."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    on_gpu = device.type == "cuda"
    return TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=1, ffn_hidden_size=args.ffn,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.ffn,
        moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="aux_loss",
        moe_router_dtype="fp32", moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=args.expert_parallel, calculate_per_token_loss=True,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=torch.bfloat16 if on_gpu else torch.float32, bf16=on_gpu,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        moe_permute_fusion=False, moe_router_fusion=False,
    )


def build_layers(args, dispatcher: str, pg, device):
    """(megamoe's MegamoeMoELayer, Megatron's MoELayer) with identical weights."""
    import torch
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megamoe.moe.layer import MegamoeMoELayer
    from megamoe.moe.routers.topk import TopKSoftmaxRouter

    config = _config(args, dispatcher, device)
    experts = ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    theirs = MoELayer(config, MoESubmodules(experts=experts, router=TopKRouter),
                      layer_number=1, pg_collection=pg)
    ours = MegamoeMoELayer(config, MoESubmodules(experts=experts, router=TopKSoftmaxRouter),
                           layer_number=1, pg_collection=pg)
    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    assert set(theirs_sd) == set(ours_sd), sorted(set(theirs_sd) ^ set(ours_sd))
    ours.load_state_dict(theirs_sd, strict=True)
    if args.perturb:
        with torch.no_grad():
            ours.router.weight[0].add_(args.perturb)   # one expert's logit moves: probs change
    return ours.to(device), theirs.to(device)


def _fwd_bwd(layer, x_SBD):
    """out.sum() backward; the router's aux loss rides on the graph (MoEAuxLossAutoScaler)."""
    out_SBD, _ = layer(x_SBD)
    out_SBD.float().sum().backward()
    return out_SBD


def max_abs_diff(ours, theirs, x_SBD) -> float:
    """Largest |Δ| between the two layers' outputs and input gradients on the same tokens."""
    a, b = x_SBD.clone().requires_grad_(), x_SBD.clone().requires_grad_()
    out_a, out_b = _fwd_bwd(ours, a), _fwd_bwd(theirs, b)
    d_out = (out_a.float() - out_b.float()).abs().max().item()
    d_grad = (a.grad.float() - b.grad.float()).abs().max().item()
    return max(d_out, d_grad)


def _time_ms(layer, x_SBD, device) -> float:
    import torch

    x_SBD = x_SBD.clone().requires_grad_()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _fwd_bwd(layer, x_SBD)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def bench(args, pg, device) -> dict:
    """{dispatcher: {megamoe_ms, megatron_ms, ratio, max_abs_diff}} (diff: max over ranks)."""
    import torch
    import torch.distributed as dist

    results = {}
    for dispatcher in args.dispatchers:
        ours, theirs = build_layers(args, dispatcher, pg, device)
        g = torch.Generator().manual_seed(1234 + dist.get_rank())
        x_SBD = torch.randn(args.seq, args.batch, args.hidden, generator=g)
        x_SBD = x_SBD.to(device=device, dtype=ours.config.params_dtype)

        diff = torch.tensor(max_abs_diff(ours, theirs, x_SBD), device=device)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)

        times = {"megamoe": [], "megatron": []}
        for i in range(args.warmup + args.iters):
            for name, layer in (("megamoe", ours), ("megatron", theirs)):   # A, B, A, B, …
                ms = _time_ms(layer, x_SBD, device)
                if i >= args.warmup:
                    times[name].append(ms)
        med = {name: statistics.median(t) for name, t in times.items()}
        results[dispatcher] = {"megamoe_ms": med["megamoe"], "megatron_ms": med["megatron"],
                               "ratio": med["megamoe"] / med["megatron"],
                               "max_abs_diff": diff.item()}
    return results


def report(args, results: dict, device) -> None:
    print(f"MoE layer forward+backward: T={args.seq * args.batch} tokens, D={args.hidden}, "
          f"E={args.experts}, k={args.topk}, ranks={args.world_size}, EP={args.expert_parallel}, "
          f"{device.type}; median of {args.iters} interleaved iterations after {args.warmup} "
          f"warm-up")
    print(f"{'dispatcher':12} {'megamoe ms':>11} {'megatron ms':>12} {'ratio':>7} "
          f"{'max|Δ|':>9}")
    for name, r in results.items():
        print(f"{name:12} {r['megamoe_ms']:11.3f} {r['megatron_ms']:12.3f} {r['ratio']:7.3f} "
              f"{r['max_abs_diff']:9.1e}")
    print(json.dumps({
        "bench": "moe_layer",
        "ratio": max(r["ratio"] for r in results.values()),
        "ratios": {k: r["ratio"] for k, r in results.items()},
        "megamoe_ms": {k: r["megamoe_ms"] for k, r in results.items()},
        "megatron_ms": {k: r["megatron_ms"] for k, r in results.items()},
        "max_abs_diff": {k: r["max_abs_diff"] for k, r in results.items()},
        "tokens": args.seq * args.batch, "hidden": args.hidden, "experts": args.experts,
        "topk": args.topk, "world_size": args.world_size, "device": device.type,
    }), flush=True)


def run_rank(rank: int, args, port: int) -> None:
    import torch

    from megamoe.launch.env import RankInfo, init_distributed
    from megamoe.parallel import ParallelDims, destroy_groups, init_groups, seed_rng
    from megamoe.platform.bridge import quiet_megatron_warnings

    quiet_megatron_warnings()
    if args.world_size > 1:
        torch.set_num_threads(1)
    # init_distributed applies the CPU bridge on CPU, before any Megatron module is built.
    device = init_distributed(RankInfo(rank, args.world_size, rank, "bench"), "127.0.0.1", port)
    pg = init_groups(ParallelDims(world_size=args.world_size, expert=args.expert_parallel))
    seed_rng(1234)
    results = bench(args, pg, device)
    if rank == 0:
        report(args, results, device)
    destroy_groups()
    torch.distributed.destroy_process_group()
    bad = {k: r["max_abs_diff"] for k, r in results.items() if r["max_abs_diff"] > TOLERANCE}
    if bad:
        raise SystemExit(f"megamoe and Megatron MoE layers differ beyond {TOLERANCE}: {bad}")


def _spawned(args) -> None:
    run_rank(int(os.environ["RANK"]), args, int(os.environ["MASTER_PORT"]))


def main(argv=None) -> int:
    args = parse_args(argv)
    from megamoe.launch.spawn import free_port, spawn_local

    if args.world_size == 1:
        run_rank(0, args, free_port())
        return 0
    os.environ["OMP_NUM_THREADS"] = "1"
    result = spawn_local(args.world_size, _spawned, (args,))   # torch.multiprocessing, "spawn"
    if result.failure is not None:
        print(f"rank {result.failure.rank} failed: {result.failure.message}", file=sys.stderr)
    return 1 if (result.failure is not None or result.interrupted) else 0


if __name__ == "__main__":
    raise SystemExit(main())
