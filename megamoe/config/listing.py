"""`megamoe config`: every config key with its default (or its value in a recipe), its type and
the comment written next to the field in the schema, so the dataclasses stay the one reference.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import inspect
import json
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from functools import lru_cache

import yaml

from megamoe.config.coerce import field_types, join, type_name
from megamoe.config.recipes import first_sentence
from megamoe.config.schema import Config


@dataclass
class KeyRow:
    key: str          # dotted, as `--set` takes it
    value: object     # in the config shown (the defaults, or a loaded recipe)
    default: object
    type: str
    help: str


@dataclass
class Section:
    path: str         # "model.moe.race"
    help: str         # first sentence of the section class's docstring, or ""
    rows: list[KeyRow]


def sections(cfg: Config | None = None) -> list[Section]:
    """The key tree of `cfg` (default: the defaults) in declaration order, one Section per
    dataclass that holds plain keys."""
    out: list[Section] = []
    _walk(cfg or Config(), Config(), "", out)
    return [s for s in out if s.rows]


def _walk(node, default, path: str, out: list[Section]) -> None:
    section = Section(path, _doc_sentence(type(node)), [])
    out.append(section)
    helps, choices = field_comments(type(node)), field_choices(type(node))
    for name, tp in field_types(type(node)).items():
        value, dflt = getattr(node, name), getattr(default, name)
        if dataclasses.is_dataclass(value):
            _walk(value, dflt, join(path, name), out)
            continue
        text = helps.get(name, "")
        if name in choices:
            text = f"one of: {' | '.join(choices[name])}" + (f"; {text}" if text else "")
        section.rows.append(KeyRow(join(path, name), value, dflt, type_name(tp), text))


def _doc_sentence(cls: type) -> str:
    """The first sentence of a hand-written docstring (dataclass invents one from the fields)."""
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return first_sentence(" ".join(doc.strip().split("\n\n")[0].split()))


def _class_tree(cls: type) -> ast.ClassDef | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    except (OSError, TypeError):
        return None


@lru_cache(maxsize=None)
def field_choices(cls: type) -> dict[str, tuple]:
    """Field name → the values its `validate` accepts, read from its `one_of(self, "name",
    CHOICES)` calls (CHOICES a literal or a module constant)."""
    tree, module = _class_tree(cls), sys.modules[cls.__module__]
    out = {}
    for node in ast.walk(tree) if tree else ():
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "one_of"
                and len(node.args) == 3 and isinstance(node.args[1], ast.Constant)):
            continue
        arg = node.args[2]
        if isinstance(arg, ast.Name):
            out[node.args[1].value] = tuple(getattr(module, arg.id))
        elif isinstance(arg, (ast.Tuple, ast.List)):
            out[node.args[1].value] = tuple(ast.literal_eval(arg))
    return out


@lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """Field name → the comment after it in the class source, continued by the comment-only
    lines right below it (`name: int = 1  # help …` / `#  … more help`)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments, code_lines = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line, parts = node.end_lineno, []
        while line in comments and (not parts or line not in code_lines):
            parts.append(comments[line])
            line += 1
        out[node.target.id] = " ".join(p for p in parts if p)
    return out


def yaml_value(value) -> str:
    """`value` as one would write it after `--set key=` or in a recipe."""
    if isinstance(value, str) and yaml.safe_load(value) == value and value:
        return value
    return json.dumps(value)          # null, true, 1e-05, [1, 0], "" (JSON is YAML)


def format_sections(secs: list[Section], resolved: bool) -> str:
    """An aligned table per section: KEY DEFAULT TYPE HELP (or KEY VALUE TYPE HELP, `*` marking
    a value that differs from the default, whose default then follows the help)."""
    rows = [r for s in secs for r in s.rows]
    head = "VALUE" if resolved else "DEFAULT"
    kw = max(len(r.key) for r in rows)
    vw = max(min(max(len(yaml_value(r.value)) for r in rows), 24), len(head))
    tw = max(len(r.type) for r in rows)
    lines = [f"  {'KEY':{kw}}  {head:{vw}}  {'TYPE':{tw}}  HELP"]
    for sec in secs:
        lines += ["", f"# {sec.path}" + (f": {sec.help}" if sec.help else "")]
        for r in sec.rows:
            changed = resolved and r.value != r.default
            text = " ".join([r.help] + ([f"(default {yaml_value(r.default)})"] if changed else []))
            lines.append(f"{'*' if changed else ' '} {r.key:{kw}}  {yaml_value(r.value):{vw}}  "
                         f"{r.type:{tw}}  {text.strip()}".rstrip())
    return "\n".join(lines)
