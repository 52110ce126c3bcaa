"""The selection group as a declared router option (`token_groups.selection_group`): one
hand-checked example per group kind, agreement with `torch.topk` per group, per-sequence
thresholds over sequence shards (what TP ranks under SP compute), which process group each kind
spans, the config option and its refusals, and every family's declaration."""

from types import SimpleNamespace

import pytest
import torch

import megamoe.moe.routers.token_groups as token_groups
from megamoe.config import ConfigError, load_config
from megamoe.moe.routers import ROUTERS, check_router_causality, router_builder
from megamoe.moe.routers.expert_choice import expert_choice
from megamoe.moe.routers.token_groups import (
    RADIX_SHIFTS,
    SELECTION_GROUPS,
    SelectionGroup,
    byte_histogram,
    descend,
    ordered_keys,
    selection_group,
    values_from_keys,
)

# S = 3 positions, B = 2 samples, C = 2 columns; Megatron order t = s·B + b.
#          column 0            column 1
#   b=0:  [.9, .8, .7]        [.1, .2, .3]
#   b=1:  [.1, .2, .3]        [.9, .8, .7]
VALUES_SBC = torch.tensor([[[.9, .1], [.1, .9]],
                           [[.8, .2], [.2, .8]],
                           [[.7, .3], [.3, .7]]])
VALUES_TC = VALUES_SBC.reshape(6, 2)
# k = 1. micro-batch: the largest of each column over all 6 tokens: .9 at t0 (col 0), t1 (col 1).
# sequence: the largest per sample and column: col 0 → t0 (.9, b=0), t5 (.3, b=1);
#                                              col 1 → t4 (.3, b=0), t1 (.9, b=1).
MICRO_BATCH_K1 = [[1, 0], [0, 1], [0, 0], [0, 0], [0, 0], [0, 0]]
SEQUENCE_K1 = [[1, 0], [0, 1], [0, 0], [0, 0], [0, 1], [1, 0]]
# k = 2. micro-batch: .8 per column → col 0 t0 t2, col 1 t1 t3;
# sequence: col 0 → b=0 {.9 t0, .8 t2}, b=1 {.3 t5, .2 t3}; col 1 → b=0 {.3 t4, .2 t2},
# b=1 {.9 t1, .8 t3}.
MICRO_BATCH_K2 = [[1, 0], [0, 1], [1, 0], [0, 1], [0, 0], [0, 0]]
SEQUENCE_K2 = [[1, 0], [0, 1], [1, 1], [1, 1], [0, 1], [1, 0]]


@pytest.mark.parametrize("kind,k,want", [
    ("micro-batch", 1, MICRO_BATCH_K1), ("sequence", 1, SEQUENCE_K1),
    ("data-parallel", 1, MICRO_BATCH_K1),              # one rank: its micro-batch is the group
    ("micro-batch", 2, MICRO_BATCH_K2), ("sequence", 2, SEQUENCE_K2)])
def test_hand_checked_top_k_per_group(kind, k, want):
    threshold = SelectionGroup(kind).kth_largest(VALUES_TC, k, batch=2)
    assert (VALUES_TC >= threshold).int().tolist() == want


def test_tokens_per_group():
    assert SelectionGroup("token").num_tokens(6, 2) == 1
    assert SelectionGroup("sequence").num_tokens(6, 2) == 3
    assert SelectionGroup("micro-batch").num_tokens(6, 2) == 6
    assert SelectionGroup("data-parallel").num_tokens(6, 2) == 6


@pytest.mark.parametrize("kind", ["sequence", "micro-batch", "data-parallel"])
def test_threshold_equals_torch_topk_per_group(kind):
    g = torch.Generator().manual_seed(0)
    S, B, C, k = 7, 3, 4, 3
    values_SBC = torch.randn(S, B, C, generator=g)
    mask_TC = values_SBC.reshape(-1, C) >= SelectionGroup(kind).kth_largest(
        values_SBC.reshape(-1, C), k, batch=B)
    want_SBC = torch.zeros(S, B, C, dtype=torch.bool)
    if kind == "sequence":                       # each (sample, column) on its own
        for b in range(B):
            for c in range(C):
                want_SBC[torch.topk(values_SBC[:, b, c], k).indices, b, c] = True
    else:                                        # each column over the whole micro-batch
        want_TC = want_SBC.view(-1, C)
        for c in range(C):
            want_TC[torch.topk(values_SBC.reshape(-1, C)[:, c], k).indices, c] = True
    assert torch.equal(mask_TC, want_SBC.reshape(-1, C))
    assert mask_TC.sum().item() == k * C * (B if kind == "sequence" else 1)


def test_per_sequence_threshold_over_sequence_shards():
    """Two TP ranks under SP hold positions [0, 4) and [4, 7) of every sample; their column
    layouts line up (sample b, column c on both), so adding their histograms (the all-reduce)
    gives each sample's threshold over its whole sequence. Simulated in lock step."""
    g = torch.Generator().manual_seed(1)
    S, B, C, k = 7, 3, 2, 4
    values_SBC = torch.randn(S, B, C, generator=g)
    values_SBC[1, 2, 1] = values_SBC[5, 2, 1]                  # a tie across the shards
    seq = SelectionGroup("sequence")
    pieces = [seq.columns(part.reshape(-1, C), B) for part in (values_SBC[:4], values_SBC[4:])]
    keys = [ordered_keys(piece) for piece in pieces]
    prefix, remaining = torch.zeros(B * C, dtype=torch.int64), torch.full((B * C,), k)
    for shift in RADIX_SHIFTS:
        hist = sum(byte_histogram(key, prefix, shift) for key in keys)
        prefix, remaining = descend(hist, prefix, remaining)
    want_BC = values_SBC.sort(dim=0, descending=True).values[k - 1]
    assert torch.equal(values_from_keys(prefix).view(B, C), want_BC)


def test_expert_choice_per_sequence_is_expert_choice_of_each_sample():
    g = torch.Generator().manual_seed(2)
    S, B, E, c = 8, 3, 4, 4
    scores_SBE = torch.softmax(torch.randn(S, B, E, generator=g), dim=-1)
    probs_TE, map_TE = expert_choice(scores_SBE.reshape(-1, E), c, SelectionGroup("sequence"), B)
    for b in range(B):
        want_probs_SE, want_map_SE = expert_choice(scores_SBE[:, b], c)
        assert torch.equal(map_TE.view(S, B, E)[:, b], want_map_SE)
        assert torch.equal(probs_TE.view(S, B, E)[:, b], want_probs_SE)
    assert map_TE.view(S, B, E).sum(0).eq(c).all()        # every expert full in every sample
    _, micro_batch_TE = expert_choice(scores_SBE.reshape(-1, E), c * B)
    assert not torch.equal(map_TE, micro_batch_TE)         # the groups do matter here


class _Group:
    def __init__(self, name, size):
        self.name, self._size = name, size

    def size(self):
        return self._size


@pytest.mark.parametrize("kind,sp,want", [
    ("sequence", True, "tp_cp"), ("sequence", False, "cp"), ("micro-batch", True, "tp_cp"),
    ("micro-batch", False, "cp"), ("data-parallel", True, "tp_dp_cp"),
    ("data-parallel", False, "dp_cp"), ("token", True, None)])
def test_process_group_of_each_kind(monkeypatch, kind, sp, want):
    monkeypatch.setattr(token_groups.dist, "is_initialized", lambda: True)
    pg = SimpleNamespace(**{n: _Group(n, 2) for n in ("tp_cp", "cp", "tp_dp_cp", "dp_cp")})
    got = selection_group(kind, pg, sp)
    assert got.kind == kind and (got.group.name if got.group else None) == want
    pg.cp = _Group("cp", 1)                                 # one rank: nothing to reduce over
    assert selection_group("micro-batch", pg, False).group is None


def test_every_family_declares_its_groups():
    cfg = load_config(None, [])
    for key, cls in ROUTERS.items():
        assert cls.selection_groups and set(cls.selection_groups) <= set(SELECTION_GROUPS), key
        cfg.model.moe.router = key
        assert cls.selection_group_for(cfg.model.moe) in cls.selection_groups, key
    assert ROUTERS["expert_choice"].selection_groups[0] == "micro-batch"     # today's default
    assert ROUTERS["race"].selection_groups[0] == "data-parallel"
    assert ROUTERS["topk"].selection_group_for(cfg.model.moe) == "token"
    cfg.model.moe.capacity_factor = 1.0
    assert ROUTERS["topk"].selection_group_for(cfg.model.moe) == "micro-batch"


EC = ["model.moe.router=expert_choice", "model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0",
      "model.moe.allow_non_causal=true"]


@pytest.mark.parametrize("kind", ["micro-batch", "sequence", "data-parallel"])
def test_expert_choice_option_reaches_the_router(kind):
    moe = load_config(None, EC + [f"model.moe.expert_choice.selection_group={kind}"]).model.moe
    assert router_builder(moe).keywords == {"selection": kind}


@pytest.mark.parametrize("section,kind", [("expert_choice", "token"), ("race", "sequence"),
                                          ("expert_choice", "per-image")])
def test_unsupported_group_is_one_error_naming_the_field_and_the_choices(section, kind):
    router = ["model.moe.router=" + section]
    with pytest.raises(ConfigError) as err:
        load_config(None, EC[1:] + router + [f"model.moe.{section}.selection_group={kind}"])
    msg = str(err.value)
    assert msg.startswith(f"model.moe.{section}.selection_group:") and "\n" not in msg
    for supported in ROUTERS[section].selection_groups:
        assert supported in msg


def test_causality_refusal_names_the_group():
    cfg = load_config(None, EC[:-1] + ["model.moe.expert_choice.selection_group=sequence"])
    with pytest.raises(ValueError, match="across the sequence"):
        check_router_causality(cfg)


def test_hf_export_refuses_per_sequence_expert_choice():
    from megamoe.checkpoint import hf_megamoe

    assert hf_megamoe.problems(load_config(None, EC)) == []
    bad = hf_megamoe.problems(load_config(None, EC + [
        "model.moe.expert_choice.selection_group=sequence"]))
    assert len(bad) == 1 and bad[0].startswith("model.moe.expert_choice.selection_group")


def test_specs_lists_each_familys_groups(capsys):
    from megamoe.cli import cmd_specs

    assert cmd_specs() == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert "micro-batch | sequence | data-parallel" in rows["expert_choice"]
    assert "data-parallel | micro-batch" in rows["race"]
    assert " token " in rows["moee"]


def test_batch_order_lists_samples_then_positions():
    # S = 3, B = 2, Megatron t = s·B + b: sample 0 is t0, t2, t4; sample 1 is t1, t3, t5
    assert token_groups.batch_order(6, 2).tolist() == [0, 2, 4, 1, 3, 5]
    assert token_groups.batch_order(6, 1).tolist() == list(range(6))     # one sequence
