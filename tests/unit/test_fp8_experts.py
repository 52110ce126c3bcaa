"""FP8 experts in the model (`model.moe.fp8`): the same parameters and checkpoint keys as the
sequential experts plus the scaling state; outputs and gradients within FP8's error of the fp32
experts and not equal to them; grouped = sequential; chosen layers kept in high precision;
routing-map padding to 16 rows changes nothing for rowwise scales; one clear error per wrong
setting."""

import pytest
import torch

from megamoe.config import ConfigError
from megamoe.fp8 import E4M3
from megamoe.testing.parity import TINY_VOCAB, parity_run, tiny_config
from megamoe.testing.pool import run_distributed

U = E4M3.unit_roundoff


def _experts(overrides):
    from megamoe.engines.megatron import build_engine
    from megamoe.models.lm.model import moe_layers

    engine = build_engine(tiny_config(overrides), TINY_VOCAB, torch.device("cpu"),
                          with_optimizer=False, ddp=False)
    return engine, moe_layers(engine.modules)


def _run(mod, counts, x_TD, probs_T, dy_TD):
    x, p = x_TD.clone().requires_grad_(), probs_T.clone().requires_grad_()
    y, _ = mod(x, counts.clone(), p)
    y.backward(dy_TD)
    return [y.detach(), x.grad] + [w.grad.clone() for w in mod.parameters()]


def layer_task():
    """Problems found (empty = as documented) in one layer's experts, counts [5, 0, 7, 4]."""
    from megamoe.moe.experts import FP8Experts

    bad = []
    ref_engine, ref_layers = _experts(["model.moe.experts=sequential"])
    fp8_engine, fp8_layers = _experts(["model.moe.fp8.recipe=rowwise", "model.moe.experts=sequential"])
    _, grp_layers = _experts(["model.moe.fp8.recipe=rowwise", "model.moe.experts=grouped"])
    ref, fp8, grp = ref_layers[0].experts, fp8_layers[0].experts, grp_layers[0].experts
    if not (isinstance(fp8, FP8Experts) and isinstance(grp, FP8Experts) and grp.backend_args[2]):
        bad.append("module types")
    keys = lambda e: {v.key for v in e.modules[0].sharded_state_dict().values()}   # noqa: E731
    if keys(fp8_engine) - keys(ref_engine) != {
            "decoder.layers.mlp.experts.fp8_state.amax_history"} or keys(ref_engine) - keys(
            fp8_engine):
        bad.append("checkpoint keys")
    counts = torch.tensor([5, 0, 7, 4])
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(int(counts.sum()), ref.config.hidden_size, generator=g)
    probs_T = torch.rand(x_TD.shape[0], generator=g)
    dy_TD = torch.randn(x_TD.shape, generator=g)
    want, got, got_grp = (_run(m, counts, x_TD, probs_T, dy_TD) for m in (ref, fp8, grp))
    for i, (a, b, c) in enumerate(zip(want, got, got_grp)):
        rel = ((a - b).norm() / a.norm()).item() if a.norm() > 0 else None
        if rel is not None and not (U / 8 <= rel <= 4 * U):
            bad.append(f"tensor {i}: relative error {rel:.3g} vs fp32")
        if not torch.equal(b, c):
            bad.append(f"tensor {i}: grouped != sequential")
    if fp8.local_experts[1].linear_fc1.weight.grad.abs().max() != 0:
        bad.append("the empty expert got a gradient")
    if (fp8.fp8_state.amax_history[[0, 2, 3]] <= 0).any():
        bad.append("amax history not recorded")
    return bad


def test_fp8_layer_is_fp8_and_grouped_equals_sequential():
    assert run_distributed(layer_task, 1)[0] == []


def keep_task():
    from megamoe.moe.experts import FP8Experts

    _, layers = _experts(["model.moe.fp8.recipe=blockwise",
                          "model.moe.fp8.keep_high_precision_layers=[0,-1]"])
    return [isinstance(layer.experts, FP8Experts) for layer in layers]


def test_keep_high_precision_layers():
    assert run_distributed(keep_task, 1)[0] == [False, True, True, False]


def padding_task(row_multiple: int):
    """One training step of rowwise FP8 with the routing map padded to `row_multiple`: the loss,
    gradients and each expert's row counts seen in the step."""
    from megamoe.moe.experts import FP8Experts

    seen = []
    orig = FP8Experts.forward

    def spy(self, x, tokens_per_expert, probs):
        seen.append([int(c) for c in tokens_per_expert])
        return orig(self, x, tokens_per_expert, probs)

    FP8Experts.forward = spy
    try:
        r = parity_run(tiny_config(["model.moe.fp8.recipe=rowwise",
                                    f"model.moe.fp8.row_multiple={row_multiple}"]),
                       TINY_VOCAB, steps=1)
    finally:
        FP8Experts.forward = orig
    return r.losses, r.grads, seen


def test_routing_map_padding_to_16_rows_is_exact_for_rowwise():
    """Padded rows are real tokens routed with probability 0, which the FP8 experts zero: with
    per-row scales the real rows' quantisation is unchanged (the weight gradient's scales run
    along the tokens, and zero rows add nothing to their amaxes), so the step equals the
    unpadded one (1e-6)."""
    plain_loss, plain_grads, plain_seen = run_distributed(padding_task, 1, 1)[0]
    loss, grads, seen = run_distributed(padding_task, 1, 16)[0]
    assert all(c % 16 == 0 for counts in seen for c in counts)
    assert any(c % 16 for counts in plain_seen for c in counts)     # it did pad something
    assert abs(loss[0] - plain_loss[0]) <= 1e-6 * abs(plain_loss[0])
    for k, a in plain_grads.items():
        assert (grads[k] - a).abs().max() <= 1e-6 * a.abs().max() + 1e-9, k


@pytest.mark.parametrize("overrides,match", [
    (["model.moe.fp8.recipe=mxfp8"], r"^model\.moe\.fp8\.recipe: must be one of"),
    (["model.moe.fp8.recipe=rowwise", "model.moe.fp8.row_multiple=8"],
     r"^model\.moe\.fp8\.row_multiple: must be 0"),
    (["model.moe.fp8.recipe=blockwise", "model.moe.fp8.backend=scaled_grouped_mm"],
     r"^model\.moe\.fp8\.backend: scaled_grouped_mm runs the rowwise recipe only"),
    (["model.moe.fp8.recipe=rowwise", "model.moe.fp8.row_multiple=16",
      "model.moe.token_dispatcher=allgather"], r"^model\.moe\.fp8\.row_multiple: padding"),
    (["model.moe.fp8.recipe=rowwise", "model.moe.fp8.keep_high_precision_layers=[4]"],
     r"^model\.moe\.fp8\.keep_high_precision_layers: \[4\] outside"),
    (["model.moe.fp8.recipe=blockwise", "parallel.world_size=2", "parallel.tensor=2",
      "model.moe.ffn_hidden_size=128"],
     r"^model\.moe\.ffn_hidden_size: 128 / parallel\.expert_tensor \(2\) = 64 is not a "
     r"multiple of 128"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(overrides)


@pytest.mark.parametrize("backend,match", [
    ("te", r"^model\.moe\.fp8\.backend: te needs Transformer Engine"),
    ("scaled_grouped_mm", r"^model\.moe\.fp8\.backend: scaled_grouped_mm needs CUDA"),
])
def test_back_end_errors_are_one_line(backend, match):
    from megamoe.fp8.backends import resolve_backend, te_available

    if backend == "te":
        assert not te_available()       # this machine has no Transformer Engine
    with pytest.raises(ValueError, match=match) as err:
        resolve_backend(backend, "rowwise", True, cuda=False)
    assert "\n" not in str(err.value)
    assert resolve_backend("auto", "rowwise", True, cuda=False) == "scaled_mm"
    assert resolve_backend("auto", "rowwise", True, cuda=True) == "scaled_grouped_mm"
    assert resolve_backend("auto", "rowwise", True, cuda=True, grad_format="e5m2") == "scaled_mm"
    # expert-TP: only the per-expert back end, whose whole-row scales the parity test proves
    assert resolve_backend("auto", "rowwise", True, cuda=True, expert_tp=2) == "scaled_mm"
    with pytest.raises(ValueError, match=r"^model\.moe\.fp8\.backend: scaled_grouped_mm with "
                       r"expert tensor parallelism \(2\)"):
        resolve_backend("scaled_grouped_mm", "rowwise", True, cuda=True, expert_tp=2)


def test_blockwise_under_expert_tp_accepts_whole_tiles():
    """The refusal's positive side: F / expert-TP a multiple of 128 is a valid config."""
    cfg = tiny_config(["model.moe.fp8.recipe=blockwise", "parallel.world_size=2",
                       "parallel.tensor=2", "model.moe.ffn_hidden_size=256"])
    assert cfg.parallel.expert_tensor_size == 2


MOR = ["model.num_layers=8", "model.mor.enabled=true", "model.mor.num_recursions=3",
       "model.mor.router=token"]
_ENGINE = {}


def _keep_engine(engine) -> bool:
    _ENGINE["engine"] = engine
    return True


def mor_task(overrides):
    """Two MoR steps: losses, and how many of the recursion's experts are FP8 experts whose
    amax history recorded the step (the shared block runs once per recursion)."""
    from megamoe.moe.experts import FP8Experts

    r = parity_run(tiny_config(MOR + overrides), TINY_VOCAB, steps=2, perturb=_keep_engine)
    engine = _ENGINE.pop("engine")
    shared = [m for c in engine.modules for n, m in c.named_modules()
              if ".recursion." in f".{n}." and n.endswith("mlp.experts")]
    fp8 = [m for m in shared if isinstance(m, FP8Experts)
           and (m.fp8_state.amax_history[..., 0] > 0).any()]
    return r.losses, len(shared), len(fp8)


@pytest.mark.timeout(300)
def test_fp8_experts_inside_mor_recursion():
    """FP8 (rowwise) experts in the recursion's shared block: the losses stay finite and
    within 4u of fp32's, and differ from them (control: FP8 did run there)."""
    ref, n, n8 = run_distributed(mor_task, 1, [])[0]
    got, m, m8 = run_distributed(mor_task, 1, ["model.moe.fp8.recipe=rowwise"])[0]
    assert n == m > 0 and n8 == 0 and m8 == m, (n, n8, m, m8)
    assert all(abs(a - b) <= 4 * U * abs(a) for a, b in zip(ref, got)), (ref, got)
    assert ref != got
