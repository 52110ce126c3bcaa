"""Packing several vlm samples per sequence (megamoe.data.pack, megamoe.blocks.packed,
megamoe.models.vlm.packing): the greedy plan, the packed sequence, the block-diagonal causal
mask, the gathered rotary table and the sample numbering against hand-written values; configs
packing cannot serve refused naming the field; and the built model gives each packed sample
the same loss and answer logits as the sample alone — which fails without the mask or without
the position restart (negative controls)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megamoe.blocks.packed import (block_causal_mask, per_sample_sum, rotary_at_positions,
                                   sample_numbers)
from megamoe.config import ConfigError, load_config
from megamoe.data.pack import pack_samples, plan_packs
from megamoe.models.checks import check_config
from megamoe.testing.parity import TINY_VLM
from megamoe.testing.pool import run_distributed

# TINY_VLM's longest sample is 28 tokens (4 image tokens, captions of two shapes): two fit in
# 58 + 1 (58: even, for TP 2 with SP)
PACKED = ["data.packing=true", "data.pack_samples=2", "model.seq_length=58"]


def sample(ids, answer: int, index: int) -> dict:
    """A scenes-like sample of `ids` = <bos> … <eos> padded to S + 1 = 12 tokens, whose last
    `answer` words before the <eos> are the answer (mask 1 where the target is an answer word
    or the <eos>)."""
    tokens = np.zeros(12, np.int64)
    tokens[:len(ids)] = ids
    mask = np.zeros(11, np.float32)
    mask[len(ids) - answer - 2:len(ids) - 1] = 1
    return {"image": np.full((3, 2, 2), index, np.uint8), "tokens": tokens, "loss_mask": mask,
            "template": 0, "index": index}


def test_plan_packs_is_greedy_in_order():
    # capacity seq_length + 1 = 11 tokens: 4+5 fit, 3 does not (12), 3+6 fit, 11 alone
    assert plan_packs([4, 5, 3, 6, 11, 1], 10) == [[0, 1], [2, 3], [4], [5]]
    with pytest.raises(ValueError, match=r"^packing: sample 2 has 12 tokens, more than "
                                         r"model.seq_length \+ 1 = 11$"):
        plan_packs([4, 5, 12], 10)


def test_pack_samples_hand_values():
    """Samples [1 7 8 2] (answer 8) and [1 9 5 6 2] (answer 5 6) in S = 11 (12 tokens)."""
    a, b = sample([1, 7, 8, 2], 1, 40), sample([1, 9, 5, 6, 2], 2, 41)
    p = pack_samples([a, b], 11)
    assert p["tokens"].tolist() == [1, 7, 8, 2, 1, 9, 5, 6, 2, 0, 0, 0]
    # targets: 7 8 2 | 1 9 5 6 2 | pad: answer words and <eos> of each sample, not the next <bos>
    assert p["loss_mask"].tolist() == [0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0]
    assert p["segment_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1]
    assert p["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1]
    assert p["images"][:, 0, 0, 0].tolist() == [40, 41] and p["index"] == [40, 41]
    # exactly full: 4 + 8 = 12 tokens; the last <eos> is a target only
    c = sample([1, 9, 5, 6, 4, 4, 4, 2], 1, 42)
    full = pack_samples([a, c], 11)
    assert full["segment_ids"].tolist() == [0] * 4 + [1] * 7
    assert full["loss_mask"].tolist() == [0, 1, 1, 0] + [0] * 5 + [1, 1]
    with pytest.raises(ValueError, match=r"^packing: sample 41 \(5 tokens\) does not fit after "
                                         r"8 tokens of 2 samples"):
        pack_samples([a, a, b], 11)


def test_block_causal_mask_hand_values():
    """Segments [0 0 1 1 1 -1]: True = masked."""
    allowed = ~block_causal_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))[0, 0]
    assert allowed.int().tolist() == [[1, 0, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0, 0],
                                      [0, 0, 1, 0, 0, 0],
                                      [0, 0, 1, 1, 0, 0],
                                      [0, 0, 1, 1, 1, 0],
                                      [0, 0, 0, 0, 0, 1]]


def test_rotary_table_read_at_position_ids():
    freqs = torch.arange(4.0 * 2).reshape(4, 1, 1, 2)        # position p: [2p, 2p + 1]
    out = rotary_at_positions(freqs, torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]))
    assert out.shape == (4, 2, 1, 2)
    assert out[:, 0, 0, 0].tolist() == [0, 2, 0, 2] and out[:, 1, 0, 1].tolist() == [1, 3, 5, 7]


def test_sample_numbers_count_row_by_row():
    numbers, n = sample_numbers(torch.tensor([[0, 0, 1, -1], [0, 1, 1, 2]]))
    assert n == 5 and numbers.tolist() == [[0, 0, 1, -1], [2, 3, 3, 4]]
    assert per_sample_sum(torch.ones(2, 4), numbers, n).tolist() == [2, 1, 1, 2, 1]


@pytest.mark.parametrize("overrides,field", [
    (["data.pack_samples=3"], "data.pack_samples:"),               # micro-batch of 2 samples
    (["model.seq_length=54"], "model.seq_length:"),
    (["model.moe.router=expert_choice", "model.moe.allow_non_causal=true",
      "model.moe.z_loss_coeff=0"], "model.moe.router:"),
    (["model.moe.router=vmoe", "model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0"],
     "model.moe.router:"),          # causal when dropless, but noise per sample index
    (["model.moe.capacity_factor=1.0", "model.moe.allow_non_causal=true"],
     "model.moe.capacity_factor:"),
    (["model.moe.aux_loss_type=sequence"], "model.moe.aux_loss_type:"),
    (["model.vlm.contrastive_coeff=0.1"], "model.vlm.contrastive_coeff:"),
    (["parallel.world_size=2", "parallel.tensor=2", "parallel.vision_tensor=1"],
     "parallel.vision_tensor:"),
    (["data.packed_attention=thd"], "data.packed_attention:"),
    (["data.packed_attention=dense"], "data.packed_attention:"),
])
def test_configs_packing_cannot_serve_are_one_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        check_config(load_config(None, [*TINY_VLM, *PACKED, *overrides]), launch=False)
    assert str(err.value).startswith(field) and "\n" not in str(err.value), str(err.value)


def test_packing_is_refused_for_data_without_samples_to_pack():
    with pytest.raises(ConfigError, match=r"^data.packing: packs image\+text samples"):
        load_config(None, ["data.packing=true"])


def packed_vs_unpacked_task(samples: int = 8):
    """Each sample's (answer-token loss sum, answer logits) from one packed batch (k = 2 per
    row), from greedy packs (megamoe.data.pack.plan_packs: a streaming source's) and from the
    same samples unpacked, on one built model; also packed without the block-diagonal mask,
    without the position restart (positions 0 … S−1 along the row) and with every position 0."""
    import copy

    import torch.nn.functional as F

    from megamoe.engines.megatron import build_engine
    from megamoe.models.registry import family_datasets
    from megamoe.models.vlm.model import vision_context
    from megamoe.models.vlm.task import VLMTask, attention_of

    cfg = load_config(None, [*TINY_VLM, *PACKED, "parallel.world_size=1"])
    check_config(cfg, launch=False)
    train, _, vocab = family_datasets(cfg)
    engine = build_engine(cfg, vocab, torch.device("cpu"), with_optimizer=False, ddp=False)
    model, task = engine.modules[0].eval(), engine.task
    unpacked_cfg = copy.deepcopy(cfg)
    unpacked_cfg.data.packing = False
    idx = list(range(samples))
    packed = task.collate(train.get_batch(idx), idx)
    unpacked = VLMTask(unpacked_cfg).collate(train.get_batch(idx), idx)
    assert packed["tokens"].shape[0] == samples // 2 and unpacked["tokens"].shape[0] == samples
    assert len(set(packed["segment_ids"][:, 20:].flatten().tolist())) > 1   # 2nd samples

    def run(batch, mask=True, positions=None):
        attention, samples_BS = attention_of(batch)
        positions = batch["position_ids"] if positions is None else positions
        with torch.no_grad():
            logits_BSV = model(batch["tokens"], positions, attention if mask else None,
                               images=batch["images"], context=task.context(batch, 0),
                               vision_context=vision_context(batch, 0, task.encoder_tokens)
                               )[..., :vocab]
        loss_BS = F.cross_entropy(logits_BSV.transpose(1, 2), batch["labels"],
                                  reduction="none")
        answers = batch["loss_mask"] > 0                 # sample by sample in both layouts
        return (per_sample_sum(loss_BS * batch["loss_mask"], samples_BS, samples),
                logits_BSV[answers])

    # a streaming source's path: greedy packs of uneven sample counts, handed to collate
    from megamoe.data.pack import pack_samples, plan_packs, sample_length, split_batch

    items = split_batch(train.get_batch(idx))
    plan = plan_packs([sample_length(x) for x in items], cfg.model.seq_length)
    greedy = task.collate([pack_samples([items[j] for j in p], cfg.model.seq_length)
                           for p in plan], idx)
    R, S = packed["tokens"].shape
    return {"unpacked": run(unpacked), "packed": run(packed), "greedy": run(greedy),
            "plan": plan,
            "no_mask": run(packed, mask=False),
            "no_restart": run(packed, positions=torch.arange(S).expand(R, S)),
            "all_zero": run(packed, positions=torch.zeros(R, S, dtype=torch.long))}


@pytest.mark.timeout(300)
def test_packed_samples_have_the_losses_and_logits_they_have_alone():
    """Within 1e-5 (loss relative to the largest, logits absolute); the block-diagonal mask is
    needed (without it the check fails). Positions reach the rotary table (all 0: the check
    fails), but RoPE is relative — q_m·k_n depends on m − n only — so shifting a whole sample
    (no restart) leaves its logits equal to rounding: the restart is exact, not required."""
    out = run_distributed(packed_vs_unpacked_task, 1)[0]
    ref_loss, ref_logits = out["unpacked"]
    assert (ref_loss > 0).all() and len(ref_loss) == 8

    def error(name):
        loss, logits = out[name]
        return max((loss - ref_loss).abs().max().item() / ref_loss.abs().max().item(),
                   (logits - ref_logits).abs().max().item())

    assert error("packed") <= 1e-5, error("packed")
    assert len({len(p) for p in out["plan"]}) > 1, out["plan"]     # rows of uneven counts
    assert error("greedy") <= 1e-5, error("greedy")
    assert error("no_mask") > 1e-4 and error("all_zero") > 1e-4, (error("no_mask"),
                                                                   error("all_zero"))
    assert error("no_restart") <= 1e-5, error("no_restart")
