"""The vlm family's pieces: bad configs refused with one line naming the field, pixel shuffle
and the TP-split argmax check against hand-computed values, and the built model: its parameter
count equals the accounting's, the image reaches the text through the placeholders, the
decoder stays causal, and a sample whose placeholders do not match the image tokens is one
error naming the sample."""

from __future__ import annotations

import pytest
import torch

from megamoe.config import ConfigError, load_config
from megamoe.models.checks import check_config
from megamoe.models.vlm.model import argmax_is_label, pixel_shuffle
from megamoe.testing.parity import TINY_VLM
from megamoe.testing.pool import run_distributed


def _check(*overrides):
    cfg = load_config(None, [*TINY_VLM, *overrides])
    check_config(cfg, launch=False)
    return cfg


@pytest.mark.parametrize("overrides,field", [
    (["data.kind=shapes"], "data.kind:"),
    (["model.vlm.pixel_shuffle=3"], "model.vlm.pixel_shuffle:"),
    (["data.image_size=18"], "model.vit.patch_size:"),
    (["model.seq_length=5"], "model.seq_length:"),
    # MoE FFNs in the encoder: a router that routes image tokens alone, biased experts
    (["model.vlm.encoder_moe_layer_freq=2", "model.moe.router=modality",
      "model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0"], "model.moe.router:"),
    (["model.vlm.encoder_moe_layer_freq=2", "model.moe.num_experts=0"],
     "model.vlm.encoder_moe_layer_freq:"),
    (["model.vlm.encoder_moe_layer_freq=2", "model.moe.shared_expert_ffn_hidden_size=64"],
     "model.moe.shared_expert_ffn_hidden_size:"),
    (["model.vlm.encoder_moe_layer_freq=2", "parallel.world_size=2", "parallel.tensor=2",
      "parallel.expert_tensor=2"], "parallel.expert_tensor:"),
    (["model.vlm.encoder_hidden_size=30"], "model.vlm.encoder_hidden_size:"),
    (["model.vlm.encoder_moe_layer_freq=[0,1,1]"], "model.vlm.encoder_moe_layer_freq:"),
    (["train.engine=deepspeed"], "train.engine:"),
    (["model.vlm.contrastive_coeff=0.1", "parallel.world_size=2", "parallel.pipeline=2"],
     "model.vlm.contrastive_coeff:"),
    (["model.vlm.contrastive_coeff=-1"], "model.vlm.contrastive_coeff:"),
    (["parallel.world_size=2", "parallel.tensor=2", "parallel.vision_tensor=3"],
     "parallel.vision_tensor:"),
    (["parallel.world_size=4", "parallel.tensor=2", "parallel.vision_tensor=1",
      "train.micro_batch_size=1", "train.global_batch_size=8"], "train.micro_batch_size:"),
    (["model.vit.position_embedding=sincos", "model.vlm.encoder_hidden_size=30",
      "model.vlm.encoder_num_attention_heads=3"], "model.vit.position_embedding:"),
])
def test_bad_vlm_config_is_one_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        _check(*overrides)
    assert str(err.value).startswith(field), str(err.value)
    assert "\n" not in str(err.value)


def test_pixel_shuffle_hand_values():
    """A 4×4 patch grid, width 1, r = 2: token 0 is patches (0,0),(0,1),(1,0),(1,1) = 0,1,4,5;
    token 1 is the top-right block 2,3,6,7; token 2 the bottom-left block 8,9,12,13."""
    x = torch.arange(16.0).reshape(16, 1, 1)        # [N, B, E], value = patch index
    y = pixel_shuffle(x, 4, 2)
    assert y.shape == (4, 1, 4)
    assert y[0, 0].tolist() == [0, 1, 4, 5]
    assert y[1, 0].tolist() == [2, 3, 6, 7]
    assert y[2, 0].tolist() == [8, 9, 12, 13]
    assert torch.equal(pixel_shuffle(x, 4, 1), x)


def test_argmax_is_label_hand_values():
    """One process: [S=2, B=1, V=3]; ties count as correct."""
    logits = torch.tensor([[[0.1, 0.9, 0.2]], [[0.5, 0.5, -1.0]]])
    assert argmax_is_label(logits, torch.tensor([[1, 0]]), None).tolist() == [[True, True]]
    assert argmax_is_label(logits, torch.tensor([[2, 2]]), None).tolist() == [[False, False]]


def built_model_task(overrides=()):
    """(parameters built, accounting's total, |Δ answer logits| when only the image changes,
    |Δ earlier logits| when only a later token changes, the placeholder error)."""
    from megamoe.engines.megatron import build_engine
    from megamoe.models.registry import family_datasets, family_for
    from megamoe.models.vlm.model import vision_context

    cfg = _check("parallel.world_size=1", *overrides)
    train, _, vocab = family_datasets(cfg)
    engine = build_engine(cfg, vocab, torch.device("cpu"), with_optimizer=False, ddp=False)
    model, task = engine.modules[0].eval(), engine.task
    # the accounting counts the vocabulary's real rows, not the TP padding (models.vocab)
    padding = (model.vocab_size - vocab) * cfg.model.hidden_size * 2   # embedding + output
    built = sum(p.numel() for p in model.parameters()) - padding
    counted = family_for(cfg).parameter_counts(cfg, vocab)[0]
    batch = task.collate(train.get_batch([0, 1]), [0, 1])

    def logits(b):     # the real vocabulary's (padded ids are -inf)
        with torch.no_grad():
            return model(b["tokens"], b["position_ids"], None, images=b["images"],
                         context=task.context(b, 0),
                         vision_context=vision_context(b, 0, task.encoder_tokens))[..., :vocab]

    base = logits(batch)                                   # [B, S, V]
    other_image = dict(batch, images=255 - batch["images"])
    image_effect = (logits(other_image) - base)[:, -8:].abs().max().item()
    later = dict(batch, tokens=batch["tokens"].clone())
    later["tokens"][:, -1] = (later["tokens"][:, -1] + 5) % vocab
    causal_leak = (logits(later) - base)[:, :-1].abs().max().item()
    broken = dict(batch, tokens=batch["tokens"].clone())
    n_img = int((broken["tokens"][0] == 3).sum())
    broken["tokens"][0, 1 + n_img - 1] = 5                 # one placeholder fewer in sample 0
    try:
        logits(broken)
        error = None
    except ValueError as exc:
        error = str(exc)
    return built, counted, image_effect, causal_leak, error


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides", [[], ["model.modality_norm=expert_adaln"],
                                       ["model.vlm.encoder_moe_layer_freq=[0,1]"]],
                         ids=["plain", "expert_adaln", "encoder_moe"])
def test_built_model_counts_reads_the_image_and_stays_causal(overrides):
    """Also with CogVideoX's expert AdaLN in the encoder and the LM (modality ids 1 on the
    image tokens, 0 on text, from the two contexts), and with MoE FFNs in the encoder (its
    experts counted by the accounting)."""
    built, counted, image_effect, causal_leak, error = run_distributed(built_model_task, 1,
                                                                       overrides)[0]
    assert built == counted
    assert image_effect > 1e-4
    assert causal_leak == 0.0
    assert error is not None and error.startswith("sample 0: 3 image placeholder tokens, the model makes 4"), error


@pytest.mark.timeout(300)
def test_grouped_and_fp8_experts_run_in_the_language_model_and_the_encoder():
    """The LM's and the encoder's experts (MoE FFNs in both, the encoder's biased) on the
    grouped back end and in FP8 (tensorwise current scaling): the grouped GEMM equals the
    sequential loop (to float rounding), FP8's step losses stay finite and within 1% of
    fp32's (tools/fp8_loss.py measured 0.05% over 200 quickstart steps)."""
    import math

    from megamoe.testing.parity import vlm_parity_task

    encoder_moe = ["model.vlm.encoder_moe_layer_freq=[0,1]"]
    runs = {name: run_distributed(vlm_parity_task, 1, encoder_moe + overrides, steps=2)[0].losses
            for name, overrides in [("sequential", ["model.moe.experts=sequential"]),
                                    ("grouped", ["model.moe.experts=grouped"]),
                                    ("fp8", ["model.moe.fp8.recipe=tensorwise"])]}
    ref = runs["sequential"]
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref, runs["grouped"])), runs
    assert all(math.isfinite(x) for x in runs["fp8"]), runs
    assert all(abs(a - b) <= 0.01 * abs(a) for a, b in zip(ref, runs["fp8"])), runs
    assert runs["fp8"] != ref          # FP8 arithmetic did run: not bit-identical to fp32


def test_vision_grid_is_refused_outside_the_vlm_family():
    from megamoe.testing.parity import tiny_config

    with pytest.raises(ConfigError, match=r"^parallel.vision_tensor: only the vlm family"):
        tiny_config(["parallel.vision_tensor=1"])


def modality_routing_task(overrides):
    """Expert usage by modality ({modality: [E] counts}, per LM MoE layer) after one
    evaluation step of a vlm routed by modality (VLMo's experts or Uni-MoE's pools)."""
    from megamoe.commands.eval_vlm import modality_usage
    from megamoe.engines.megatron import build_engine
    from megamoe.models.registry import family_datasets

    cfg = _check("parallel.world_size=1", "model.moe.router=modality",
                 "model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0", *overrides)
    train, _, vocab = family_datasets(cfg)
    engine = build_engine(cfg, vocab, torch.device("cpu"))
    engine.eval_step([engine.task.collate(train.get_batch(list(range(4))), list(range(4)))])
    usage = modality_usage(engine)
    return {layer: {m: counts.tolist() for m, counts in rows.items()}
            for layer, rows in usage.items()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode,overrides,image_experts,text_experts", [
    ("vlmo", ["model.moe.modality.mode=vlmo", "model.moe.topk=1"], {1}, {0}),
    ("pools", ["model.moe.modality.mode=pools", "model.moe.modality.pool_sizes=[2,2]",
               "model.moe.topk=2"], {2, 3}, {0, 1}),
])
def test_modality_ids_from_the_data_route_the_language_model(mode, overrides, image_experts,
                                                             text_experts):
    """The placeholders' modality id (1) reaches the LM's routers through the context: with
    VLMo's modality experts image tokens use expert 1 only and text expert 0 only; with
    Uni-MoE's pools (text experts 0-1, image 2-3, top-2) each modality stays in its pool."""
    usage = run_distributed(modality_routing_task, 1, overrides)[0]
    assert usage and all(set(rows) == {0, 1} for rows in usage.values()), usage
    for rows in usage.values():
        assert {e for e, n in enumerate(rows[1]) if n} == image_experts, (mode, rows)
        assert {e for e, n in enumerate(rows[0]) if n} <= text_experts, (mode, rows)
        assert sum(rows[0]) > 0


def limoe_task():
    """(step loss, the routing statistics' names) after one training step of a vlm routed by
    LIMoE (dropless V-MoE routing with per-modality entropy losses)."""
    import math

    from megamoe.engines.megatron import build_engine
    from megamoe.models.lm.model import moe_layers
    from megamoe.models.registry import family_datasets

    cfg = _check("parallel.world_size=1", "model.moe.router=limoe",
                 "model.moe.vmoe.capacity_ratio=null", "model.moe.aux_loss_coeff=0",
                 "model.moe.z_loss_coeff=0")
    train, _, vocab = family_datasets(cfg)
    engine = build_engine(cfg, vocab, torch.device("cpu"))
    stats = engine.train_step([engine.task.collate(train.get_batch(list(range(4))),
                                                   list(range(4)))])
    names = {name for layer in moe_layers(engine.modules) for name in layer.stats_acc}
    return stats["loss_sum"] / stats["units"], math.isfinite(stats["grad_norm"]), names


@pytest.mark.timeout(300)
def test_limoe_entropy_losses_see_both_modalities():
    """LIMoE's per-modality entropy losses are computed for text (m0) and image (m1) tokens:
    the modality ids reach them through the context."""
    loss, finite_grad, names = run_distributed(limoe_task, 1)[0]
    assert loss > 0 and finite_grad
    want = {f"{kind}_entropy_m{m}" for kind in ("local", "global") for m in (0, 1)}
    assert want <= names, names


def test_the_placeholder_id_is_the_tokenizers():
    """The model finds image placeholders by id (megamoe.config.vlm.IMAGE_TOKEN_ID); the data
    writes the word tokenizer's "<image>"."""
    from megamoe.config.vlm import IMAGE_TOKEN_ID
    from megamoe.data.scenes import scenes_tokenizer

    tok = scenes_tokenizer()
    assert tok.image_id == IMAGE_TOKEN_ID == tok.encode("<image>")[0]


def test_encoder_layers_are_named_apart_from_the_language_models():
    """An encoder's layer N and the LM's layer N: V-MoE noise keys differ (the LM's are the
    keys of before: seed, step, layer), aux-loss tracker names and log keys differ."""
    from types import SimpleNamespace

    from megamoe.moe.layer import layer_key
    from megamoe.moe.routers.base import MegamoeRouter
    from megamoe.moe.routers.vmoe import VMoERouter

    lm, enc = (SimpleNamespace(seed=7, noise_step=torch.tensor(3), layer_number=2, stream=s)
               for s in ("", "encoder"))
    assert VMoERouter.noise_keys(lm) == (7, 3, 2)
    assert VMoERouter.noise_keys(enc)[:3] == (7, 3, 2) and len(VMoERouter.noise_keys(enc)) == 4
    assert MegamoeRouter.tracker_name(lm, "z_loss") == "z_loss"
    assert MegamoeRouter.tracker_name(enc, "z_loss") == "encoder/z_loss"
    assert (layer_key(lm), layer_key(enc)) == ("layer 2", "encoder layer 2")


def pads_routed_task(route_pads_nowhere: bool, overrides=()):
    """(tokens the LM's MoE layers routed per layer, pad tokens, all tokens, top-k) after one
    evaluation step of the tiny vlm (with a contrastive head: the caption pass's too)."""
    from megamoe.config.vlm import PAD_TOKEN_ID
    from megamoe.engines.megatron import build_engine
    from megamoe.models.lm.model import moe_layers
    from megamoe.models.registry import family_datasets
    from megamoe.models.vlm.model import VLMModel

    cfg = _check("parallel.world_size=1", *overrides)
    train, _, vocab = family_datasets(cfg)
    engine = build_engine(cfg, vocab, torch.device("cpu"))
    task = engine.task
    vlm = [m for m in engine.modules if isinstance(m, VLMModel)]
    assert vlm and all(m.routes_pads_nowhere for m in vlm)
    if not route_pads_nowhere:       # the control: the rule as it was, pads routed like text
        for m in vlm:                # (the answer pass's marks and the caption pass's)
            m.routes_pads_nowhere = False
    samples = [0, 1, 2, 8]      # sample 8's caption (one shape) is shorter: padded
    batch = task.collate(train.get_batch(samples), samples)
    layers = [layer for layer in moe_layers(engine.modules) if not layer.stream]
    for layer in layers:
        layer.tokens_per_expert_acc.zero_()
    engine.eval_step([batch])
    routed = [int(layer.tokens_per_expert_acc.sum()) for layer in layers]
    passes = [batch["tokens"]]
    if cfg.model.vlm.contrastive_coeff > 0:
        passes.append(batch["caption_tokens"])
    pads = sum(int((t == PAD_TOKEN_ID).sum()) for t in passes)
    return routed, pads, sum(t.numel() for t in passes), cfg.model.moe.topk


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides", [[], ["model.vlm.contrastive_coeff=0.1"]],
                         ids=["answers", "with_caption_pass"])
def test_the_language_models_routers_route_pads_nowhere(overrides):
    """A sample's padding (and a packed row's tail, and a caption's in the contrastive pass)
    reaches no expert: out of the experts' work, capacity, load counts and balancing losses
    (Megatron's padding_mask)."""
    routed, pads, tokens, k = run_distributed(pads_routed_task, 1, True, overrides)[0]
    assert pads > 0 and routed and all(r == (tokens - pads) * k for r in routed), \
        (routed, pads, tokens)
    # the control: without the pad marks every token is routed
    routed, pads, tokens, k = run_distributed(pads_routed_task, 1, False, overrides)[0]
    assert all(r == tokens * k for r in routed), (routed, pads, tokens)
