#!/usr/bin/env python
"""Forward+backward of megamoe's MoE layer vs Megatron-Core's own `MoELayer`.

Same TransformerConfig, same weights (copied), same tokens, both dispatchers; the two layers run
interleaved (A, B, A, B, …) after warm-up and the medians are compared side by side. The last
output line is JSON: {"bench": "moe_layer", "ratio": max over dispatchers of megamoe/megatron, …}.
The goal is adapter overhead ≤ 5% (ratio ≤ 1.05); the tool measures, it does not assert.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    p.add_argument("--ffn", type=int, default=512, help="per-expert FFN size (default 512)")
    p.add_argument("--experts", type=int, default=8, help="number of experts (default 8)")
    p.add_argument("--topk", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size (default 4)")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per layer (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    p.add_argument("--world-size", type=int, default=1, help="local gloo ranks (default 1)")
    p.add_argument("--expert-parallel", type=int, default=1, help="EP degree (default 1)")
    p.add_argument("--dispatchers", default="alltoall,allgather",
                   help="comma-separated token dispatchers (default alltoall,allgather)")
    return p.parse_args(argv)


def _config(args, dispatcher: str, device):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=4, ffn_hidden_size=args.ffn,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.ffn,
        moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="aux_loss",
        moe_router_dtype="fp32", moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=args.expert_parallel, add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, hidden_dropout=0.0,
        attention_dropout=0.0, calculate_per_token_loss=True, use_cpu_initialization=True,
        params_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        bf16=device.type == "cuda", gradient_accumulation_fusion=False,
        bias_activation_fusion=False, moe_permute_fusion=False, moe_router_fusion=False,
    )


def _layers(args, dispatcher, pg, device):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megamoe.moe.layer import MegamoeMoELayer
    from megamoe.moe.routers.topk import TopKSoftmaxRouter

    config = _config(args, dispatcher, device)
    experts = ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    theirs = MoELayer(config, MoESubmodules(experts=experts), layer_number=1, pg_collection=pg)
    ours = MegamoeMoELayer(config, MoESubmodules(experts=experts, router=TopKSoftmaxRouter),
                           layer_number=1, pg_collection=pg)
    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    assert set(theirs_sd) == set(ours_sd), set(theirs_sd) ^ set(ours_sd)
    ours.load_state_dict(theirs_sd)
    return ours.to(device), theirs.to(device)


def _time_once(layer, x, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, _ = layer(x)
    out.float().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def bench(args, pg, device) -> dict:
    import torch

    results = {}
    for dispatcher in args.dispatchers.split(","):
        ours, theirs = _layers(args, dispatcher, pg, device)
        g = torch.Generator().manual_seed(1234 + torch.distributed.get_rank())
        x = torch.randn(args.seq, args.batch, args.hidden, generator=g).to(device)
        x = x.to(ours.config.params_dtype)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        diff = (ours(a)[0].float() - theirs(b)[0].float()).abs().max().item()
        times = {"megamoe": [], "megatron": []}
        for i in range(args.warmup + args.iters):
            for name, layer in (("megamoe", ours), ("megatron", theirs)):
                ms = _time_once(layer, x.detach().clone().requires_grad_(), device)
                if i >= args.warmup:
                    times[name].append(ms)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[dispatcher] = {"megamoe_ms": med["megamoe"], "megatron_ms": med["megatron"],
                               "ratio": med["megamoe"] / med["megatron"], "max_abs_diff": diff}
    return results


def _rank_main(rank, args, port):
    import torch

    from megamoe.launch.env import RankInfo, init_distributed
    from megamoe.parallel import ParallelDims, init_groups, seed_rng
    from megamoe.platform.bridge import quiet_megatron_warnings

    quiet_megatron_warnings()
    if args.world_size > 1:
        torch.set_num_threads(1)
    device = init_distributed(RankInfo(rank, args.world_size, rank, "bench"), "127.0.0.1", port)
    pg = init_groups(ParallelDims(world_size=args.world_size, expert=args.expert_parallel))
    seed_rng(1234)
    results = bench(args, pg, device)
    if rank == 0:
        _report(args, results, device)
    torch.distributed.destroy_process_group()
    if any(r["max_abs_diff"] > 1e-5 for r in results.values()):
        raise SystemExit(f"outputs differ: {results}")


def _report(args, results, device) -> None:
    print(f"MoE layer fwd+bwd, T={args.seq * args.batch} tokens, H={args.hidden}, "
          f"E={args.experts}, k={args.topk}, ranks={args.world_size}, EP={args.expert_parallel}, "
          f"median of {args.iters} (interleaved, {args.warmup} warm-up)")
    print(f"{'dispatcher':12} {'megamoe ms':>11} {'megatron ms':>12} {'ratio':>7} {'max|Δout|':>10}")
    for name, r in results.items():
        print(f"{name:12} {r['megamoe_ms']:11.3f} {r['megatron_ms']:12.3f} {r['ratio']:7.3f} "
              f"{r['max_abs_diff']:10.2e}")
    print(json.dumps({
        "bench": "moe_layer", "ratio": max(r["ratio"] for r in results.values()),
        "ratios": {k: r["ratio"] for k, r in results.items()},
        "megamoe_ms": {k: r["megamoe_ms"] for k, r in results.items()},
        "megatron_ms": {k: r["megatron_ms"] for k, r in results.items()},
        "tokens": args.seq * args.batch, "hidden": args.hidden, "experts": args.experts,
        "topk": args.topk, "world_size": args.world_size, "device": device.type,
    }), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megamoe.launch.spawn import free_port, spawn_local

    port = free_port()
    if args.world_size == 1:
        _rank_main(0, args, port)
        return 0
    os.environ["OMP_NUM_THREADS"] = "1"
    failed = spawn_local(args.world_size, _spawned, (args, port))
    for rank, msg, _ in failed:
        print(f"rank {rank} failed: {msg}", file=sys.stderr)
    return 1 if failed else 0


def _spawned(args, port):
    _rank_main(int(os.environ["RANK"]), args, port)


if __name__ == "__main__":
    raise SystemExit(main())
