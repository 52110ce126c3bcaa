"""Regenerate tests/unit/data/recipes_resolved.json from configs/, allowing additions only:
every recipe in the snapshot of `--base` (a git ref, default main) may gain keys but keep every
value it had; new recipes are added. Run from the repository root:

    python tools/update_recipe_snapshot.py [--base main]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

SNAPSHOT = Path("tests/unit/data/recipes_resolved.json")


def only_adds(before, after, path: str) -> None:
    """AssertionError naming the first key whose value changed or that disappeared."""
    if isinstance(before, dict):
        assert isinstance(after, dict), f"{path}: no longer a section"
        for key in before:
            assert key in after, f"{path}.{key} removed"
            only_adds(before[key], after[key], f"{path}.{key}")
    else:
        assert before == after, f"{path}: {before!r} -> {after!r}"


def main(argv=None) -> None:
    from megamoe.config import config_to_dict, load_config
    from megamoe.config.recipes import recipe_names

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="git ref of the snapshot to extend")
    args = parser.parse_args(argv)
    old = json.loads(subprocess.run(["git", "show", f"{args.base}:{SNAPSHOT}"], check=True,
                                    capture_output=True, text=True).stdout)
    new = {}
    for name in recipe_names():
        config = config_to_dict(load_config(Path("configs") / f"{name}.yaml"))
        new[name] = json.loads(json.dumps(config))       # tuples -> lists, as the test reads
        if name in old:
            only_adds(old[name], new[name], name)
    print(f"added: {sorted(set(new) - set(old))}; gone: {sorted(set(old) - set(new))}")
    SNAPSHOT.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
