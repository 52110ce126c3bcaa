"""CogVideoX's expert adaptive norm (megamoe.blocks.norms.ModalityExpertAdaLN, papers.md §9):
hand-computed outputs of both variants (learned per-modality shift/scale; shift/scale from the
timestep embedding), each modality's parameters reach its tokens only, the sequence-parallel
slice of the context, one error per missing input or bad option, the spec hook (default none
builds the plain norm), and an lm run with it: zero-initialised modulation starts as the plain
model, then trains (finite loss), and the parameter count is the built model's."""

from types import SimpleNamespace

import pytest
import torch

from megamoe.blocks.context import Context, bind
from megamoe.blocks.norms import LayerNorm, ModalityExpertAdaLN, RMSNorm
from megamoe.config import ConfigError
from megamoe.testing.parity import tiny_config
from megamoe.testing.pool import run_distributed

ON = ["model.modality_norm=expert_adaln", "data.synthetic_modalities=2"]


def tconfig(sequence_parallel: bool = False):
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=2, num_attention_heads=1,
                            use_cpu_initialization=True)
    cfg.sequence_parallel = sequence_parallel
    return cfg


def make_norm(norm=RMSNorm, M=2, D=2, timestep_dim=None, pg_collection=None, sp=False):
    return ModalityExpertAdaLN(tconfig(sp), D, eps=1e-12, norm=norm, num_modalities=M,
                               timestep_dim=timestep_dim, pg_collection=pg_collection)


def run(norm, x_SBD, modality_BS, temb_BC=None):
    with bind(Context(modality_ids_BS=modality_BS, timestep_emb_BD=temb_BC)):
        return norm(x_SBD)


def test_learned_modulation_by_hand():
    norm = make_norm()
    with torch.no_grad():
        norm.adaln_zero_shift.copy_(torch.tensor([[0.5, 0.0], [0.0, -1.0]]))
        norm.adaln_zero_scale.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    # one sample, two tokens: RMSNorm([1, −1]) = [1, −1] (modality 0), RMSNorm([2, 2]) = [1, 1]
    # (modality 1); [1, −1]·(1 + [1, 0]) + [.5, 0] = [2.5, −1]; [1, 1]·(1 + [0, 2]) + [0, −1]
    x_SBD = torch.tensor([[[1.0, -1.0]], [[2.0, 2.0]]])
    y_SBD = run(norm, x_SBD, torch.tensor([[0, 1]]))
    assert y_SBD[:, 0].tolist() == [pytest.approx([2.5, -1.0]), pytest.approx([1.0, 2.0])]
    # the same modulation around LayerNorm: LN([3, 1]) = [1, −1] → [2.5, −1]
    ln = make_norm(norm=LayerNorm)
    ln.load_state_dict({**ln.state_dict(), "adaln_zero_shift": norm.adaln_zero_shift.detach(),
                        "adaln_zero_scale": norm.adaln_zero_scale.detach()})
    y_SBD = run(ln, torch.tensor([[[3.0, 1.0]]]), torch.tensor([[0]]))
    assert y_SBD[0, 0].tolist() == pytest.approx([2.5, -1.0], abs=1e-5)


def test_timestep_modulation_by_hand():
    norm = make_norm(timestep_dim=1)
    with torch.no_grad():   # rows [m, (shift, scale), d]: m0 shift = (1, 2)·s, m1 scale = (−1, 0)·s
        norm.adaln_zero_weight.copy_(torch.tensor([[1.0], [2.0], [0.0], [0.0],
                                                   [0.0], [0.0], [-1.0], [0.0]]))
        norm.adaln_zero_bias.fill_(0.1)
    # two samples of one token: s = SiLU(t), t = 2 → 1.761594, t = −1 → −0.268941
    # sample 0 (modality 0): [1, −1]·1.1 + (s0 + .1, 2·s0 + .1) = [2.961594, 2.523188]
    # sample 1 (modality 1): [1, 1]·(1.1 − s1, 1.1) + .1 = [1.468941, 1.2]
    x_SBD = torch.tensor([[[1.0, -1.0], [2.0, 2.0]]])
    y_SBD = run(norm, x_SBD, torch.tensor([[0], [1]]), torch.tensor([[2.0], [-1.0]]))
    assert y_SBD[0].tolist() == [pytest.approx([2.961594, 2.523188], abs=1e-5),
                                 pytest.approx([1.468941, 1.2], abs=1e-5)]


@pytest.mark.parametrize("timestep_dim", [None, 3])
def test_each_modality_modulates_its_own_tokens_only(timestep_dim):
    g = torch.Generator().manual_seed(0)
    norm = make_norm(M=3, D=4, timestep_dim=timestep_dim)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x_SBD = torch.randn(6, 2, 4, generator=g)
    modality_BS = torch.tensor([[0, 1, 2, 1, 0, 2], [2, 2, 1, 0, 1, 0]])
    temb_BC = torch.randn(2, 3, generator=g) if timestep_dim else None
    before_SBD = run(norm, x_SBD, modality_BS, temb_BC)
    with torch.no_grad():        # change modality 1's parameters only
        if timestep_dim:
            norm.adaln_zero_weight.view(3, 2, 4, 3)[1] += 0.5
        else:
            norm.adaln_zero_scale[1] += 0.5
    after_SBD = run(norm, x_SBD, modality_BS, temb_BC)
    changed_SB = (after_SBD - before_SBD).abs().amax(-1) > 1e-6
    assert torch.equal(changed_SB, modality_BS.T == 1)


def test_sequence_parallel_rank_reads_its_slice_of_the_context():
    g = torch.Generator().manual_seed(1)
    full = make_norm(M=3, D=4, timestep_dim=None)
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x_SBD = torch.randn(6, 2, 4, generator=g)
    modality_BS = torch.randint(0, 3, (2, 6), generator=g)
    want_SBD = run(full, x_SBD, modality_BS)
    tp = SimpleNamespace(rank=lambda: 1, size=lambda: 2)
    half = make_norm(M=3, D=4, timestep_dim=None, pg_collection=SimpleNamespace(tp=tp), sp=True)
    half.load_state_dict(full.state_dict())
    assert all(p.sequence_parallel for p in half.parameters())   # grads summed over TP
    assert torch.equal(run(half, x_SBD[3:], modality_BS), want_SBD[3:])


def test_missing_inputs_are_one_error_each():
    norm, x_SBD = make_norm(), torch.ones(2, 1, 2)
    with pytest.raises(ValueError, match=r"^model.modality_norm 'expert_adaln' needs modality "
                       r"ids .*data.synthetic_modalities"):
        run(norm, x_SBD, None)
    with pytest.raises(ValueError, match="per-modality scale and shift, but the batch has a "
                       "timestep embedding"):
        run(norm, x_SBD, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
    with pytest.raises(ValueError, match="data.synthetic_timesteps"):
        run(make_norm(timestep_dim=2), x_SBD, torch.zeros(1, 2, dtype=torch.long))


def test_config_errors_name_the_field():
    tiny_config(ON)
    with pytest.raises(ConfigError, match="model.modality_norm"):
        tiny_config(["model.modality_norm=cogvideo"])
    with pytest.raises(ConfigError, match="model.num_modalities"):
        tiny_config([*ON, "data.synthetic_modalities=3"])
    with pytest.raises(ConfigError, match="model.recompute_modules"):
        tiny_config([*ON, "model.recompute_granularity=selective",
                     "model.recompute_modules=[layernorm]"])
    tiny_config([*ON, "model.recompute_granularity=full"])     # re-binds the context
    from megamoe.testing.parity import TINY_VIT

    with pytest.raises(ConfigError, match="model.modality_norm"):
        tiny_config([*TINY_VIT, "model.modality_norm=expert_adaln"])
    from megamoe.checkpoint.hf import family_for

    with pytest.raises(ValueError, match="model.modality_norm"):
        family_for(tiny_config(ON))


def test_spec_hook_wraps_both_layer_norms_and_keeps_the_final_one():
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megamoe.specs.gpt_moe import decoder_block_spec, modality_norm_options
    from megamoe.specs.vit import encoder_block_spec

    cfg = tconfig()
    plain = decoder_block_spec(cfg, [False], qk_layernorm=False, router="topk",
                               shared_expert=False, pp_rank=0)
    assert plain.layer_specs[0].submodules.input_layernorm is RMSNorm     # default: unchanged
    assert modality_norm_options(tiny_config().model) is None
    options = modality_norm_options(tiny_config(ON).model, timestep_dim=8)
    assert options == {"num_modalities": 2, "timestep_dim": 8}
    for block, norm in ((decoder_block_spec(cfg, [False], qk_layernorm=False, router="topk",
                                            shared_expert=False, pp_rank=0,
                                            modality_norm=options),
                         RMSNorm),
                        (encoder_block_spec(cfg, [False], router="topk", shared_expert=False,
                                            pp_rank=0, modality_norm=options), LayerNorm)):
        layer = block.layer_specs[0].submodules
        for spec in (layer.input_layernorm, layer.pre_mlp_layernorm):
            assert isinstance(spec, ModuleSpec) and spec.module is ModalityExpertAdaLN
            assert spec.params["norm"] is norm and spec.params["timestep_dim"] == 8
        assert block.layer_norm is norm


def lm_task(overrides, steps: int):
    """(losses, modulation gradients' max, modulation values at init and after the run,
    built − counted parameters) of a one-rank lm run."""
    from megamoe.models.registry import family_for
    from megamoe.models.vocab import padding_elements
    from megamoe.testing.parity import TINY_VOCAB, parity_run

    cfg = tiny_config(["parallel.world_size=1", *overrides])
    seen = {}

    def inspect(engine):      # parity_run's hook, called once the engine is built
        named = list(engine.modules[0].named_parameters())
        seen["at_init"] = {n: p.abs().max().item() for n, p in named if "adaln" in n}
        built = sum(p.numel() for _, p in named) - padding_elements(engine.modules)
        seen["uncounted"] = built - family_for(cfg).parameter_counts(cfg, TINY_VOCAB)[0]

    result = parity_run(cfg, TINY_VOCAB, steps=steps, perturb=inspect)
    grads = {k: v.abs().max().item() for k, v in result.grads.items() if "adaln" in k}
    trained = {k: v.abs().max().item() for k, v in result.params.items() if "adaln" in k}
    return result.losses, grads, seen["at_init"], trained, seen["uncounted"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", ["learned", "timestep"])
def test_lm_starts_as_the_plain_norm_and_trains(variant):
    extra = ["data.synthetic_timesteps=true"] if variant == "timestep" else []
    losses, grads, at_init, trained, uncounted = run_distributed(lm_task, 1, [*ON, *extra],
                                                                 2)[0]
    plain, _, none, _, _ = run_distributed(lm_task, 1, ["data.synthetic_modalities=2", *extra],
                                           1)[0]
    assert not none and len(at_init) == 2 * 4 * 2 and max(at_init.values()) == 0.0
    assert uncounted == 0                           # the family's count is the built model's
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(plain[0], rel=1e-6)    # zero modulation: the plain norm
    assert min(grads.values()) > 0                  # … that receives gradients and trains
    assert len(trained) == 2 * 2 and min(trained.values()) > 0


def weight_decay_task():
    """wd_mult of every parameter, by name, in both engines' optimizer groups."""
    from megamoe.engines.deepspeed import param_groups
    from megamoe.engines.megatron import build_engine
    from megamoe.testing.parity import TINY_VOCAB

    cfg = tiny_config(ON)
    engine = build_engine(cfg, TINY_VOCAB, torch.device("cpu"))
    names = {id(p): n for c in engine.modules for n, p in c.named_parameters()}
    megatron = {names[id(p)]: g["wd_mult"] for opt in engine.optimizer.chained_optimizers
                for g in opt.param_groups for p in g["params"]}
    deepspeed = {names[id(p)]: g["wd_mult"] for c in engine.modules
                 for g in param_groups(c, cfg, "experts") for p in g["params"]}
    return megatron, deepspeed


def test_per_modality_shift_and_scale_get_no_weight_decay_in_either_engine():
    """They are norm parameters (2-D only because of the modality axis): exempt like the norm's
    own weight; an ordinary 2-D weight keeps its decay (the rule is not "everything")."""
    megatron, deepspeed = run_distributed(weight_decay_task, 1)[0]
    assert megatron == deepspeed
    modulation = [n for n in megatron if n.endswith(("adaln_zero_shift", "adaln_zero_scale"))]
    assert modulation and all(megatron[n] == 0.0 for n in modulation)
    assert megatron["embedding.word_embeddings.weight"] == 1.0
    assert all(megatron[n] == 1.0 for n in megatron if n.endswith("linear_qkv.weight"))
