"""Recipes installed with the package: `--config race` names `megamoe/recipes/race.yaml`.

In the repository `megamoe/recipes` is a symlink to `configs/`, the one copy of each recipe;
wheels and sdists copy the files (setup.py's package_data), so an installed megamoe finds its
recipes from any working directory.
"""

from __future__ import annotations

import os

from megamoe.config.errors import ConfigError

RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def recipe_names() -> list[str]:
    """Names of the installed recipes, sorted."""
    if not os.path.isdir(RECIPE_DIR):
        return []
    return sorted(f[:-len(".yaml")] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))


def recipe_path(name: str) -> str:
    return os.path.join(RECIPE_DIR, f"{name}.yaml")


def find_config(path: str | os.PathLike) -> str:
    """A config file: `path` itself when it exists, else the recipe it names (`race` or
    `race.yaml`); ConfigError listing the recipes otherwise."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    name = path[:-len(".yaml")] if path.endswith(".yaml") else path
    if os.sep not in name and name in recipe_names():
        return recipe_path(name)
    raise ConfigError(f"{path}: config file not found, and not a recipe name (recipes: "
                      f"{', '.join(recipe_names()) or 'none installed'}; "
                      f"`megamoe recipes` describes them)")


def describe(name: str, width: int = 100) -> str:
    """The first sentence of the recipe's leading comment, cut to `width` characters."""
    words = []
    with open(recipe_path(name)) as f:
        for line in f:
            if not line.startswith("#"):
                break
            words += line.lstrip("#").split()
    text = first_sentence(" ".join(words))
    if len(text) > width:
        text = text[:width - 1].rsplit(" ", 1)[0] + "…"
    return text


_ABBREVIATIONS = ("al.", "e.g.", "i.e.", "cf.", "vs.", "Eq.", "§.")


def first_sentence(text: str) -> str:
    """Up to the first ". " that ends a sentence ("Zhou et al. 2022" does not)."""
    start = 0
    while (end := text.find(". ", start)) >= 0:
        if not text[:end + 1].endswith(_ABBREVIATIONS):
            return text[:end + 1]
        start = end + 2
    return text
