"""Pool tasks comparing engines (Megatron's and DeepSpeed's ZeRO) on the same model, layout and
data: per-step global loss and gradient norm, and the global parameters after the last step.

The data make the per-token normalisation matter: each sample masks a prefix of its own length
(a function of step and global sample index), so micro-batches and ranks hold different token
counts and a per-micro-batch mean would differ from the global-token mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.models.global_view import gather_global
from megamoe.testing.parity import TINY_VOCAB, ParityResult, perturb_one_expert, rank_microbatches

# AdamW at a rate where DESIGN.md's parameter bound (0.05·lr·steps) is tight; clip_grad (from
# parity.TINY, 0.5) sits below the tiny model's gradient norm, so clipping is engaged
ADAMW = ["train.optimizer=adamw", "train.lr=0.01", "train.min_lr=0.01",
         "train.weight_decay=0.1", "train.adam_beta2=0.95",
         "train.global_batch_size=16"]     # 2 micro-batches of 2 per rank at DP 4
EP2_DP2 = ["parallel.expert=2"]        # on 4 ranks: DP 4 (dense), EP 2, expert-DP 2


def uneven_masks(mbs: list, seq_length: int) -> list:
    """Mask the first (7·sample_index + 5) mod S tokens of every sample (a function of the
    global sample index: the reference and every layout see the same masks)."""
    for mb in mbs:
        for row, index in enumerate(mb["sample_index"].tolist()):
            mb["loss_mask"][row, :(7 * index + 5) % seq_length] = 0.0
    return mbs


def build(cfg, engine: str):
    if engine == "megatron":
        from megamoe.engines.megatron import build_engine
    else:
        from megamoe.engines.deepspeed import build_engine
    return build_engine(cfg, TINY_VOCAB, torch.device("cpu"))


def config(overrides, engine: str, zero_stage: int = 1):
    from megamoe.testing.parity import tiny_config

    world = dist.get_world_size()
    return tiny_config([f"parallel.world_size={world}", *ADAMW, f"train.engine={engine}",
                        f"train.zero_stage={zero_stage}", *overrides])


def train_steps(engine, first: int, last: int, result: ParityResult) -> None:
    from megamoe.training.metrics import global_loss

    t, S = engine.cfg.train, engine.cfg.model.seq_length
    dp, r = engine.pg.dp.size(), engine.pg.dp.rank()
    for step in range(first, last):
        mbs = uneven_masks(rank_microbatches(step, r, dp, t.micro_batch_size,
                                             t.global_batch_size, S, TINY_VOCAB), S)
        stats = engine.train_step(mbs)
        engine.consumed_samples += t.global_batch_size
        result.losses.append(global_loss(stats, engine.pg))
        result.grad_norms.append(stats["grad_norm"])


def engine_run(overrides, engine: str, zero_stage: int = 1, steps: int = 5,
               perturb: bool = False):
    """Train `steps` steps under `engine`; rank 0 returns the ParityResult."""
    cfg = config(overrides, engine, zero_stage)
    e = build(cfg, engine)
    if perturb:
        perturb_one_expert(e)
        if engine == "deepspeed":     # ZeRO's fp32 master partitions hold the weights it updates
            from megamoe.engines.deepspeed_state import refresh_master_params

            refresh_master_params(e)
    result = ParityResult()
    train_steps(e, 0, steps, result)
    result.params = gather_global(e.modules)
    return result if dist.get_rank() == 0 else None


def save_after(overrides, engine: str, root: str, steps: int, zero_stage: int = 1):
    """Train `steps` steps under `engine` and save (the engine-neutral checkpoint); rank 0
    returns the losses and the global parameters saved."""
    from megamoe.checkpoint.save import save_checkpoint

    e = build(config(overrides, engine, zero_stage), engine)
    result = ParityResult()
    train_steps(e, 0, steps, result)
    save_checkpoint(root, e, {})
    result.params = gather_global(e.modules)
    return result if dist.get_rank() == 0 else None


def resume_under(overrides, engine: str, root: str, start: int, steps: int,
                 zero_stage: int = 1, load_optimizer: bool = True):
    """Load the newest checkpoint of `root` under `engine` and layout (without its optimizer
    state: a control), train `steps` more."""
    from megamoe.checkpoint.load import load_checkpoint, resolve

    e = build(config(overrides, engine, zero_stage), engine)
    load_checkpoint(e, resolve(root, log=lambda *_: None), load_optimizer=load_optimizer)
    assert e.step == start, (e.step, start)
    result = ParityResult()
    train_steps(e, start, start + steps, result)
    result.params = gather_global(e.modules)
    return result if dist.get_rank() == 0 else None


def export_hf_task(src: str, out: str) -> dict:
    """One rank: `megamoe convert --to hf` of the checkpoint `src` into `out`; transformers'
    logits against megamoe's for the same checkpoint, and the global tensors it exported."""
    from megamoe.commands import convert
    from megamoe.testing.hf import (hf_logits_err, load_hf, megamoe_logits_BSV,
                                    sample_tokens_BS)

    convert.to_hf(src, out, log=lambda *_: None)
    engine = convert.load_one_rank(src, log=lambda *_: None)[0]
    tokens_BS = sample_tokens_BS(TINY_VOCAB)
    with torch.no_grad():
        ours_BSV = megamoe_logits_BSV(engine, tokens_BS)
    hf, missing = load_hf(out)
    return {"err": hf_logits_err(hf, ours_BSV, tokens_BS), "missing": missing,
            "scale": ours_BSV.abs().max().item(), "params": gather_global(engine.modules)}
