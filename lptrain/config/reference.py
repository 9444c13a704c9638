"""The config reference page (docs/config.md), generated from the config dataclasses.

The schema is written once, in `schema.py` and `finetune.py`: each field's type and
default come from the dataclass, its description from the comment on its line or the comment
lines right above it, and each section's introduction from the class docstring. The docs build
(docs/hooks.py) inserts `render()` into the page, so the reference cannot drift from the parser.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import types
import typing
from typing import Any

from lptrain.config.schema import TrainConfig, _key, _type_name


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the trailing comment, else the comment block just above."""
    source = inspect.getsource(cls)
    out: dict[str, str] = {}
    block: list[str] = []
    line_of_last_name: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            owner = line_of_last_name.get(tok.start[0])
            if owner is not None:  # trailing: `name: type = default  # comment`
                out[owner] = text
            else:
                block.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.line.strip().find(":") > 0:
            name = tok.string
            if block:
                out.setdefault(name, " ".join(block))
            block = []
            line_of_last_name[tok.start[0]] = name
        elif tok.type == tokenize.NL and not tok.line.strip():
            block = []
    return out


def _type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type(typing.get_args(tp)[0])}]"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return _type_name(tp)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return "null" if value is None else repr(value)


def _entry(tp: Any) -> type | None:
    """The dataclass of a `list[<dataclass>]` field, else None."""
    args = typing.get_args(tp) if typing.get_origin(tp) is list else ()
    return args[0] if args and dataclasses.is_dataclass(args[0]) else None


def _section(cls: type, path: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    nested = []
    lines += [f"## `{path}`", ""]
    doc = inspect.getdoc(cls)
    if doc and doc != inspect.getdoc(cls.__mro__[0]) and not doc.startswith(cls.__name__ + "("):
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{path}.{_key(f)}"))
            meaning = f"see [`{path}.{_key(f)}`](#{(path + '.' + _key(f)).replace('.', '')})"
        elif _entry(tp) is not None:  # a list of sections: its entries get a table
            sub = f"{path}.{_key(f)}[]"
            nested.append((_entry(tp), sub))
            anchor = sub.replace(".", "").replace("[]", "")
            meaning = f"{comments.get(f.name, '')}; each entry: see [`{sub}`](#{anchor})"
        else:
            meaning = comments.get(f.name, "")
        shown = "section" if dataclasses.is_dataclass(tp) else _type(tp)
        cells = [f"`{_key(f)}`", f"`{shown}`", f"`{_default(f)}`", meaning]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines.append("")
    for tp, sub in nested:
        _section(tp, sub, lines)


def render() -> str:
    """Markdown: one table per section of TrainConfig, nested sections after their parent."""
    lines: list[str] = []
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        _section(hints[f.name], _key(f), lines)
    return "\n".join(lines)
