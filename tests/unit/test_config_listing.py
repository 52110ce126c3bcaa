"""`megamoe config` lists every key once with a default that `--set` reads back, the schema's
comments and accepted values as help; recipes are found by name from the package."""

from __future__ import annotations

import dataclasses
import os

import pytest

from megamoe.config import KNOWN_ROUTERS, Config, ConfigError, load_config
from megamoe.config.listing import format_sections, sections, yaml_value
from megamoe.config.recipes import describe, find_config, recipe_names, recipe_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def leaf_keys(obj, path="") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{path}{f.name}"
        out += leaf_keys(value, key + ".") if dataclasses.is_dataclass(value) else [key]
    return out


def rows():
    return {r.key: r for s in sections() for r in s.rows}


def test_every_key_is_listed_once_in_declaration_order():
    listed = [r.key for s in sections() for r in s.rows]
    assert listed == leaf_keys(Config())


def test_each_listed_default_is_what_set_reads_back():
    """Pasting `KEY=DEFAULT` from the listing into --set gives the default back."""
    for key, row in rows().items():
        cfg = load_config(None, [f"{key}={yaml_value(row.default)}"])
        assert cfg == Config(), key


def test_help_comes_from_the_schema_comments_and_checks():
    r = rows()
    assert r["train.resume"].help.startswith("auto: newest complete checkpoint")
    assert r["train.resume"].help.endswith("none: start fresh; or a checkpoint root / step "
                                           "directory")            # the continuation line
    assert r["model.moe.router"].help == "one of: " + " | ".join(KNOWN_ROUTERS)
    assert r["train.precision"].help == "one of: auto | fp32 | bf16; auto: bf16 on GPU, fp32 on CPU"
    assert (r["model.mor.capacities"].type, r["model.mor.capacities"].default) == \
        ("list[float] | None", None)
    race = next(s for s in sections() if s.path == "model.moe.race")
    assert race.help.startswith("Expert Race (papers.md §7)")


def test_resolved_listing_marks_what_the_recipe_changes():
    text = format_sections(sections(load_config("race")), resolved=True)
    line = next(ln for ln in text.splitlines() if " model.moe.router " in ln)
    assert line.startswith("* ") and " race " in line and line.endswith("(default topk)")
    line = next(ln for ln in text.splitlines() if " model.num_layers " in ln)
    assert line.startswith("  ")


def test_recipes_are_the_configs_folder_by_name():
    names = recipe_names()
    assert names == sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs"))
                           if f.endswith(".yaml"))
    assert {"quickstart", "race"} <= set(names)
    for name in names:
        assert load_config(name) == load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
        assert 0 < len(describe(name)) <= 100 and "\n" not in describe(name)
    assert describe("expert_choice").startswith("Expert-choice routing (Zhou et al. 2022): ")
    assert describe("moee") == ("MoEE soft mixing (papers.md §12): every token goes to every "
                                "expert, weighted by softmax(gate(h)).")   # one sentence


def test_a_file_wins_over_a_recipe_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "race").write_text("run: {name: mine}\n")
    assert find_config("race") == "race"
    assert find_config("race.yaml") == recipe_path("race")
    assert load_config("race").run.name == "mine"


@pytest.mark.parametrize("name", ["nosuch", "configs/nosuch.yaml", "sub/race"])
def test_unknown_name_lists_the_recipes(name):
    with pytest.raises(ConfigError) as e:
        find_config(name)
    assert str(e.value).startswith(f"{name}: config file not found")
    assert "quickstart, race" in str(e.value)
