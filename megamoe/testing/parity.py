"""Parity of a parallel layout against the single-process reference (DESIGN.md, Conventions).

`parity_run` trains a few steps under whatever layout the config names, on the ranks of the
current process group, and returns (on every rank) the global loss per step, the global
gradients of step 1 and the global parameters after the last step. The reference is the same
function on one rank: it sees the same micro-batches (all DP ranks' micro-batches, in order), so
routing groups and auxiliary losses are those of the parallel run. `compare` applies DESIGN.md's
tolerances and returns the list of violations (empty = parity).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megamoe.models.global_view import gather_global
from megamoe.parallel import microbatches_per_step

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-8
SGD_PARAM_ATOL = 1e-6


@dataclass
class ParityResult:
    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    grads: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    # "layer N.name" (an encoder's: "encoder layer N.name") -> router buffer
    router_state: dict = field(default_factory=dict)


def synthetic_sample(step: int, index: int, seq_length: int, vocab: int) -> torch.Tensor:
    """Sample `index` of global batch `step`: a function of (step, index) only."""
    g = torch.Generator().manual_seed(10_000 * step + index + 1)
    return torch.randint(0, vocab, (seq_length + 1,), generator=g)


def microbatch(step: int, m: int, dp_rank: int, dp: int, mbs: int, seq_length: int,
               vocab: int, gbs: int = 0) -> dict:
    """Micro-batch m of DP rank r holds samples [m·mbs·dp + r·mbs, … + mbs) of the global batch
    of `step`; their `sample_index` is the global position step·gbs + that."""
    start = m * mbs * dp + dp_rank * mbs
    tokens = torch.stack([synthetic_sample(step, start + j, seq_length, vocab) for j in range(mbs)])
    first = step * gbs + start
    return {
        "sample_index": torch.arange(first, first + mbs, dtype=torch.int64),
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(mbs, seq_length),
        "position_ids": torch.arange(seq_length).expand(mbs, seq_length).contiguous(),
    }


def rank_microbatches(step, dp_rank, dp, mbs, gbs, seq_length, vocab, *, reference_dp=None):
    """This DP rank's micro-batches; with `reference_dp`, every micro-batch of a run with that
    DP size, in (m, r) order, for the single-process reference."""
    if reference_dp is not None:
        n = microbatches_per_step(gbs, mbs, reference_dp)
        return [microbatch(step, m, r, reference_dp, mbs, seq_length, vocab, gbs)
                for m in range(n) for r in range(reference_dp)]
    n = microbatches_per_step(gbs, mbs, dp)
    return [microbatch(step, m, dp_rank, dp, mbs, seq_length, vocab, gbs) for m in range(n)]


@torch.no_grad()
def perturb_one_expert(engine, scale: float = 1e-2) -> bool:
    """Negative control: change local expert 0 of the first MoE layer on the last rank only."""
    from megamoe.models.lm.model import moe_layers

    if dist.get_rank() != dist.get_world_size() - 1:
        return False
    layers = moe_layers(engine.modules)
    if not layers:
        return False
    w = layers[0].experts.local_experts[0].linear_fc1.weight
    g = torch.Generator().manual_seed(99)
    w.add_(torch.randn(w.shape, generator=g) * scale)
    return True


def image_source(cfg):
    """The training split of an image family's config (shapes, scenes)."""
    from megamoe.models.registry import family_datasets

    return family_datasets(cfg)[0]


def image_microbatches(engine, dataset, step: int, reference_dp: int | None) -> list:
    """This DP rank's micro-batches of `step` through the training loader (its order rule:
    megamoe.data.loader); with `reference_dp`, every micro-batch of a run with that DP size in
    (m, r) order, for the single-process reference."""
    from megamoe.data.loader import DataLoader

    t = engine.cfg.train
    ranks = ([(r, reference_dp) for r in range(reference_dp)] if reference_dp is not None
             else [(engine.pg.dp.rank(), engine.pg.dp.size())])
    per_rank = [DataLoader(dataset, engine.task.collate, global_batch_size=t.global_batch_size,
                           micro_batch_size=t.micro_batch_size, dp_rank=r, dp_size=d
                           ).peek(step * t.global_batch_size) for r, d in ranks]
    if reference_dp is not None and getattr(engine.task, "couples_dp_micro_batches", False):
        # a loss over the DP ranks' micro-batches m together (contrastive negatives): the
        # reference runs them as one micro-batch
        return [{k: torch.cat([mb[k] for mb in group]) for k in group[0]}
                for group in zip(*per_rank)]
    return [mb for group in zip(*per_rank) for mb in group]


def parity_run(cfg, vocab: int, steps: int = 3, reference_dp: int | None = None,
               perturb: bool = False) -> ParityResult:
    from megamoe.engines.megatron import build_engine, run_forward_backward, optimizer_step
    from megamoe.models.registry import family_datasets
    from megamoe.training.metrics import global_loss

    images = None
    if cfg.model.family != "lm":   # the data's size of what the model predicts
        images, _, vocab = family_datasets(cfg)
    engine = build_engine(cfg, vocab, torch.device("cpu"))
    if perturb:   # fp32 optimizers update the model's own tensors; a callable: own control
        (perturb if callable(perturb) else perturb_one_expert)(engine)
    dp, dp_rank = engine.pg.dp.size(), engine.pg.dp.rank()
    t, S = cfg.train, cfg.model.seq_length
    result = ParityResult()
    for step in range(steps):
        if images is not None:
            mbs = image_microbatches(engine, images, step, reference_dp)
        else:
            mbs = rank_microbatches(step, dp_rank, dp, t.micro_batch_size, t.global_batch_size,
                                    S, vocab, reference_dp=reference_dp)
        for c in engine.chunks:
            c.zero_grad_buffer()
        engine.optimizer.zero_grad()
        stats = run_forward_backward(engine, mbs)
        result.losses.append(global_loss(stats, engine.pg))
        if step == 0:
            result.grads = gather_global(engine.modules, grads=True)
        result.grad_norms.append(optimizer_step(engine)["grad_norm"])
    result.params = gather_global(engine.modules)
    result.router_state = router_buffers(engine)
    return result


def router_buffers(engine) -> dict:
    """Persistent router buffers (loss-free biases, EMA thresholds) of every layer, merged over
    the ranks (pipeline stages hold different layers; other ranks hold copies)."""
    from megamoe.models.lm.model import moe_layers
    from megamoe.moe.layer import layer_key
    from megamoe.mor.decoder import mor_decoders

    local = {}
    for layer in moe_layers(engine.modules):
        for name, buf in layer.router.state_dict().items():
            if name in dict(layer.router.named_buffers()):
                local[f"{layer_key(layer)}.{name}"] = buf.detach().clone()
    for decoder in mor_decoders(engine.modules):     # MoR depth router (loss-free bias)
        router = decoder.recursion.router
        for name, buf in router.state_dict().items():
            if name in dict(router.named_buffers()):
                local[f"mor.{name}"] = buf.detach().clone()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def compare(ref: ParityResult, got: ParityResult, *, param_atol: float = SGD_PARAM_ATOL,
            grads: bool = True) -> list:
    """Violations of DESIGN.md's tolerances (empty list = parity). `grads=False` for the
    distributed optimizer, whose reduce-scatter leaves each rank only its own shard of the
    reduced gradient (its parity is shown by losses and parameters)."""
    bad = []
    for i, (a, b) in enumerate(zip(ref.losses, got.losses)):
        if abs(a - b) > LOSS_RTOL * abs(a):
            bad.append(f"loss step {i + 1}: reference {a:.8f} vs {b:.8f}")
    for i, (a, b) in enumerate(zip(ref.grad_norms, got.grad_norms)):
        if abs(a - b) > LOSS_RTOL * abs(a):
            bad.append(f"grad norm step {i + 1}: reference {a:.8f} vs {b:.8f}")
    if set(ref.grads) != set(got.grads) or set(ref.params) != set(got.params):
        bad.append(f"different tensors: {sorted(set(ref.grads) ^ set(got.grads))}")
    for key in sorted(set(ref.grads) & set(got.grads)) if grads else []:
        a, b = ref.grads[key], got.grads[key]
        tol = GRAD_RTOL * a.abs().max().item() + GRAD_ATOL
        err = (a - b).abs().max().item()
        if a.shape != b.shape or err > tol:
            bad.append(f"grad {key}: max err {err:.3e} > {tol:.3e}")
    if set(ref.router_state) != set(got.router_state):
        bad.append(f"different router buffers: {sorted(set(ref.router_state) ^ set(got.router_state))}")
    for key in sorted(set(ref.router_state) & set(got.router_state)):
        err = (ref.router_state[key].float() - got.router_state[key].float()).abs().max().item()
        if err > SGD_PARAM_ATOL:
            bad.append(f"router buffer {key}: max err {err:.3e}")
    for key in sorted(set(ref.params) & set(got.params)):
        err = (ref.params[key] - got.params[key]).abs().max().item()
        if err > param_atol:
            bad.append(f"param {key}: max err {err:.3e} > {param_atol:.1e}")
    return bad


TINY = [
    "model.num_layers=4", "model.hidden_size=32", "model.ffn_hidden_size=64",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=16",
    "model.moe.num_experts=4", "model.moe.topk=2", "model.moe.ffn_hidden_size=48",
    "model.moe.aux_loss_coeff=0.01", "model.moe.z_loss_coeff=0.001",
    "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.optimizer=sgd", "train.lr=0.1", "train.min_lr=0.1", "train.lr_schedule=constant",
    "train.warmup_steps=0", "train.weight_decay=0.0",
    "train.clip_grad=0.5",   # below the tiny model's gradient norm: clipping is active
    "train.precision=fp32", "run.tensorboard=false", "run.progress=false",
]
TINY_VOCAB = 64


def tiny_config(overrides=()):
    """TINY + `overrides`, loaded and checked for consistency (not for a launch: layouts the CPU
    refuses and non-causal routers without the opt-in are the tests' to probe)."""
    from megamoe.config import load_config
    from megamoe.models.checks import check_config

    cfg = load_config(None, list(TINY) + list(overrides))
    check_config(cfg, launch=False)
    return cfg


def parity_task(overrides=(), steps: int = 3, reference_dp=None, perturb: bool = False):
    """Run on every rank of a pool; rank 0's result is the one compared."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg = tiny_config([f"parallel.world_size={world}", *overrides])
    result = parity_run(cfg, TINY_VOCAB, steps=steps, reference_dp=reference_dp, perturb=perturb)
    return result if (not dist.is_initialized() or dist.get_rank() == 0) else None


TINY_VIT = [
    "model.family=vit", "data.kind=shapes", "data.image_size=16", "data.num_classes=6",
    "model.vit.patch_size=4", "model.num_layers=4", "model.hidden_size=32",
    "model.ffn_hidden_size=64", "model.num_attention_heads=4", "model.moe.num_experts=4",
    "model.moe.topk=2", "model.moe.ffn_hidden_size=48", "model.moe.layer_freq=[0,1,0,1]",
    "model.moe.router=vmoe", "model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0",
    "model.moe.vmoe.capacity_ratio=0.75",
    "model.moe.vmoe.priority=max",
    # large losses so that a wrong scale or a missing rank's share shows in the gradients
    "model.moe.vmoe.importance_loss_coeff=0.5", "model.moe.vmoe.load_loss_coeff=0.5",
    "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.optimizer=sgd", "train.lr=0.1", "train.min_lr=0.1", "train.lr_schedule=constant",
    "train.warmup_steps=0", "train.weight_decay=0.0", "train.clip_grad=0.5",
    "train.precision=fp32", "run.tensorboard=false", "run.progress=false",
]


def vit_parity_task(overrides=(), steps: int = 3, reference_dp=None, perturb: bool = False):
    """`parity_task` for the vit family: TINY_VIT + `overrides` on shapes images."""
    return parity_task([*TINY_VIT, *overrides], steps, reference_dp, perturb)


TINY_VLM = [
    "model.family=vlm", "data.kind=scenes", "data.image_size=16", "data.max_shapes=2",
    "model.vit.patch_size=4", "model.vit.pool=gap",   # 16 encoder tokens: split over TP 2
    "model.vlm.pixel_shuffle=2", "model.vlm.encoder_num_layers=2",
    "model.vlm.encoder_hidden_size=32", "model.vlm.encoder_num_attention_heads=4",
    "model.vlm.encoder_ffn_hidden_size=64", "model.num_layers=2", "model.hidden_size=32",
    "model.ffn_hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.seq_length=28", "model.moe.num_experts=4", "model.moe.topk=2",
    "model.moe.ffn_hidden_size=48", "model.moe.aux_loss_coeff=0.01",
    "model.moe.z_loss_coeff=0.001",
    "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.optimizer=sgd", "train.lr=0.1", "train.min_lr=0.1", "train.lr_schedule=constant",
    "train.warmup_steps=0", "train.weight_decay=0.0", "train.clip_grad=0.5",
    "train.precision=fp32", "run.tensorboard=false", "run.progress=false",
]


def vlm_parity_task(overrides=(), steps: int = 3, reference_dp=None, perturb: bool = False):
    """`parity_task` for the vlm family: TINY_VLM + `overrides` on the generated scenes."""
    return parity_task([*TINY_VLM, *overrides], steps, reference_dp, perturb)


def perturb_encoder(engine, scale: float = 1e-2) -> bool:
    """A negative control for the encoder: its patch projection perturbed on global rank 0
    only (a replica that drifts from the others)."""
    for chunk in engine.modules:
        vision = getattr(chunk, "vision", None)
        if vision is not None and dist.get_rank() == 0:
            w = vision.embedding.proj.weight.data
            g = torch.Generator().manual_seed(98)
            w.add_(torch.randn(w.shape, generator=g) * scale)
    return True


@torch.no_grad()
def perturb_encoder_expert(engine, scale: float = 1e-2) -> bool:
    """Negative control for an encoder's MoE layers: local expert 0 of the encoder's first MoE
    layer changed on the last rank that holds the encoder only (one expert shard, or one
    replica, drifts)."""
    from megamoe.models.lm.model import moe_layers

    layers = [layer for layer in moe_layers(engine.modules) if layer.stream == "encoder"]
    holders = [None] * dist.get_world_size()
    dist.all_gather_object(holders, bool(layers))
    if dist.get_rank() != max(r for r, held in enumerate(holders) if held):
        return False
    w = layers[0].experts.local_experts[0].linear_fc1.weight
    w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(97)) * scale)
    return True


# ---- driving a parity check from a test (runs in the test process) ---------------------------

# (world size, parallel overrides, data-parallel size) of the layouts most families are checked in
EP2 = (2, ["parallel.expert=2"], 2)
EP2_TP2 = (4, ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1"], 2)

_REFERENCES: dict = {}


def reference(overrides, dp: int | None = None, task=None) -> ParityResult:
    """The single-process reference run of `overrides` (computed once per test session): one
    rank that sees every micro-batch of a run with data-parallel size `dp` (None: the config's
    own micro-batches). `task`: a module-level variant of `parity_task`."""
    from megamoe.testing.pool import run_distributed

    task = task or parity_task
    key = (task.__module__, task.__qualname__, tuple(overrides), dp)
    if key not in _REFERENCES:
        _REFERENCES[key] = run_distributed(task, 1, list(overrides), reference_dp=dp)[0]
    return _REFERENCES[key]


def check_layout(overrides, layout, ref: ParityResult, task=None, perturb=True,
                 **compare_kw) -> ParityResult:
    """Assert that `overrides` under `layout` (world, parallel overrides[, dp]) matches `ref`
    and that the negative control (`perturb`: one expert, or a function of the engine,
    perturbed on one rank) breaks the match; returns the parallel run's result."""
    from megamoe.testing.pool import run_distributed

    task = task or parity_task
    world, parallel = layout[0], list(overrides) + list(layout[1])
    got = run_distributed(task, world, parallel)[0]
    problems = compare(ref, got, **compare_kw)
    assert not problems, "\n".join(problems[:20])
    bad = run_distributed(task, world, parallel, perturb=perturb)[0]
    assert compare(ref, bad, **compare_kw), "the perturbed model went unnoticed"
    return got
