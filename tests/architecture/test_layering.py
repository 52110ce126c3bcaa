"""Import rules of DESIGN.md ("Target layout"): imports point downwards only, and Megatron's
global `parallel_state` is read only where groups are built (megamoe/parallel) or bridged
(megamoe/platform). Each rule is checked on the package as it is and on an injected violation
(the negative control), so a rule that cannot fail is caught too."""

from __future__ import annotations

import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "megamoe"

# Lower layers first; packages on one row may import each other. `cli` and `__main__` sit on top.
ORDER = [
    ("config",),
    ("platform",),
    ("parallel", "launch"),
    ("blocks",),
    ("data",),
    ("fp8",),
    ("moe",),
    ("specs",),
    ("mor",),
    ("models",),
    ("checkpoint",),
    ("engines",),
    ("training",),
    ("commands",),
    ("testing",),
    ("cli", "__main__", "__init__", "recipes"),
]
LEVEL = {name: i for i, row in enumerate(ORDER) for name in row}
PARALLEL_STATE_ALLOWED = ("parallel", "platform")


def _package(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0].removesuffix(".py")


def _imports(tree: ast.AST):
    """(line, module, names) of every megamoe or megatron import, at any depth (imports inside
    functions count: they run too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []


def layering_violations(files: dict[str, str]) -> list[str]:
    """`files`: path under megamoe/ → source. Upward imports, and reads of `parallel_state`
    outside megamoe/parallel and megamoe/platform."""
    out = []
    for rel, source in sorted(files.items()):
        pkg = _package(ROOT / rel)
        assert pkg in LEVEL, f"megamoe/{rel}: package {pkg!r} is not in ORDER (add it)"
        for line, module, names in _imports(ast.parse(source)):
            parts = module.split(".")
            if parts[0] == "megamoe":
                target = parts[1] if len(parts) > 1 else "__init__"
                if target == "__init__" and names and names[0] in LEVEL:
                    target = names[0]              # `from megamoe import checkpoint`
                assert target in LEVEL, f"megamoe/{rel}:{line}: unknown package {target!r}"
                if LEVEL[target] > LEVEL[pkg]:
                    out.append(f"megamoe/{rel}:{line}: {pkg} imports {module} (above it)")
            uses_state = (module == "megatron.core.parallel_state"
                          or (module == "megatron.core" and "parallel_state" in names))
            if uses_state and pkg not in PARALLEL_STATE_ALLOWED:
                out.append(f"megamoe/{rel}:{line}: reads megatron.core.parallel_state")
    return out


def package_sources() -> dict[str, str]:
    files = {}
    for path in ROOT.rglob("*.py"):
        files[str(path.relative_to(ROOT))] = path.read_text()
    return files


def test_package_follows_the_import_order_and_reads_no_global_parallel_state():
    assert not layering_violations(package_sources())


@pytest.mark.parametrize("rel, line, expected", [
    ("mor/block.py", "from megamoe.training.loop import train",
     "mor imports megamoe.training.loop (above it)"),
    ("models/lm/model.py", "from megamoe import checkpoint",
     "models imports megamoe (above it)"),
    ("data/batches.py", "import megamoe.moe.layer",
     "data imports megamoe.moe.layer (above it)"),
    ("config/schema.py", "from megamoe.platform.bridge import apply_cpu_bridge",
     "config imports megamoe.platform.bridge (above it)"),
    ("training/callbacks.py", "from megatron.core import parallel_state",
     "reads megatron.core.parallel_state"),
    ("moe/layer.py", "import megatron.core.parallel_state as ps",
     "reads megatron.core.parallel_state"),
])
def test_an_injected_violation_is_caught(rel, line, expected):
    files = package_sources()
    files[rel] += f"\n\ndef _injected():\n    {line}\n"
    found = layering_violations(files)
    assert len(found) == 1 and found[0].startswith(f"megamoe/{rel}:") and expected in found[0], found


def test_every_package_is_placed():
    """A new top-level package must be given a level (or the order silently ignores it)."""
    names = {p.name.removesuffix(".py") for p in ROOT.iterdir()
             if p.name != "__pycache__" and (p.is_dir() or p.suffix == ".py")}
    assert names <= set(LEVEL), sorted(names - set(LEVEL))
    assert os.path.isdir(ROOT / "parallel") and os.path.isdir(ROOT / "platform")
