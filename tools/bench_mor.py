#!/usr/bin/env python
"""Forward+backward time of the Mixture-of-Recursions block (papers.md §1.4) with real compute
skipping, against the same block running every token at every depth.

One pool of shared dense `TransformerLayer`s and one depth router; two `RecursionBlock`s over
them (the same weights): "block" keeps the router's tokens per step (expert-choice
C = (N_r − r + 1)/N_r, i.e. 1, 2/3, 1/3 for N_r = 3; token-choice: the router's depths), "all
depths" keeps every token at every step (expert-choice C = 1, 1, 1; token-choice: a loss-free
bias that sends every token to depth N_r). They run interleaved (A, B, A, B, …) after warm-up
and the medians are compared side by side, next to the FLOP model's prediction
(megamoe.mor.accounting.predicted_block_ratio, §1.8: linear ∝ k_r, attention ∝ k_r²). The
measured ratio also pays what the model does not count: routing, top-k, gather/scatter, masks.
The last output line is JSON: {"bench": "mor_block", "ratio": block ms / all-depths ms,
"predicted_ratio": …, …}. The issue's target is a ratio in [0.5, 0.8]; the tool measures it,
it does not assert it.

Generation (§1.7): a whole MoR language model (Middle-Cycle, the same shared-layer shapes, an
untrained router in inference mode) generates `--gen-requests` sequences of lengths drawn around
`--gen-len` from a one-token prompt, with continuous depth-wise batching and with sequence-wise
batching (megamoe.mor.generate), `--gen-batch` tokens per block call, runs interleaved; it
prints tokens/s of both, their ratio and the mean batch of the shared block's calls, and checks
that both produced the same tokens. `--gen-requests 0` skips it.

examples:
  OMP_NUM_THREADS=1 python tools/bench_mor.py
  python tools/bench_mor.py --router token --iters 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Shapes: S sequence, B batch, D hidden, d rotary dim.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="hidden size D (default 256)")
    p.add_argument("--ffn", type=int, default=None,
                   help="FFN size of the shared (SwiGLU) layers (default 4·D)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--seq", type=int, default=512, help="sequence length S (default 512)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch size B (default 2)")
    p.add_argument("--recursions", type=int, default=3, help="recursion steps N_r (default 3)")
    p.add_argument("--layers-per-step", type=int, default=1,
                   help="shared layers applied at each recursion step (default 1)")
    p.add_argument("--router", choices=("expert", "token"), default="expert",
                   help="depth router (default expert: C_r = (N_r − r + 1)/N_r)")
    p.add_argument("--iters", type=int, default=20,
                   help="timed iterations per block; the median is reported (default 20)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed iterations per block before timing (default 3)")
    p.add_argument("--gen-requests", type=int, default=32,
                   help="sequences generated per policy; 0 skips generation (default 32)")
    p.add_argument("--gen-len", type=int, default=64,
                   help="mean generated length, ~Normal(mean, mean/4), ≥ 2 (default 64)")
    p.add_argument("--gen-batch", type=int, default=8,
                   help="tokens per batched call of the shared block (default 8)")
    p.add_argument("--gen-repeats", type=int, default=3,
                   help="timed generation runs per policy; the median is reported (default 3)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when visible, else CPU (default auto)")
    args = p.parse_args(argv)
    args.ffn = args.ffn or 4 * args.hidden
    least = dict.fromkeys(("hidden", "ffn", "heads", "seq", "batch", "recursions",
                           "layers_per_step", "iters", "gen_batch", "gen_repeats"), 1)
    least.update(warmup=0, gen_requests=0, gen_len=2)
    for flag, low in least.items():
        if getattr(args, flag) < low:
            p.error(f"--{flag.replace('_', '-')} must be ≥ {low}")
    if args.hidden % args.heads:
        p.error(f"--heads {args.heads} must divide --hidden {args.hidden}")
    return args


def build_blocks(args, pg, device):
    """(block, all-depths block, rope [S,1,1,d]) over one shared pool and one router's weights."""
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megamoe.config import load_config
    from megamoe.models.lm.model import transformer_config
    from megamoe.moe.routers import router_builder
    from megamoe.mor.block import RecursionBlock, build_shared_layers
    from megamoe.mor.expert_choice import ExpertChoiceDepthRouter, capacity_schedule
    from megamoe.mor.token_choice import TokenChoiceDepthRouter
    from megamoe.parallel import ParallelDims

    R, per_step = args.recursions, args.layers_per_step
    cfg = load_config(None, [
        "parallel.world_size=1", f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={args.ffn}", f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.heads}", f"model.seq_length={args.seq}",
        f"model.num_layers={per_step * R}", "model.moe.num_experts=0"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tc = transformer_config(cfg, ParallelDims.from_config(cfg.parallel), sequence_parallel=False,
                            dtype=dtype)
    layers = build_shared_layers(tc, list(range(1, per_step + 1)), set(), pg, qk_layernorm=False,
                                 router=router_builder(cfg.model.moe), shared_expert=False)
    D, steps = args.hidden, [tuple(range(per_step))] * R
    if args.router == "expert":
        routers = [ExpertChoiceDepthRouter(D, R, capacities=capacity_schedule(R)),
                   ExpertChoiceDepthRouter(D, R, capacities=[1.0] * R)]
    else:
        routers = [TokenChoiceDepthRouter(D, R, balancing="loss_free") for _ in range(2)]
        routers[1].router_bias[-1] = 10.0          # selection only: every token to depth N_r
        routers[1].bias_rate = 0.0
    routers[1].load_state_dict(routers[0].state_dict() | {
        k: v for k, v in routers[1].state_dict().items() if k == "router_bias"})
    blocks = [RecursionBlock(layers, steps, r.to(dtype)).to(device).train() for r in routers]
    rope = RotaryEmbedding(tc.kv_channels, rotary_percent=1.0, rotary_base=10000,
                           use_cpu_initialization=True)(args.seq).to(device)
    return blocks[0], blocks[1], rope


def matmul_parameters(block) -> int:
    """P of one pass through a recursion step's shared layers: their 2-D weights."""
    return sum(p.numel() for idx in block.steps[0]
               for p in block.layers[idx].parameters() if p.dim() == 2)


def kept_per_step(block) -> list[float]:
    """Kept tokens per sequence at each step in the block's last forward (its `last_stats`)."""
    s, R = block.last_stats, len(block.steps)
    if "step_0_kept_fraction" in s:
        fracs = [s[f"step_{r}_kept_fraction"] for r in range(R)]
    else:                   # token-choice: step r runs the tokens of depth ≥ r
        fracs = [sum(s[f"depth_{i}_fraction"] for i in range(r, R)) for r in range(R)]
    return fracs


def _time_ms(block, x_SBD, rope, device) -> float:
    import torch

    x_SBD = x_SBD.clone().requires_grad_()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out_SBD = block(x_SBD, rope)
    (out_SBD.float().sum() + block.last_aux_loss).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def bench(args, pg, device) -> dict:
    import torch

    from megamoe.mor.accounting import predicted_block_ratio
    from megamoe.mor.expert_choice import capacity_schedule, tokens_kept

    block, full, rope = build_blocks(args, pg, device)
    dtype = next(block.parameters()).dtype
    g = torch.Generator().manual_seed(1234)
    x_SBD = torch.randn(args.seq, args.batch, args.hidden, generator=g).to(device, dtype)
    times = {"block": [], "all_depths": []}
    for i in range(args.warmup + args.iters):
        for name, b in (("block", block), ("all_depths", full)):     # A, B, A, B, …
            ms = _time_ms(b, x_SBD, rope, device)
            if i >= args.warmup:
                times[name].append(ms)
    med = {name: statistics.median(t) for name, t in times.items()}
    R, S = args.recursions, args.seq
    # the FLOP model's k_r: expert-choice max(1, int(C_r·S)); token-choice perfect balance
    nominal = ([tokens_kept(c, S) for c in capacity_schedule(R)] if args.router == "expert"
               else [(R - r) / R * S for r in range(R)])
    P, width = matmul_parameters(block), args.hidden
    return {"block_ms": med["block"], "all_depths_ms": med["all_depths"],
            "ratio": med["block"] / med["all_depths"],
            "predicted_ratio": predicted_block_ratio(P, width, S, nominal),
            "kept_nominal": nominal, "matmul_params": P,
            "kept_measured": [round(f * S, 2) for f in kept_per_step(block)],
            "kept_all_depths": [round(f * S, 2) for f in kept_per_step(full)]}


GEN_VOCAB = 256


def build_lm_for_generation(args, device):
    """A Middle-Cycle MoR GPTModel with the block's shapes (dense), in eval mode."""
    import torch

    from megamoe.config import load_config
    from megamoe.engines.megatron import build_engine

    max_len = 1 + 2 * args.gen_len + 1
    cfg = load_config(None, [
        "parallel.world_size=1", f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={args.ffn}", f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.heads}", f"model.seq_length={max_len}",
        f"model.num_layers={2 + args.layers_per_step * args.recursions}",
        "model.moe.num_experts=0", "model.mor.enabled=true",
        f"model.mor.num_recursions={args.recursions}", f"model.mor.router={args.router}",
        "model.mor.allow_non_causal=true",
        "train.precision=" + ("bf16" if device.type == "cuda" else "fp32")])
    model = build_engine(cfg, GEN_VOCAB, device, with_optimizer=False, ddp=False).modules[0]
    return model.eval(), max_len


def bench_generation(args, device) -> dict | None:
    """Tokens/s of continuous depth-wise vs sequence-wise batching, same model and requests."""
    import torch

    from megamoe.mor.generate import MoRGenerator, Request

    if not args.gen_requests:
        return None
    model, max_len = build_lm_for_generation(args, device)
    g = torch.Generator().manual_seed(4321)
    lengths = (torch.randn(args.gen_requests, generator=g) * args.gen_len / 4 + args.gen_len)
    lengths = lengths.round().clamp(2, 2 * args.gen_len).long().tolist()
    reqs = [Request([int(torch.randint(GEN_VOCAB, (1,), generator=g))], n) for n in lengths]
    gen = MoRGenerator(model, max_len=max_len, slots=len(reqs))
    gen.generate(reqs[:2], max_batch=args.gen_batch)                      # warm-up
    runs = {"depth": [], "sequence": []}
    outs = {}
    for _ in range(args.gen_repeats):
        for policy in runs:                                               # A, B, A, B, …
            out, st = gen.generate(reqs, max_batch=args.gen_batch, policy=policy)
            runs[policy].append(st)
            outs[policy] = [r.tokens for r in out]
    med = {p: statistics.median(s.tokens_per_s for s in st) for p, st in runs.items()}
    last = {p: st[-1] for p, st in runs.items()}
    depths = [d for r in out for d in r.depths]
    return {"depth_tokens_per_s": med["depth"], "sequence_tokens_per_s": med["sequence"],
            "ratio": med["depth"] / med["sequence"],
            "depth_mean_block_batch": last["depth"].mean_block_batch,
            "sequence_mean_block_batch": last["sequence"].mean_block_batch,
            "depth_block_calls": last["depth"].block_calls,
            "sequence_block_calls": last["sequence"].block_calls,
            "generated_tokens": last["depth"].generated_tokens,
            "mean_steps_per_token": sum(depths) / len(depths),
            "same_tokens": outs["depth"] == outs["sequence"],
            "requests": len(reqs), "max_batch": args.gen_batch, "repeats": args.gen_repeats}


def report(args, res: dict, device, threads: int) -> None:
    R = args.recursions
    print(f"MoR recursion block forward+backward: {args.router}-choice, N_r={R}, "
          f"{args.layers_per_step} shared layer(s)/step, S={args.seq}, B={args.batch}, "
          f"D={args.hidden}, ffn={args.ffn}, heads={args.heads}, {device.type}, "
          f"{threads} thread(s); median of {args.iters} interleaved iterations after "
          f"{args.warmup} warm-up")
    kept = lambda ks: "/".join(f"{k:.0f}" for k in ks)        # noqa: E731
    print(f"{'variant':12} {'kept k_r per sequence':>22} {'ms':>10}")
    print(f"{'block':12} {kept(res['kept_measured']):>22} {res['block_ms']:10.2f}")
    print(f"{'all depths':12} {kept(res['kept_all_depths']):>22} {res['all_depths_ms']:10.2f}")
    print(f"ratio block / all depths: measured {res['ratio']:.3f}, predicted "
          f"{res['predicted_ratio']:.3f} (FLOP model, k_r = {kept(res['kept_nominal'])}: "
          f"linear ∝ k_r, attention ∝ k_r²)")
    gen = res.get("generation")
    if gen is None:
        print("generation: skipped (--gen-requests 0)")
    else:
        print(f"generation, {gen['requests']} sequences ({gen['generated_tokens']} tokens, "
              f"{gen['mean_steps_per_token']:.2f} recursion steps per token), ≤ "
              f"{gen['max_batch']} tokens per block call, median of {gen['repeats']}:")
        print(f"{'batching':12} {'tokens/s':>10} {'block calls':>12} {'mean batch':>11}")
        for p in ("depth", "sequence"):
            print(f"{p + '-wise':12} {gen[p + '_tokens_per_s']:10.1f} "
                  f"{gen[p + '_block_calls']:12d} {gen[p + '_mean_block_batch']:11.2f}")
        print(f"ratio depth-wise / sequence-wise tokens/s: {gen['ratio']:.3f}; same tokens: "
              f"{'yes' if gen['same_tokens'] else 'NO'}")
    print(json.dumps({
        "bench": "mor_block", "ratio": res["ratio"], "predicted_ratio": res["predicted_ratio"],
        "block_ms": res["block_ms"], "all_depths_ms": res["all_depths_ms"],
        "router": args.router, "num_recursions": R, "layers_per_step": args.layers_per_step,
        "kept_nominal": res["kept_nominal"], "kept_measured": res["kept_measured"],
        "kept_all_depths": res["kept_all_depths"],
        "seq": args.seq, "batch": args.batch, "hidden": args.hidden, "ffn": args.ffn,
        "heads": args.heads, "matmul_params": res["matmul_params"], "iters": args.iters,
        "device": device.type, "threads": threads,
        "generation_tokens_per_s": None if gen is None else {
            "depth": gen["depth_tokens_per_s"], "sequence": gen["sequence_tokens_per_s"]},
        "generation_ratio": None if gen is None else gen["ratio"],
        "generation": gen,
    }), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device != "auto":
        os.environ["MEGAMOE_DEVICE"] = args.device
    import torch

    from megamoe.launch.env import RankInfo, init_distributed
    from megamoe.launch.spawn import free_port
    from megamoe.parallel import ParallelDims, destroy_groups, init_groups, seed_rng
    from megamoe.platform.bridge import quiet_megatron_warnings

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    quiet_megatron_warnings()
    # init_distributed applies the CPU bridge on CPU, before any Megatron module is built.
    device = init_distributed(RankInfo(0, 1, 0, "bench"), "127.0.0.1", free_port())
    pg = init_groups(ParallelDims(world_size=1))
    seed_rng(1234)
    res = bench(args, pg, device)
    res["generation"] = bench_generation(args, device)
    report(args, res, device, torch.get_num_threads())
    destroy_groups()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
