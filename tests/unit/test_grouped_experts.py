"""Grouped experts (`model.moe.experts=grouped`, one `torch._grouped_mm` per projection) equal
Megatron's `SequentialMLP` loop: the same forward and gradients (fp32, an expert with no tokens
included), in dropless and capacity modes, with the same parameters and checkpoint keys."""

import pytest
import torch

from megamoe.config import ConfigError
from megamoe.testing.parity import TINY_VOCAB, parity_run, tiny_config
from megamoe.testing.pool import run_distributed

RTOL = 1e-6
GROUPED = ["model.moe.experts=grouped"]
SEQUENTIAL = ["model.moe.experts=sequential"]     # the default `auto` may be either


def _close(a, b) -> bool:
    scale = max(a.abs().max().item(), 1e-30)
    return a.shape == b.shape and (a - b).abs().max().item() <= RTOL * scale


def _experts(overrides):
    from megamoe.engines.megatron import build_engine
    from megamoe.models.lm.model import moe_layers

    engine = build_engine(tiny_config(overrides), TINY_VOCAB, torch.device("cpu"),
                          with_optimizer=False, ddp=False)
    return engine, moe_layers(engine.modules)[0].experts


def layer_task(perturb: bool = False):
    """Feed both back ends the same permuted tokens (expert 1 gets none); report mismatches."""
    from megamoe.moe.experts import GroupedExperts

    seq_engine, seq = _experts(SEQUENTIAL)
    grp_engine, grp = _experts(GROUPED)
    assert isinstance(grp, GroupedExperts) and not isinstance(seq, GroupedExperts)
    bad = []
    if sorted(seq.state_dict()) != sorted(grp.state_dict()):
        bad.append("state_dict keys")
    sh_seq = {k: v.key for k, v in seq_engine.modules[0].sharded_state_dict().items()}
    sh_grp = {k: v.key for k, v in grp_engine.modules[0].sharded_state_dict().items()}
    if sh_seq != sh_grp:
        bad.append("checkpoint keys")
    for name, p in seq.named_parameters():
        if not torch.equal(p, grp.get_parameter(name)):
            bad.append(f"init {name}")
    if perturb:
        with torch.no_grad():
            grp.local_experts[2].linear_fc2.weight[0, 0] += 1e-3
    counts = torch.tensor([5, 0, 7, 4])
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(int(counts.sum()), seq.config.hidden_size, generator=g)
    probs_T = torch.rand(x_TD.shape[0], generator=g)
    dy_TD = torch.randn(x_TD.shape, generator=g)
    out = {}
    for tag, mod in (("seq", seq), ("grp", grp)):
        x, p = x_TD.clone().requires_grad_(), probs_T.clone().requires_grad_()
        y, bias = mod(x, counts.clone(), p)
        assert bias is None
        y.backward(dy_TD)
        out[tag] = [y.detach(), x.grad, p.grad] + [w.grad for w in mod.parameters()]
        if tag == "grp":
            assert float(mod.local_experts[1].linear_fc1.weight.grad.abs().max()) == 0.0
    names = ["output", "input grad", "probs grad"] + [n for n, _ in seq.named_parameters()]
    bad += [n for n, a, b in zip(names, out["seq"], out["grp"]) if not _close(a, b)]
    return bad


def model_task(overrides, perturb: bool = False):
    """One step of the whole tiny LM: loss and every gradient, sequential vs grouped."""
    from megamoe.testing.parity import perturb_one_expert

    ref = parity_run(tiny_config(overrides + SEQUENTIAL), TINY_VOCAB, steps=1)
    got = parity_run(tiny_config(overrides + GROUPED), TINY_VOCAB, steps=1,
                     perturb=perturb_one_expert if perturb else False)
    bad = [] if abs(ref.losses[0] - got.losses[0]) <= RTOL * abs(ref.losses[0]) else ["loss"]
    if set(ref.grads) != set(got.grads):
        bad.append("gradient keys")
    bad += [k for k in ref.grads if k in got.grads and not _close(ref.grads[k], got.grads[k])]
    return bad


@pytest.mark.timeout(300)
def test_grouped_layer_equals_sequential_with_an_empty_expert():
    assert run_distributed(layer_task, 1)[0] == []
    assert run_distributed(layer_task, 1, perturb=True)[0]     # negative control


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [[], ["model.moe.capacity_factor=1.0"],
                                  ["model.moe.capacity_factor=0.5",
                                   "model.moe.pad_to_capacity=true"]],
                         ids=["dropless", "capacity", "capacity_padded"])
def test_grouped_model_step_equals_sequential(mode):
    assert run_distributed(model_task, 1, mode)[0] == []
    if not mode:
        assert run_distributed(model_task, 1, mode, perturb=True)[0]   # negative control


def test_unknown_expert_back_end_is_one_config_error():
    with pytest.raises(ConfigError, match=r"^model\.moe\.experts: must be one of"):
        tiny_config(["model.moe.experts=loop"])


def backend_task(overrides):
    """The experts module class the built model holds on this (CPU) rank."""
    return type(_experts(overrides)[1]).__name__


@pytest.mark.timeout(300)
def test_auto_is_the_cpu_table_entry_and_an_explicit_choice_overrides_it():
    from megamoe.moe.experts.choice import BY_DEVICE, resolve_experts

    cfg = tiny_config([])
    assert cfg.model.moe.experts == "auto"                       # the default
    assert resolve_experts(cfg, "cpu")[0] == BY_DEVICE["cpu"][0] == "grouped"
    assert resolve_experts(cfg, "cuda")[0] == BY_DEVICE["cuda"][0]
    assert resolve_experts(cfg, "xpu")[0] == "sequential"       # no entry: the fallback
    for explicit in ("sequential", "grouped"):
        c = tiny_config([f"model.moe.experts={explicit}"])
        assert resolve_experts(c, "cpu")[0] == resolve_experts(c, "cuda")[0] == explicit
    # widths torch._grouped_mm cannot take: auto quietly keeps the sequential loop
    odd = tiny_config(["model.moe.ffn_hidden_size=44"])
    assert resolve_experts(odd, "cpu")[0] == "sequential"
    # built on CPU: auto holds the table's module, an explicit choice its own (control)
    built = {o: run_distributed(backend_task, 1, [f"model.moe.experts={o}"])[0]
             for o in ("auto", "sequential")}
    assert built == {"auto": "GroupedExperts", "sequential": "SequentialMLP"}, built


@pytest.mark.timeout(300)
def test_a_checkpoint_moves_between_back_ends(tmp_path):
    """Saved by sequential experts, loaded by auto (grouped on CPU, the test above): every
    tensor equal (the loading model starts from another seed). Control: a corrupted
    checkpoint's load fails, so the equality came from the files."""
    from megamoe.testing.checkpointing import save_then_load

    seq = ["model.moe.experts=sequential"]
    out = run_distributed(save_then_load, 1, seq, str(tmp_path / "ok"), ["model.moe.experts=auto"])[0]
    assert out["differ"] == [] and any(".experts." in k for k in out["keys"]), out
    bad = run_distributed(save_then_load, 1, seq, str(tmp_path / "bad"), GROUPED,
                          corrupt="metadata")[0]
    assert isinstance(bad, str), bad
