"""The recipe reference (docs/recipe.md), written from the schema itself: every key with its type, true default,
allowed values and description, so the document cannot drift from what `finetune validate` accepts.

    python -m finetune.recipe.reference            # writes docs/recipe.md
    python -m finetune.recipe.reference --stdout   # prints it
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from finetune.recipe.schema import Recipe

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipe.md"
COMMAND = "python -m finetune.recipe.reference"

INTRO = f"""# Recipe reference

<!-- Generated from finetune/recipe/schema.py by `{COMMAND}`; edit the schema, not this file. -->

A recipe is a YAML file of sections; any key can also be set on the command line as `section.key=value`
(the value is read as YAML). `finetune validate RECIPE` checks every key below, and `finetune run` refuses the
same mistakes with the same words (exit 2) before it loads any weights.

- Numbers refuse booleans: YAML reads an unquoted `yes`/`no`, `on`/`off`, `true`/`false` as a boolean, and a
  boolean is never taken for 1 or 0. Switches (boolean keys) take only `true` or `false`, never 1 or 0.
- Every number must be finite: `.inf`, `.nan` and their spellings are refused.
- A number may be written as text (`lr: 1e-3` is text to YAML, which needs `1.0e-3` for a float); it must still
  lie in the allowed range.
- Allowed ranges: `[a, b]` includes both ends, `(a, b)` neither; `>= a` and `> a` have no upper bound.
"""


def render() -> str:
    """docs/recipe.md: the top level, then each section and its subsections, in the schema's order."""
    parts = [INTRO, "## Top level\n", _table(Recipe, "")]
    for name, section in _sections(Recipe, ""):
        parts += [f"{'#' * min(2 + name.count('.'), 4)} {name}\n", _table(section, f"{name}.")]
    return "\n".join(parts)


def write(path: Path = DOC) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the parts


def _sections(model: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel]]]:
    """Every section below `model`, depth first: (dotted name, model)."""
    found = []
    for key, field in model.model_fields.items():
        section = _section_of(field.annotation)
        if section is not None:
            name = f"{prefix}{key}"
            found.append((name, section))
            found += _sections(section, f"{name}.")
    return found


def _section_of(annotation: Any) -> type[BaseModel] | None:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _table(model: type[BaseModel], prefix: str) -> str:
    rows = ["| Key | Type | Default | Allowed | Description |", "| --- | --- | --- | --- | --- |"]
    for key, field in model.model_fields.items():
        section = _section_of(field.annotation)
        if section is not None:
            name = f"{prefix}{key}"
            kind = f"section ([{name}](#{name.replace('.', '')}))"
            if type(None) in _members(field.annotation):
                kind += " or null"
        else:
            kind = _type_name(field.annotation)
        cells = [f"`{key}`", kind, _default(field), _allowed(field), _text(field.description or "")]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (Annotated unwrapped), or the annotation alone."""
    annotation = _unwrap(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _type_name(annotation: Any) -> str:
    members = _members(annotation)
    choices_only = all(get_origin(m) is Literal or m is type(None) for m in members)
    names: list[str] = []
    for member in members:
        if member is type(None):
            name = "null"
        elif get_origin(member) is Literal:  # a choice, or the words a number may be replaced by
            name = "choice" if choices_only else " or ".join(f"`{_yaml(a)}`" for a in get_args(member))
        elif get_origin(member) is list:
            name = f"list of {_inner(get_args(member)[0])}"
        elif get_origin(member) is dict:
            name = f"mapping of {_inner(get_args(member)[0])} to {_inner(get_args(member)[1])}"
        else:
            name = {int: "integer", float: "number", bool: "boolean", str: "text"}.get(member, str(member))
        if name not in names:
            names.append(name)
    if "null" in names:  # "or null" last
        names.remove("null")
        names.append("null")
    return " or ".join(names)


def _inner(annotation: Any) -> str:
    name = _type_name(annotation)
    return f"({name})" if " or " in name else name


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(the section's defaults)"
    else:
        value = field.default
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return f"{value:.1f}"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _allowed(field: FieldInfo) -> str:
    """The range of a number (from the schema's own constraints) and the choices of a choice."""
    parts: list[str] = []
    choices = [
        arg for member in _members(field.annotation) if get_origin(member) is Literal for arg in get_args(member)
    ]
    bounds = _bounds(field)
    if bounds:
        parts.append(bounds)
    if choices:
        parts.append(", ".join(f"`{_yaml(c)}`" for c in choices))
    element = _unwrap(field.annotation)
    if get_origin(element) is list:  # e.g. report_to: a list of choices
        inner = [arg for m in _members(get_args(element)[0]) if get_origin(m) is Literal for arg in get_args(m)]
        if inner:
            parts.append("each of " + ", ".join(f"`{_yaml(c)}`" for c in inner))
    return "; ".join(parts)


def _bounds(field: FieldInfo) -> str:
    constraints = list(field.metadata)
    for member in _annotated_parts(field.annotation):
        constraints += member
    low: Any = None
    high: Any = None
    low_open = high_open = False
    for item in constraints:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low, low_open = item.gt, True
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high, high_open = item.lt, True
    if low is None and high is None:
        return ""
    if high is None:
        return f"{'>' if low_open else '>='} {_number(low)}"
    if low is None:
        return f"{'<' if high_open else '<='} {_number(high)}"
    return f"{'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}"


def _annotated_parts(annotation: Any) -> list[list[Any]]:
    """The constraints written inside the annotation (`Annotated[int, Field(ge=1)] | Literal[...]`)."""
    found: list[list[Any]] = []
    if get_origin(annotation) is Annotated:
        inner, *extras = get_args(annotation)
        found.append([m for extra in extras for m in (extra.metadata if isinstance(extra, FieldInfo) else [extra])])
        found += _annotated_parts(inner)
    elif get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            found += _annotated_parts(arg)
    return found


def _number(value: Any) -> str:
    """A bound as written in the schema: powers of two stay powers of two."""
    if isinstance(value, int) and value >= 2**16:
        for power in range(16, 129):
            if value == 2**power:
                return f"2**{power}"
            if value == 2**power - 1:
                return f"2**{power} - 1"
    if isinstance(value, int | float) and value >= 10**6 and value == 10 ** round(math.log10(value)):
        return f"10**{round(math.log10(value))}"
    return str(value)


def _text(description: str) -> str:
    return description.replace("<", "&lt;")


def main(argv: list[str]) -> int:
    if "--stdout" in argv:
        sys.stdout.write(render())
    else:
        print(f"wrote {write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
