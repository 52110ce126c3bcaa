"""Per-recursion LoRA (Relaxed Recursive Transformers, papers.md §2) under parallel layouts:
loss, step-1 gradients and parameters after 3 SGD steps match the single-process reference
(DESIGN.md tolerances), adapters round-trip through a checkpoint, and a recipe trains.

Model: Middle-Cycle, L = 8, N_r = 3 (2 shared layers per step), expert-choice with capacities
[1, 1/2, 1/4] (k = 16, 8, 4), LoRA rank 4. Every B starts non-zero (a global function of its
key, as in both runs), so A's gradient path — the TP reductions of lora.py — is exercised from
step 1, not only after B has moved.

- TP2 + SP, dense pool, LoRA on qkv, proj, fc1 (SwiGLU halves) and fc2: column-parallel
  adapters (A replicated, `sequence_parallel` gradient sum; B sharded) and row-parallel ones
  (A sharded, partial A x reduce-scattered; B replicated, `sequence_parallel`).
- TP2 without SP (same model): the rank-R activation is copied into / all-reduced over the TP
  region instead; no adapter gradient needs a TP sum.
- EP2, MoE FFNs in every layer, LoRA on qkv and proj.
Negative controls: one adapter's A perturbed on one rank (EP2); under TP2 + SP the
`sequence_parallel` marks taken off the adapters, so Megatron no longer sums their gradients
over TP ranks.
"""

import os

import pytest
import torch

from megamoe.testing.parity import TINY_VOCAB, compare, parity_run, reference, tiny_config
from megamoe.testing.pool import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOR = ["model.num_layers=8", "model.mor.enabled=true", "model.mor.num_recursions=3",
       "model.mor.router=expert", "model.mor.allow_non_causal=true",
       "model.mor.aux_loss_coeff=0.01", "model.mor.capacities=[1.0,0.5,0.25]",
       "model.mor.lora_rank=4"]
TP2 = (["model.moe.num_experts=0", "model.mor.lora_targets=[qkv,proj,fc1,fc2]"],
       ["parallel.tensor=2"])
TP2_NO_SP = (TP2[0], ["parallel.tensor=2", "parallel.sequence_parallel=false"])
EP2 = (["model.mor.lora_targets=[qkv,proj]"], ["parallel.expert=2"])
CASES = {"tp2_sp_dense": TP2, "tp2_dense_no_sp": TP2_NO_SP, "ep2_moe": EP2}


@torch.no_grad()
def nonzero_B(engine, std: float = 0.05) -> None:
    """Every adapter's B from a generator seeded by its checkpoint key, sliced to this rank."""
    import zlib

    from megamoe.models.global_view import parameter_shards

    for sh in parameter_shards(engine.modules):
        if ".recursion.lora." in sh.key and sh.key.rsplit(".", 1)[-1].startswith("B"):
            g = torch.Generator().manual_seed(zlib.crc32(sh.key.encode()))
            full = torch.randn(sh.global_shape, generator=g) * std
            index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, sh.local_shape))
            sh.data.copy_(full[index].reshape(sh.data.shape))


@torch.no_grad()
def perturb_adapter(engine) -> None:
    """Negative control: adapter (1, 0) qkv's A changed on the last rank only."""
    import torch.distributed as dist

    from megamoe.mor.decoder import mor_decoders

    if dist.get_rank() == dist.get_world_size() - 1:
        A = mor_decoders(engine.modules)[0].recursion.lora[1][0]["qkv"].A
        A.add_(torch.randn(A.shape, generator=torch.Generator().manual_seed(9)) * 1e-2)


def no_tp_sum(engine) -> None:
    """Negative control: Megatron stops summing the adapters' gradients over TP ranks."""
    from megamoe.mor.decoder import mor_decoders

    for p in mor_decoders(engine.modules)[0].recursion.lora.parameters():
        if getattr(p, "sequence_parallel", False):
            p.sequence_parallel = False


CONTROLS = {"perturb": perturb_adapter, "no_tp_sum": no_tp_sum}


def lora_task(overrides=(), steps: int = 3, reference_dp=None, control: str | None = None):
    import torch.distributed as dist

    def prepare(engine):
        nonzero_B(engine)
        if control:
            CONTROLS[control](engine)
        return True

    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg = tiny_config([f"parallel.world_size={world}", *overrides])
    result = parity_run(cfg, TINY_VOCAB, steps=steps, reference_dp=reference_dp, perturb=prepare)
    return result if (not dist.is_initialized() or dist.get_rank() == 0) else None


def _run(name, control=None):
    model, layout = CASES[name]
    overrides = MOR + model
    ref = reference(overrides, dp=2, task=lora_task)
    got = run_distributed(lora_task, 2, overrides + layout, control=control)[0]
    return ref, got, compare(ref, got)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(CASES))
def test_lora_layout_matches_single_process(name):
    ref, got, problems = _run(name)
    assert not problems, "\n".join(problems[:20])
    lora_grads = {k: v for k, v in got.grads.items() if ".recursion.lora." in k}
    targets = {k.split(".")[-2] for k in lora_grads}
    assert targets == set(CASES[name][0][-1].split("[")[1].rstrip("]").split(","))
    # A's gradient is non-zero from step 1 (B ≠ 0), and both factors moved
    assert all(v.abs().max() > 0 for v in lora_grads.values())
    assert len(lora_grads) == 3 * 2 * len(targets) * 2        # (r, j) × targets × {A, B}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,control", [("ep2_moe", "perturb"), ("tp2_sp_dense", "no_tp_sum")])
def test_lora_negative_control(name, control):
    _, _, problems = _run(name, control)
    assert any(".recursion.lora." in p for p in problems), problems[:5]


@pytest.mark.timeout(300)
def test_adapters_round_trip_through_a_checkpoint(tmp_path):
    from megamoe.testing.checkpointing import save_then_load

    overrides = MOR + list(TP2[0]) + list(TP2[1])
    out = run_distributed(save_then_load, 2, overrides, str(tmp_path), overrides)[0]
    assert out["differ"] == [], out["differ"]
    lora = [k for k in out["keys"] if ".recursion.lora." in k]
    assert len(lora) == 3 * 2 * 4 * 2 and "decoder.recursion.lora.2.1.fc1.B" in lora


@pytest.mark.timeout(600)
def test_recipe_with_lora_trains(tmp_path):
    from megamoe.testing.recipes import train_recipe

    summary, records = run_distributed(
        train_recipe, 2, os.path.join(ROOT, "configs", "mor_expert.yaml"),
        ["model.mor.lora_rank=8", "model.seq_length=32", "train.micro_batch_size=4",
         "train.global_batch_size=8", "train.steps=25", "train.warmup_steps=3",
         "train.eval_iters=0", "train.resume=none", "run.tensorboard=false",
         "run.log_interval=1000"], str(tmp_path))[0]
    losses = [r["loss"] for r in records]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], losses
    assert min(losses) > summary["entropy_rate"]
