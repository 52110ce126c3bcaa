"""Vocabulary padding (megamoe.models.vocab): a 65-token vocabulary is padded to a multiple of
make_vocab_size_divisible_by × TP (72 = 8 × 9 on one rank, 80 under TP2: rank 1's shard ends in
15 padded rows). The padded ids take no probability mass: the loss equals cross-entropy over
the logits of the 65 real ids, under TP1 and TP2 alike; control: without the mask, the padded
logits (their output rows made non-zero) change the loss. The HF export holds exactly the
unpadded vocabulary, loads in transformers with equal logits, and imports back into a model
padded differently; a checkpoint resumes under another padding, and one of another vocabulary
is refused."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from megamoe.models.vocab import describe_vocab, padded_vocab_size
from megamoe.testing.pool import run_distributed

VOCAB = 65
PAD8 = ["model.make_vocab_size_divisible_by=8"]


def test_padded_size_is_the_next_multiple_of_divisor_times_tp():
    assert padded_vocab_size(731, 128, 2) == 768          # the README's own-data command
    assert padded_vocab_size(768, 128, 2) == 768
    assert padded_vocab_size(769, 128, 2) == 1024
    assert (padded_vocab_size(VOCAB, 8, 1), padded_vocab_size(VOCAB, 8, 2)) == (72, 80)
    assert describe_vocab(731, 768, 128, 2).startswith(
        "731 (padded to 768 for TP2: make_vocab_size_divisible_by 128 × TP 2")
    assert describe_vocab(768, 768, 128, 2) == "768"


def loss_task(overrides=(), unmasked: bool = False):
    """(padded rows, per-token loss [B, S], cross-entropy over the real ids' logits, whether
    every padded logit is -inf) of a 65-token model (layout-independent initialisation) on
    this pool's ranks; the padded output rows are set non-zero, so that unmasked padded logits
    would matter."""
    import torch.distributed as dist

    from megamoe.testing.hf import build_tiny, megamoe_logits_BSV
    from megamoe.testing.parity import microbatch

    cfg, engine = build_tiny([f"model.vocab_size={VOCAB}", *PAD8, "model.init_method_std=0.5",
                              *overrides])
    model = engine.modules[0]
    tp_rank, w_VD = engine.pg.tp.rank(), model.output_layer.weight
    padded_V = torch.arange(tp_rank * w_VD.shape[0], (tp_rank + 1) * w_VD.shape[0]) >= VOCAB
    with torch.no_grad():
        w_VD[padded_V] = 0.5 * torch.randn(int(padded_V.sum()), w_VD.shape[1])
    if unmasked:
        model.output_layer._forward_hooks.clear()
    mb = microbatch(0, 0, 0, 1, 2, cfg.model.seq_length, VOCAB)
    with torch.no_grad():
        loss_BS = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
        real_BSV = megamoe_logits_BSV(engine, mb["tokens"])
        local_BSV = model(mb["tokens"], mb["position_ids"], None)
    ce_BS = F.cross_entropy(real_BSV.reshape(-1, VOCAB), mb["labels"].reshape(-1),
                            reduction="none").view_as(loss_BS)
    masked = bool(torch.isneginf(local_BSV[..., padded_V]).all())
    result = (engine.padded_vocab_size, loss_BS, ce_BS, masked)
    return result if dist.get_rank() == 0 else (dist.get_rank(), int(padded_V.sum()), masked)


@pytest.mark.timeout(300)
def test_padded_ids_take_no_probability_mass():
    padded, loss_BS, ce_BS, masked = run_distributed(loss_task, 1)[0]
    assert padded == 72 and masked
    assert (loss_BS - ce_BS).abs().max().item() < 1e-5
    tp2 = run_distributed(loss_task, 2, ["parallel.tensor=2"])
    padded2, loss2_BS, ce2_BS, masked2 = tp2[0]
    assert padded2 == 80 and masked2 and tp2[1] == (1, 15, True)   # rank 1: 15 padded rows
    assert (loss2_BS - loss_BS).abs().max().item() < 1e-5 * loss_BS.abs().max().item()
    assert (ce2_BS - ce_BS).abs().max().item() < 1e-5 * ce_BS.abs().max().item()
    # control: the same weights without the mask — the padded logits take probability mass
    _, unmasked_BS, _, _ = run_distributed(loss_task, 1, unmasked=True)[0]
    assert (unmasked_BS - loss_BS).min().item() > 1e-3


def export_task(out_dir):
    """Export the padded 65-token model; what the folder holds, transformers' logits error, and
    the logits error of the folder imported into a model padded to 128 rows (the default)."""
    from safetensors import safe_open

    from megamoe.checkpoint.hf import import_hf
    from megamoe.testing.hf import (build_tiny, export_engine, hf_logits_err, load_hf,
                                    load_imported, max_abs_diff, megamoe_logits_BSV, randomize,
                                    sample_tokens_BS)

    cfg, engine = build_tiny([f"model.vocab_size={VOCAB}", *PAD8])
    randomize(engine)
    export_engine(engine, cfg, out_dir)
    tokens_BS = sample_tokens_BS(VOCAB)
    ours_BSV = megamoe_logits_BSV(engine, tokens_BS)
    with open(os.path.join(out_dir, "config.json")) as f:
        hf_vocab = json.load(f)["vocab_size"]
    with safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as f:
        rows = {k: f.get_slice(k).get_shape()[0] for k in ("model.embed_tokens.weight",
                                                          "lm_head.weight")}
    hf, missing = load_hf(out_dir)
    overrides, tensors = import_hf(out_dir)
    _, engine2, _ = load_imported(overrides, tensors)
    return {"padded": engine.padded_vocab_size, "hf_vocab": hf_vocab, "rows": rows,
            "missing": missing, "hf_err": hf_logits_err(hf, ours_BSV, tokens_BS),
            "imported_padded": engine2.padded_vocab_size,
            "import_err": max_abs_diff(megamoe_logits_BSV(engine2, tokens_BS), ours_BSV)}


@pytest.mark.timeout(300)
def test_hf_export_strips_the_padding_and_import_pads_again(tmp_path):
    from megamoe.testing.hf import TOL

    got = run_distributed(export_task, 1, str(tmp_path / "hf"))[0]
    assert got["padded"] == 72 and got["hf_vocab"] == VOCAB and not got["missing"]
    assert got["rows"] == {"model.embed_tokens.weight": VOCAB, "lm_head.weight": VOCAB}
    assert got["hf_err"] < TOL
    assert got["imported_padded"] == 128 and got["import_err"] < TOL


def resume_task(root):
    """Save the padded (72-row) model; load it into a model padded to 128 rows, and into one
    with a 66-token vocabulary (refused)."""
    from megamoe.checkpoint.load import CheckpointError, load_checkpoint, read_meta
    from megamoe.checkpoint.save import save_checkpoint
    from megamoe.testing.hf import (build_tiny, max_abs_diff, megamoe_logits_BSV, randomize,
                                    sample_tokens_BS)

    cfg, engine = build_tiny([f"model.vocab_size={VOCAB}", *PAD8])
    randomize(engine)
    step_dir = save_checkpoint(root, engine, {}, config=cfg)
    meta = read_meta(step_dir)
    _, engine2 = build_tiny([f"model.vocab_size={VOCAB}"])
    load_checkpoint(engine2, step_dir, load_optimizer=False)
    tokens_BS = sample_tokens_BS(VOCAB)
    err = max_abs_diff(megamoe_logits_BSV(engine2, tokens_BS),
                       megamoe_logits_BSV(engine, tokens_BS))
    _, other = build_tiny([f"model.vocab_size={VOCAB + 1}", *PAD8])
    try:
        load_checkpoint(other, step_dir, load_optimizer=False)
        refusal = None
    except CheckpointError as exc:
        refusal = str(exc)
    return {"meta": (meta["vocab_size"], meta["padded_vocab_size"]),
            "padded": engine2.padded_vocab_size, "err": err, "refusal": refusal}


@pytest.mark.timeout(300)
def test_checkpoint_resumes_under_another_padding(tmp_path):
    got = run_distributed(resume_task, 1, str(tmp_path / "ckpt"))[0]
    assert got["meta"] == (VOCAB, 72) and got["padded"] == 128
    assert got["err"] < 1e-6
    assert got["refusal"] is not None and "65-token vocabulary" in got["refusal"]
