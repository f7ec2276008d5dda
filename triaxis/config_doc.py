"""The configuration reference, generated from the config dataclasses themselves.

One definition: each field's default, its allowed values (a `ranged` field's Range, a Literal's
choices) and its attribute docstring (`config.field_docs`) are read from `config/sections.py`, so
`triaxis config --fields` (plain text) and docs/config.md (`triaxis config --markdown`) can
never disagree with the code. tests/test_docs.py checks that docs/config.md is current.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from triaxis.config import SECTIONS, Config, field_docs
from triaxis.config.load import field_types
from triaxis.fields import RANGE

REGENERATE = "python -m triaxis config --markdown > docs/config.md"
"""The command that writes docs/config.md (named by the test that checks it is current)."""


@dataclass(frozen=True)
class FieldDoc:
    """One documented config field."""

    name: str
    default: Any
    allowed: str
    """The rule on its values in words ('>= 1', 'one of ...'), or '' when any value of its type
    goes."""
    doc: str
    """Its docstring, whitespace collapsed to one paragraph."""


def _allowed(f: dataclasses.Field, hint: Any) -> str:
    rule = f.metadata.get(RANGE)
    if rule is not None:
        return rule.describe()
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(hint))
    for a in args:  # Optional[Literal[...]]
        if typing.get_origin(a) is Literal:
            return "one of " + ", ".join(str(x) for x in typing.get_args(a))
    return ""


def section_fields(section: str) -> list[FieldDoc]:
    """Every field of one config section, in declaration order."""
    return _fields_of(SECTIONS[section], getattr(Config(), section))


def _fields_of(cls: type, defaults: Any) -> list[FieldDoc]:
    hints = field_types(cls)
    docs = field_docs(cls)
    return [
        FieldDoc(
            f.name,
            getattr(defaults, f.name),
            _allowed(f, hints[f.name]),
            " ".join(docs.get(f.name, "").split()),
        )
        for f in dataclasses.fields(cls)
    ]


def table_arrays(section: str) -> list[tuple[str, list[FieldDoc]]]:
    """The section's arrays of tables (`[[data.sources]]`): (their name, their fields)."""
    out = []
    for name, hint in field_types(SECTIONS[section]).items():
        args = typing.get_args(hint)
        if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            out.append((f"{section}.{name}", _fields_of(args[0], args[0]())))
    return out


def fields_text() -> str:
    """Every section and field as plain text (`triaxis config --fields`)."""
    lines: list[str] = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for fd in section_fields(section):
            rule = f" [{fd.allowed}]" if fd.allowed else ""
            lines.append(f"  {fd.name} = {fd.default!r}{rule}\n      {fd.doc}")
        for name, fds in table_arrays(section):
            lines.append(f"[[{name}]]")
            for fd in fds:
                rule = f" [{fd.allowed}]" if fd.allowed else ""
                lines.append(f"  {fd.name} = {fd.default!r}{rule}\n      {fd.doc}")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if isinstance(v, str):
        return f'`"{v}"`'
    return f"`{v!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(fd: FieldDoc) -> str:
    return f"| `{fd.name}` | {_toml_value(fd.default)} | {_cell(fd.allowed)} | {_cell(fd.doc)} |"


def fields_markdown() -> str:
    """docs/config.md: every section and field with its default, allowed values and meaning."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from triaxis/config/sections.py by `{REGENERATE}`; do not edit. -->",
        "",
        "Every field of every section, its default, the values it accepts and what it means,",
        "read from the config dataclasses in `triaxis/config/sections.py` (`triaxis config",
        "--fields` prints the same). Set a field in a TOML file under its `[section]` table or on",
        "the command line as `--section.field=value`; the resolved config is written to",
        "`RUN_DIR/config.toml`.",
        '"unset" means the value comes from elsewhere (the preset, the data), as the field says.',
        "Besides the rule shown, every number must be finite and fit in 64 bits, and every string",
        "must be free of control characters ([bad-input.md](bad-input.md)).",
    ]
    for section in SECTIONS:
        out += [
            "",
            f"## [{section}]",
            "",
            "| key | default | allowed | meaning |",
            "|---|---|---|---|",
        ]
        out += [_row(fd) for fd in section_fields(section)]
        for name, fds in table_arrays(section):
            out += ["", f"### [[{name}]]", "", "| key | default | allowed | meaning |"]
            out += ["|---|---|---|---|", *(_row(fd) for fd in fds)]
    return "\n".join(out) + "\n"
