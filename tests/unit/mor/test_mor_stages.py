"""Pipeline stages of an MoR model hold whole units (first layer, recursion block, last layer),
split to minimise the largest stage's training FLOPs per token: hand-computed values.

Tiny model (megamoe.testing.parity): D = 32, FFN 64, 4 heads × d = 8 (2 query groups), S = 16,
V = 64, L = 8, N_r = 3, Middle-Cycle (K = 2 shared layers per step), expert-choice capacities
1, 2/3, 1/3 → k_r = 16, 10, 5. A dense layer has P = 3136 (attention: 32·(32 + 2·16) + 32·32
+ 2·32 norms) + 6144 (SwiGLU 3·32·64) = 9280 matmul parameters; one layer on k of a sequence's
tokens costs 6·P·k + 6·(h·d)·k² = 55680·k + 192·k² FLOPs (h·d = 32), per token of the sequence
that / S.
"""

import pytest

from megamoe.testing.parity import TINY_VOCAB, tiny_config

MOR = ["model.num_layers=8", "model.mor.enabled=true", "model.mor.num_recursions=3",
       "model.mor.allow_non_causal=true"]       # capacities (N_r − r + 1)/N_r = 1, 2/3, 1/3
DENSE = MOR + ["model.moe.num_experts=0"]
# unique first layer MoE (4 experts of FFN 48, top-2), every other layer dense
MOE_FIRST = MOR + ["model.moe.layer_freq=[1,0,0,0,0,0,0,0]"]

UNIQUE = 55680 + 192 * 16                             # k = S = 16: 58752 per token
BLOCK = (2 * sum(55680 * k + 192 * k * k for k in (16, 10, 5)) / 16
         + 6 * 32 * (1 + 1 + 10 / 16))                # steps 224904 + routers 504 = 225408
HEAD = 6 * (64 * 32 + 32)                             # output layer + final norm: 12480


def test_unit_flops_are_the_hand_computed_ones():
    from megamoe.mor.accounting import mor_flops_by_unit, mor_flops_per_token

    from megamoe.mor.accounting import step_kept

    cfg = tiny_config(DENSE)
    assert cfg.model.seq_length == 16 and TINY_VOCAB == 64
    assert step_kept(cfg) == [16, 10, 5]
    flops = mor_flops_by_unit(cfg, TINY_VOCAB)
    assert flops == pytest.approx({"first": UNIQUE, "block": BLOCK, "last": UNIQUE,
                                   "head": HEAD}, rel=1e-12)
    assert (UNIQUE, BLOCK, HEAD) == (58752, 225408, 12480)
    # with the untied input embedding (a lookup, counted 6·V·D by the FLOP meter) they add up
    assert sum(flops.values()) + 6 * 64 * 32 == pytest.approx(mor_flops_per_token(cfg, 64))


def test_balance_minimises_the_largest_stage():
    from megamoe.mor.stages import balance

    assert balance([58752, 225408, 71232], 1) == [3]
    assert balance([58752, 225408, 71232], 2) == [2, 1]     # 284160 | 71232 (not 58752 | 296640)
    assert balance([77952, 225408, 71232], 2) == [1, 2]     # 77952 | 296640 (not 303360 | ...)
    assert balance([58752, 225408, 71232], 3) == [1, 1, 1]
    assert balance([1.0, 1.0], 2) == [1, 1]
    assert balance([2.0, 1.0, 1.0], 2) == [1, 2]            # tie 2 | 2 over 3 | 1
    with pytest.raises(ValueError):
        balance([1.0, 2.0, 3.0], 4)


def test_stage_units_follow_the_flops_not_the_layer_counts():
    from megamoe.mor.stages import stage_units, unit_costs

    cfg = tiny_config(DENSE)
    # 6 of the 8 unrolled layers sit in the block, yet it shares a stage with the first layer:
    # [first, block] = 284160 vs [last + head] = 71232 beats 58752 vs 296640
    assert unit_costs(cfg, TINY_VOCAB) == pytest.approx(
        {"first": UNIQUE, "block": BLOCK, "last": UNIQUE + HEAD})
    assert stage_units(cfg, TINY_VOCAB, 1) == [("first", "block", "last")]
    assert stage_units(cfg, TINY_VOCAB, 2) == [("first", "block"), ("last",)]
    assert stage_units(cfg, TINY_VOCAB, 3) == [("first",), ("block",), ("last",)]
    # an MoE first layer (active 3136 + 4·32 router + 2·3·32·48 = 12480 params: 6·12480 + 3072
    # = 77952) outweighs last + head: [first] | [block, last] (77952 | 296640 < 303360 | 71232)
    cfg = tiny_config(MOE_FIRST)
    assert unit_costs(cfg, TINY_VOCAB)["first"] == pytest.approx(77952)
    assert stage_units(cfg, TINY_VOCAB, 2) == [("first",), ("block", "last")]


def test_cycle_has_one_unit():
    from megamoe.mor.stages import stage_units

    cfg = tiny_config(DENSE + ["model.mor.sharing=cycle", "model.num_layers=6"])
    assert stage_units(cfg, TINY_VOCAB, 1) == [("block",)]
