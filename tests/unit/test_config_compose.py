"""Recipes composed of fragments (`defaults:`), the resolved recipes against their snapshot, the
one check entry and derived defaults as their own step."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from megamoe.config import (
    Config,
    ConfigError,
    config_to_dict,
    dump_config,
    fill_derived,
    load_config,
    validate,
)
from megamoe.config.recipes import recipe_names
from megamoe.models.checks import check_config

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).parent / "data" / "recipes_resolved.json"


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---- the shipped recipes ------------------------------------------------------------------------

def resolved(path) -> dict:
    return json.loads(json.dumps(config_to_dict(load_config(path))))    # tuples → lists


def test_every_recipe_resolves_to_its_snapshot():
    """The snapshot was written from main before the recipes were split into fragments: any
    drift of a recipe, a fragment or a default fails here."""
    snapshot = json.loads(SNAPSHOT.read_text())
    assert sorted(snapshot) == recipe_names()
    for name in recipe_names():
        assert resolved(REPO / "configs" / f"{name}.yaml") == snapshot[name], name


def test_a_changed_fragment_changes_the_resolved_recipes(tmp_path):
    """Negative control for the snapshot test: one value changed in one fragment shows."""
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    frag = configs / "train" / "cosine_100.yaml"
    frag.write_text(frag.read_text().replace("warmup_steps: 10", "warmup_steps: 11"))
    snapshot = json.loads(SNAPSHOT.read_text())
    got = resolved(configs / "race.yaml")
    assert got != snapshot["race"] and got["train"]["warmup_steps"] == 11


def test_recipes_list_fragments_and_fragments_are_not_recipes():
    for sub in ("models", "data", "parallel", "train"):
        assert list((REPO / "configs" / sub).glob("*.yaml")), sub
    assert "tiny_moe" not in recipe_names() and all("/" not in n for n in recipe_names())
    assert "defaults" in (REPO / "configs" / "lm_quickstart.yaml").read_text()


@pytest.mark.parametrize("name", ["quickstart", "lm_quickstart", "soft", "mor_token"])
def test_dumped_config_is_resolved_and_reruns_identically(tmp_path, name):
    cfg = load_config(name, ["train.steps=37"])
    dump_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "defaults" not in text and "steps: 37" in text
    assert load_config(tmp_path / "config.yaml") == cfg


# ---- composition rules -----------------------------------------------------------------------

def test_precedence_set_over_recipe_over_later_fragment_over_earlier_over_defaults(tmp_path):
    write(tmp_path, "train/a.yaml", "train: {steps: 11, warmup_steps: 1, eval_iters: 1}\n")
    write(tmp_path, "train/b.yaml", "train: {warmup_steps: 2, eval_iters: 2, save_interval: 2}\n")
    recipe = write(tmp_path, "r.yaml", "defaults: [train/a, train/b.yaml]\n"
                                       "train: {eval_iters: 3, save_interval: 3}\n")
    t = load_config(recipe, ["train.save_interval=4"]).train
    assert t.steps == 11                      # only in the first fragment
    assert t.warmup_steps == 2                # the later fragment over the earlier one
    assert t.eval_iters == 3                  # the recipe over its fragments
    assert t.save_interval == 4               # --set over the recipe
    assert t.lr == Config().train.lr          # set nowhere: the built-in default


def test_fragments_nest_mappings_merge_and_lists_replace(tmp_path):
    write(tmp_path, "models/base.yaml", "model: {num_layers: 2, hidden_size: 32, "
                                        "moe: {num_experts: 2, layer_freq: [1, 0]}}\n")
    write(tmp_path, "models/wide.yaml", "defaults: [models/base]\n"
                                        "model: {hidden_size: 48, moe: {topk: 1}}\n")
    recipe = write(tmp_path, "r.yaml", "defaults: [models/wide]\nmodel:\n"
                                       "  moe: {layer_freq: [0, 1]}\nrun:\n")
    m = load_config(recipe).model
    assert (m.num_layers, m.hidden_size) == (2, 48)           # base, then wide over base
    assert (m.moe.num_experts, m.moe.topk) == (2, 1)          # moe merged key by key
    assert m.moe.layer_freq == [0, 1]                         # a list is replaced whole
    empty = write(tmp_path, "e.yaml", "defaults: [models/wide]\nmodel:\n")
    assert load_config(empty).model.hidden_size == 48         # an empty section adds nothing


def test_a_recipe_outside_configs_finds_the_installed_fragments_or_its_own(tmp_path):
    recipe = write(tmp_path, "mine.yaml", "defaults: [models/tiny_moe, parallel/ep2]\n")
    cfg = load_config(recipe)
    assert cfg.model.num_query_groups == 2 and cfg.parallel.expert == 2
    write(tmp_path, "models/tiny_moe.yaml", "model: {num_query_groups: 1}\n")
    assert load_config(recipe).model.num_query_groups == 1    # next to the recipe wins


def one_line_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_fragment_names_the_file_that_lists_it(tmp_path):
    write(tmp_path, "models/a.yaml", "defaults: [data/nosuch]\n")
    recipe = write(tmp_path, "r.yaml", "defaults: [models/a]\n")
    message = one_line_error(recipe)
    assert message.startswith("models/a.yaml: defaults: no fragment 'data/nosuch'"), message
    assert "data/nosuch.yaml" in message and str(tmp_path) in message


def test_a_cycle_names_the_chain(tmp_path):
    write(tmp_path, "models/a.yaml", "defaults: [models/b]\n")
    write(tmp_path, "models/b.yaml", "defaults: [models/a]\n")
    recipe = write(tmp_path, "r.yaml", "defaults: [models/a]\n")
    message = one_line_error(recipe)
    assert message == (f"models/b.yaml: defaults: 'models/a' forms a cycle: "
                       f"{recipe} → models/a.yaml → models/b.yaml → models/a.yaml"), message
    itself = write(tmp_path, "self.yaml", "defaults: [self]\n")
    assert "forms a cycle" in one_line_error(itself)
    # a fragment listed twice on different branches (a diamond) is no cycle
    write(tmp_path, "d/base.yaml", "train: {steps: 15}\n")
    write(tmp_path, "d/x.yaml", "defaults: [d/base]\n")
    write(tmp_path, "d/y.yaml", "defaults: [d/base]\n")
    diamond = write(tmp_path, "diamond.yaml", "defaults: [d/x, d/y]\n")
    assert load_config(diamond).train.steps == 15


def test_an_unknown_key_or_bad_value_names_the_fragment(tmp_path):
    write(tmp_path, "models/a.yaml", "model:\n  moe: {topk_x: 3}\n")
    recipe = write(tmp_path, "r.yaml", "defaults: [models/a]\n")
    assert one_line_error(recipe) == ("models/a.yaml: model.moe.topk_x: unknown key "
                                      "(did you mean 'topk'?)")
    write(tmp_path, "train/a.yaml", "train: {lr: fast}\n")
    bad = write(tmp_path, "s.yaml", "defaults: [train/a]\n")
    assert one_line_error(bad).startswith("train/a.yaml: train.lr: expected float")
    top = write(tmp_path, "t.yaml", "defaults: [train/nothing]\nmodle: {}\n")
    assert one_line_error(top).startswith(f"{top}: modle: unknown key")   # before fragments


@pytest.mark.parametrize("text", ["defaults: models/a\n", "defaults: [1]\n", "defaults: {a: 1}\n"])
def test_defaults_must_be_a_list_of_names(tmp_path, text):
    path = write(tmp_path, "r.yaml", text)
    assert one_line_error(path).startswith(f"{path}: defaults: expected a list of fragment")


def test_unknown_family_names_the_field_and_the_known_families():
    assert load_config(None).model.family == "lm"
    message = one_line_error(None, ["model.family=video"])
    assert message == "model.family: must be one of lm | vit | vlm | dit, got 'video'"


# ---- the one check entry, derived defaults -------------------------------------------------------

def test_validators_and_checks_do_not_write_and_derived_defaults_are_their_own_step():
    cfg = load_config("soft")
    assert cfg.model.moe.soft.slots_per_expert == 16          # round(64 · 1.0 / 4)
    before = copy.deepcopy(cfg)
    validate(cfg)
    check_config(cfg)
    assert cfg == before
    cfg.model.moe.soft.slots_per_expert = None                # negative control: the fill writes
    fill_derived(cfg)
    assert cfg == before
    fill_derived(cfg)                                         # a filled value is kept
    assert cfg == before


@pytest.mark.parametrize("overrides, launch_only, field", [
    (["parallel.world_size=2", "parallel.expert=2", "model.moe.num_experts=3"], False,
     "model.moe.num_experts"),                                                   # sections
    (["model.moe.router=soft", "model.moe.allow_non_causal=true", "model.moe.num_experts=3",
      "model.moe.soft.slots_per_expert=3", "parallel.world_size=2", "parallel.tensor=2"], False,
     "model.moe.soft.slots_per_expert"),                                         # MoE family
    (["model.mor.enabled=true", "model.mor.router=token", "model.num_layers=7"], False,
     "model.num_layers"),                                                        # MoR
    (["data.kind=indexed", "data.path=/nonexistent/corpus"], True, "data.path"),  # inputs
    (["model.moe.router=race", "model.moe.aux_loss_coeff=0"], True, "model.moe.router"),
])
def test_check_config_runs_each_concern(overrides, launch_only, field):
    cfg = load_config(None, overrides)                        # fields alone are fine
    if launch_only:
        check_config(cfg, launch=False)
    with pytest.raises(ValueError) as e:
        check_config(cfg)
    assert str(e.value).startswith(f"{field}:"), str(e.value)
