"""Megatron's token dropping (`model.moe.capacity_factor`) and Expert Race's PLR router
(`model.moe.race.plr_coeff` > 0) through the remote-code Hugging Face export.

Capacity: tiny top-k / DiT-MoE models whose capacity really drops tokens (T = 32 tokens of a
2×16 batch, k = 2, E = 4, capacity factor 0.75 or 0.5: each expert keeps 12 or 8 of its routed
tokens), and two Mixture-of-Recursions models whose pool MoE layers drop over each step's
compacted batch of active tokens (token-choice with the "position" policy, whose choice among
tied tokens depends on the order of that batch; σ > 0.5 expert choice with "probs").
transformers' logits (trust_remote_code) equal megamoe's eval-mode logits within 1e-4 and every
MoE call keeps exactly megamoe's (token, expert) pairs (routing maps compared exactly; pairs
are dropped). Controls: the HF model without dropping moves the logits; MoR steps routing their
tokens in Megatron's order, or every token of the call, move them; sample 0 alone is dropped
over its own 16 tokens, in both models alike, which moves its logits away from those it gets
inside the batch (the result depends on the batch, as in megamoe). Folders the remote config
cannot run (unknown drop policy, capacity 0) are refused naming the field.

PLR: the router's hidden layer W_h (`plr_hidden`) changes the routing logits (the HF router
without it moves the logits); the target head (`plr_target`) only trains — perturbing it changes
neither megamoe's nor the HF model's logits — and is exported, loaded without a missing or
unexpected key, and round-trips.

For every case: ≥ 2 safetensors shards, export → import → export identical (tensors and
config.json), the imported megamoe model gives the same logits.
"""

import json
import os

import pytest
import torch

from megamoe.testing.hf import (
    SHARD_BYTES, TOL, build_tiny, context_logits_BSV, copy_with_config, export_engine,
    hf_logits_err, load_hf, load_imported, max_abs_diff, randomize, reexport, sample_tokens_BS,
)
from megamoe.testing.parity import TINY_VOCAB
from megamoe.testing.pool import run_distributed
from test_hf_router_families import NO_AUX, NON_CAUSAL

MOR = ["model.num_layers=8", "model.mor.enabled=true", "model.mor.num_recursions=3"]
CAPACITY = {
    "topk_probs": ["model.moe.capacity_factor=0.75", *NON_CAUSAL],
    "topk_position_padded": ["model.moe.capacity_factor=0.75", "model.moe.drop_policy=position",
                             "model.moe.pad_to_capacity=true", *NON_CAUSAL],
    "dit_moe_probs": ["model.moe.router=dit_moe", "model.moe.shared_expert_ffn_hidden_size=48",
                      "model.moe.capacity_factor=0.5", *NON_CAUSAL],
    # Mixture-of-Recursions (Middle-Cycle L = 8, 3 recursions, MoE in every layer): the pool's
    # MoE layers drop over each step's compacted batch of active tokens (ragged token-choice
    # depths; σ > 0.5 expert choice), the unique layers over all B·S tokens
    "mor_token_position": [*MOR, "model.mor.router=token", "model.moe.capacity_factor=0.75",
                           "model.moe.drop_policy=position", *NON_CAUSAL],
    "mor_expert_probs": [*MOR, "model.mor.router=expert", "model.mor.allow_non_causal=true",
                         "model.moe.capacity_factor=0.75", *NON_CAUSAL],
}
PLR = {"race_plr": ["model.moe.router=race", *NO_AUX, *NON_CAUSAL,
                    "model.moe.layer_freq=[1,0,1,1]", "model.moe.race.plr_coeff=0.1"]}
CASES = {**CAPACITY, **PLR}
PLR_THRESHOLD = 0.1          # τ_ema inside the range of the PLR router's scores W·GELU(W_h·x)


class MapRecorder:
    """The routing maps [T, E] of every MoE layer in the last forward, megamoe's (the router's
    `routing`, after dropping) or the HF model's (its gates' outputs)."""

    def __init__(self):
        self.maps: list = []
        self.dropped: list = []      # HF gates: (token, expert) pairs dropped, per call

    def wrap_megamoe(self, router):
        """Records the real tokens' rows (a MoR step's compacted batch also holds pads). Wraps
        the routing function the router's `route` calls: `routing_with_scores` /
        `routing_with_stats` (which return the per-call scores or statistics with the map,
        instead of keeping them on the router), else Megatron's `routing`."""
        name = next(n for n in ("routing_with_scores", "routing_with_stats", "routing")
                    if hasattr(router, n))
        routing = getattr(router, name)

        def recorded(logits, padding_mask=None):
            out = (routing(logits) if padding_mask is None else routing(logits, padding_mask))
            map_TE = out[1]
            real_T = (torch.ones(map_TE.shape[0], dtype=torch.bool) if padding_mask is None
                      else ~padding_mask.reshape(-1))
            self.maps.append(map_TE.detach()[real_T].clone())
            return out
        setattr(router, name, recorded)

    def hook_hf(self, gate):
        def record(module, args, out):
            self.maps.append(out[1].clone())
            self.dropped.append(getattr(module, "last_dropped", 0))
        gate.register_forward_hook(record)

    def take(self) -> list:
        maps, self.maps = self.maps, []
        return maps


def _hf_moe_layers(hf):
    """The MoE layers of the HF model, the MoR pool's included, in call order (the unique
    first layer, the pool, the unique last layer)."""
    layers = list(hf.model.layers)
    if hf.model.recursion is not None and layers:
        layers = [layers[0], *hf.model.recursion.layers, layers[-1]]
    elif hf.model.recursion is not None:
        layers = list(hf.model.recursion.layers)
    return [layer for layer in layers if layer.is_moe]


@torch.no_grad()
def _controls(name, hf, ours, tokens_BS, engine, cfg):
    """(control, max |Δ logits|, must differ)."""
    gates = [layer.mlp.gate for layer in _hf_moe_layers(hf)]
    if name in CAPACITY:
        alone_hf = hf(input_ids=tokens_BS[:1], use_cache=False).logits
        alone_ours = context_logits_BSV(engine, cfg, tokens_BS[:1])
        yield "sample_alone_vs_megamoe_alone", (alone_hf - alone_ours).abs().max().item(), False
        yield "sample_alone_vs_in_batch", (alone_hf - ours[:1]).abs().max().item(), True
        if name == "mor_token_position":
            yield from _order_controls(hf, ours, tokens_BS)
        for g in gates:
            g.capacity_factor = None
        yield "no_dropping", hf_logits_err(hf, ours, tokens_BS), True
    else:
        target = gates[0].plr_target
        saved = target.clone()
        target.add_(1.0)
        yield "hf_plr_target_perturbed", hf_logits_err(hf, ours, tokens_BS), False
        target.copy_(saved)
        hidden = [g.plr_hidden for g in gates]
        for g in gates:
            g.plr_hidden = None
        yield "no_plr_hidden", hf_logits_err(hf, ours, tokens_BS), True
        for g, h in zip(gates, hidden):
            g.plr_hidden = h


def _order_controls(hf, ours, tokens_BS):
    """MoR steps' MoE tokens listed in Megatron's order instead of the compacted batch's (the
    "position" policy keeps other tied tokens), or every token of the call routed (inactive
    tokens compete for capacity)."""
    import sys

    remote = sys.modules[type(hf.model.recursion).__module__]     # the folder's mor_megamoe
    compact_order = remote.compact_order
    B, S = tokens_BS.shape
    remote.compact_order = lambda active_BS: compact_order(active_BS).sort().values
    yield "mor_tokens_in_megatron_order", hf_logits_err(hf, ours, tokens_BS), True
    remote.compact_order = lambda active_BS: torch.arange(B * S)
    yield "mor_all_tokens_routed", hf_logits_err(hf, ours, tokens_BS), True
    remote.compact_order = compact_order


@torch.no_grad()
def _megamoe_ignores_plr_target(engine, cfg, ours, tokens_BS) -> bool:
    from megamoe.models.lm.model import moe_layers

    for layer in moe_layers(engine.modules):
        layer.router.plr_target.add_(1.0)
    again = context_logits_BSV(engine, cfg, tokens_BS)
    for layer in moe_layers(engine.modules):
        layer.router.plr_target.sub_(1.0)
    return torch.equal(again, ours)


def capacity_plr_task(root):
    from megamoe.checkpoint.hf import family_for
    from megamoe.models.lm.model import moe_layers

    tokens_BS = sample_tokens_BS(TINY_VOCAB)
    results = {}
    for name, overrides in CASES.items():
        cfg, engine = build_tiny(overrides)
        randomize(engine, race_threshold=PLR_THRESHOLD)     # only race_plr has a threshold
        out = os.path.join(root, name)
        tensors = export_engine(engine, cfg, out, max_shard_bytes=SHARD_BYTES)
        ours_maps, hf_maps = MapRecorder(), MapRecorder()
        for layer in moe_layers(engine.modules):
            ours_maps.wrap_megamoe(layer.router)
        ours = context_logits_BSV(engine, cfg, tokens_BS)
        hf, not_loaded = load_hf(out)
        for layer in _hf_moe_layers(hf):
            hf_maps.hook_hf(layer.mlp.gate)
        r = {"family": family_for(cfg).MODEL_TYPE, "not_loaded": not_loaded,
             "err": hf_logits_err(hf, ours, tokens_BS), "scale": ours.abs().max().item()}
        hf_dropped = list(hf_maps.dropped)          # the compared forward's calls only
        mine, theirs = ours_maps.take(), hf_maps.take()
        r["same_maps"] = len(mine) == len(theirs) > 0 and all(
            torch.equal(a, b) for a, b in zip(mine, theirs))
        r["routed_per_layer"] = [int(m.sum()) for m in theirs]
        r["tokens"] = tokens_BS.numel()
        r["hf_dropped"] = hf_dropped if name in CAPACITY else []
        if name in PLR:
            r["megamoe_ignores_plr_target"] = _megamoe_ignores_plr_target(engine, cfg, ours,
                                                                          tokens_BS)
        r["controls"] = {c: (e, differ) for c, e, differ
                         in _controls(name, hf, ours, tokens_BS, engine, cfg)}
        checks, hf_overrides, back = reexport(out, tensors, max_shard_bytes=SHARD_BYTES)
        r.update(checks)
        cfg2, engine2, _ = load_imported(hf_overrides, back)
        r["import_err"] = max_abs_diff(context_logits_BSV(engine2, cfg2, tokens_BS), ours)
        results[name] = r
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("capacity_plr"))
    return root, run_distributed(capacity_plr_task, 1, root, timeout_s=600)[0]


@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", list(CASES))
def test_transformers_logits_equal_megamoe_eval_logits(name, results):
    r = results[1][name]
    assert r["family"] == "megamoe" and r["not_loaded"] == {}, r["not_loaded"]
    assert r["scale"] > 0.1
    assert r["err"] < TOL, r["err"]
    assert r["same_maps"]                      # the same (token, expert) pairs in every layer
    for control, (err, differ) in r["controls"].items():
        assert (err > 100 * TOL) if differ else (err < TOL), (control, err)
    print(f"{name}: max |Δ| {r['err']:.2e}, routed {r['routed_per_layer']}, dropped "
          f"{r['hf_dropped']}, controls "
          + ", ".join(f"{c} {e:.2e}" for c, (e, _) in r["controls"].items()))


@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", list(CAPACITY))
def test_capacity_really_drops_tokens(name, results):
    """Every layer over the whole batch drops pairs (both models alike: maps compared above);
    with MoR the unique layers and some recursion step of the pool."""
    dropped = results[1][name]["hf_dropped"]      # per MoE call, in call order
    if name.startswith("mor"):
        assert dropped[0] > 0 and dropped[-1] > 0 and any(d > 0 for d in dropped[1:-1]), dropped
    else:
        assert dropped and all(d > 0 for d in dropped), dropped


@pytest.mark.timeout(700)
def test_plr_target_head_does_not_change_inference_but_travels(results):
    from megamoe.checkpoint.hf import read_safetensors

    r = results[1]["race_plr"]
    assert r["megamoe_ignores_plr_target"]
    routed = r["routed_per_layer"]             # the threshold routes some pairs, not all
    assert all(0 < n < 4 * r["tokens"] for n in routed), routed
    tensors = read_safetensors(os.path.join(results[0], "race_plr"))
    assert tensors["model.layers.0.mlp.gate.plr_hidden"].shape == (32, 32)
    assert tensors["model.layers.0.mlp.gate.plr_target"].shape == (TINY_VOCAB, 32)
    assert "model.layers.1.mlp.gate.plr_hidden" not in tensors          # a dense layer


@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", list(CASES))
def test_export_import_export_is_the_identity(name, results):
    r = results[1][name]
    assert r["import_same"] and r["reexport_same"] and r["same_config.json"]
    assert r["import_err"] < 1e-6, r["import_err"]
    shards = [f for f in os.listdir(os.path.join(results[0], name))
              if f.endswith(".safetensors")]
    assert len(shards) >= 2, shards


@pytest.mark.timeout(700)
def test_folder_records_the_capacity(results):
    with open(os.path.join(results[0], "topk_position_padded", "config.json")) as f:
        config = json.load(f)
    assert (config["capacity_factor"], config["token_drop_policy"], config["pad_to_capacity"]
            ) == (0.75, "position", True)
    with open(os.path.join(results[0], "race_plr", "config.json")) as f:
        config = json.load(f)
    assert "capacity_factor" not in config
    assert config["router_options"]["race"]["plr_coeff"] == 0.1


@pytest.mark.timeout(700)
@pytest.mark.parametrize("field,value,match", [
    ("token_drop_policy", "random", r"token_drop_policy: 'random'"),
    ("capacity_factor", 0.0, r"capacity_factor: 0\.0; must be > 0"),
])
def test_remote_config_refuses_a_capacity_it_cannot_run(field, value, match, results, tmp_path):
    from megamoe.checkpoint.hf import import_hf

    bad = copy_with_config(os.path.join(results[0], "topk_probs"), tmp_path / "bad",
                           {field: value})
    with pytest.raises(ValueError, match=match):
        import_hf(bad)
