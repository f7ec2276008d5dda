"""A Config from a TOML file plus `--section.field=value` overrides, and back to TOML."""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from triaxis.config.sections import SECTIONS, Config
from triaxis.errors import UserError, nearest
from triaxis.fields import check_fields

# ---------------------------------------------------------------------------------------------
# Loading: TOML file, then command-line overrides, each value coerced to the field's type.


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """cls's fields and their types (typing.get_type_hints, once per class: it compiles every
    string annotation again on each call, ~0.6 ms, and a config load sets dozens of fields)."""
    return typing.get_type_hints(cls)


def _coerce(section: str, name: str, raw: Any, hint: Any) -> Any:
    """Convert `raw` (TOML value or command-line string) to the field type `hint`."""
    where = f"{section}.{name}"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        return _coerce(section, name, raw, args[0])
    if origin is Literal:
        choices = list(typing.get_args(hint))
        if raw not in choices:
            raise UserError(f"{where}={raw!r} is not a valid choice; use one of {choices}")
        return raw
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{where}={raw!r} must be a boolean; use true or false")
    if hint in (int, float):
        if isinstance(raw, bool):
            raise UserError(f"{where}={raw!r} must be {hint.__name__}, not a boolean")
        if hint is int and isinstance(raw, float) and not math.isfinite(raw):
            # TOML's inf and nan are floats: int() of them overflows or fails.
            raise UserError(f"{where}={raw} must be a whole number (int); e.g. {where}=8")
        try:
            value = hint(raw)
        except (TypeError, ValueError):
            raise UserError(f"{where}={raw!r} must be {hint.__name__}; e.g. {where}=8") from None
        except OverflowError:  # float() of a TOML integer beyond a float's range
            digits = str(raw)
            raise UserError(
                f"{where}={digits[:12]}... ({len(digits)} digits) is too large for a float; "
                "give a number below 1e308"
            ) from None
        if hint is int and isinstance(raw, float) and raw != value:
            raise UserError(f"{where}={raw!r} must be a whole number")
        return value
    if origin is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        return _coerce_tables(where, raw, typing.get_args(hint)[0])
    if hint is str:
        if not isinstance(raw, str):
            raise UserError(f'{where}={raw!r} must be a string; quote it in TOML: {name} = "..."')
        return raw
    raise AssertionError(f"unsupported config type {hint} for {where}")


def _coerce_tables(where: str, raw: Any, cls: type) -> list:
    """A TOML array of tables (`[[data.sources]]`) -> a list of `cls`, each key checked."""
    example = f'[[{where}]] tables in the TOML config file, e.g. [[{where}]] path = "data/web"'
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise UserError(f"{where}={raw!r} must be given as {example}")
    if not raw:
        raise UserError(f"{where} is an empty list; give one or more {example}, or drop it")
    hints = field_types(cls)
    items = []
    for i, table in enumerate(raw):
        item = cls()
        for key, value in table.items():
            if key not in hints:
                hint = nearest(key, list(hints))
                fix = f"did you mean {hint}?" if hint else f"valid keys: {sorted(hints)}"
                raise UserError(f"unknown key {where}[{i}].{key}; {fix}")
            setattr(item, key, _coerce(f"{where}[{i}]", key, value, hints[key]))
        items.append(item)
    return items


def _set(cfg: Config, section: str, name: str, raw: Any) -> None:
    if section not in SECTIONS:
        hint = nearest(section, list(SECTIONS))
        fix = f"did you mean [{hint}]?" if hint else f"sections are {list(SECTIONS)}"
        raise UserError(f"unknown config section [{section}]; {fix}")
    cls = SECTIONS[section]
    hints = field_types(cls)
    if name not in hints:
        hint = nearest(name, list(hints))
        fix = f"did you mean {section}.{hint}?" if hint else f"valid keys: {sorted(hints)}"
        raise UserError(f"unknown config key {section}.{name}; {fix}")
    setattr(getattr(cfg, section), name, _coerce(section, name, raw, hints[name]))


def parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    """`--section.field=value` or `--section.field value` -> [(section, field, value)]."""
    out: list[tuple[str, str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(
                f"unexpected argument {arg!r}; overrides look like --section.field=value, "
                "e.g. --train.steps=100"
            )
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise UserError(f"override {arg!r} has no value; write {arg}=VALUE")
            value = args[i + 1]
            i += 1
        section, _, name = key.partition(".")
        out.append((section, name.replace("-", "_"), value))
        i += 1
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- TOML file <- command-line overrides, each field checked against its own
    rules; the rules between fields are `validate`'s."""
    cfg = Config()
    given: set[tuple[str, str]] = set()  # (section, key) set by the file or an override
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path} does not exist; pass an existing .toml file")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(
                f"config file {path} is not UTF-8 text (byte {e.start}); pass a .toml file"
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise UserError(f"{path}: top-level key {section!r} must be a [section] table")
            for name, raw in values.items():
                _set(cfg, section, name, raw)
                given.add((section, name))
    for section, name, raw in parse_overrides(overrides or []):
        _set(cfg, section, name, raw)
        given.add((section, name))
    if cfg.data.sources and ("data", "path") in given:
        raise UserError(
            f"data.path={cfg.data.path!r} and data.sources are both set; a mixture reads only "
            "its [[data.sources]]: drop data.path (or drop data.sources for one source)"
        )
    check_config(cfg)  # each field's own rules now, before anything is touched
    return cfg


def check_config(cfg: Config) -> None:
    """Every field against its own rules (range, finite, 64-bit, no control characters)."""
    for section in SECTIONS:
        check_fields(getattr(cfg, section), section)
    labels: dict[str, int] = {}
    for i, src in enumerate(cfg.data.sources):
        where = f"data.sources[{i}]"
        if not src.path:
            raise UserError(f'{where} has no path; set path = "FOLDER or s3://PREFIX" in it')
        if src.label() in labels:
            raise UserError(
                f"{where} and data.sources[{labels[src.label()]}] are both named "
                f'{src.label()!r} in metrics; give one of them another name = "..."'
            )
        labels[src.label()] = i


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (None values are left out: they mean 'from the preset')."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        tables: list[tuple[str, dict]] = []  # arrays of tables come after the plain keys
        if section == "data" and values["sources"]:
            del values["path"]  # a mixture reads only its sources (load_config refuses both)
        if section == "checkpoint" and not values["memory_interval"]:
            # Without the memory tier a run writes the very files it wrote before the tier
            # existed (its config.toml, each manifest's config): the tier's fields stay out.
            values = {k: v for k, v in values.items() if not k.startswith("memory_")}
        for k, v in values.items():
            if isinstance(v, list):
                tables += [(f"{section}.{k}", t) for t in v]
            elif v is not None:
                lines.append(_toml_pair(k, v))
        lines.append("")
        for name, table in tables:
            lines.append(f"[[{name}]]")
            lines += [_toml_pair(k, v) for k, v in table.items() if v is not None]
            lines.append("")
    return "\n".join(lines)


def _toml_pair(k: str, v: Any) -> str:
    if isinstance(v, bool):
        return f"{k} = {'true' if v else 'false'}"
    return f"{k} = {_toml_str(v) if isinstance(v, str) else repr(v)}"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass, read from its source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                docs[prev.target.id] = node.value.value  # type: ignore[attr-defined]
    return docs


def split_config_args(rest: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.toml] [--section.field=value ...]` -> (the file or None, the overrides): the
    arguments `triaxis train` and `triaxis launch` pass on."""
    if rest and not rest[0].startswith("--"):
        return rest[0], rest[1:]
    return None, rest
