"""Value rules that live in a field's own definition, checked in one pass at the edge.

A dataclass field states its allowed range where it is declared:

    lr: float = ranged(1e-3, gt=0, le=10)
    \"\"\"Peak learning rate of AdamW.\"\"\"

and `check_fields(obj, prefix)` enforces, for every field of every such dataclass (config
sections, prepare options), before any file, bucket or process group is touched:

- the field's own range, when it declares one (`ranged`);
- floats are finite (NaN and infinity are never a meaningful setting);
- ints fit in 64 bits (they end up in numpy and torch);
- strings hold no control characters (newline, carriage return, NUL, ...): they are paths and
  names that reach scripts, file systems and log lines.

A field declared the plain way (`steps: int = 200`) still gets the generic rules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from triaxis.errors import UserError

RANGE = "range"
"""Key of a field's metadata that holds its Range."""


@dataclass(frozen=True)
class Range:
    """Bounds of a number: each None bound is open-ended."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, v: float) -> bool:
        return (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    def describe(self) -> str:
        parts = [
            f"{op} {_num(b)}"
            for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if b is not None
        ]
        return " and ".join(parts)


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def ranged(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with a default and an allowed range (see the module docstring)."""
    return dataclasses.field(default=default, metadata={RANGE: Range(ge=ge, gt=gt, le=le, lt=lt)})


_INT64 = 2**63


def control_char(text: str) -> str | None:
    """The first control character of `text` (C0, DEL, C1, line/paragraph separators), or None."""
    for ch in text:
        o = ord(ch)
        if o < 32 or 0x7F <= o <= 0x9F or ch in "\u2028\u2029":
            return ch
    return None


def check_value(where: str, value: Any, rule: Range | None = None, fix: str = "") -> None:
    """Raise UserError (one line: the value, the rule, the fix) if `value` breaks a rule."""
    tail = f"; {fix}" if fix else ""
    if isinstance(value, bool) or value is None:
        return
    # A command-line option reads `--top-k -1`, a config field `train.lr=nan`.
    shown = (
        f"{where} {value!r}"
        if where.startswith("--") and isinstance(value, str)
        else f"{where} {value}"
        if where.startswith("--")
        else f"{where}={value}"
    )
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(
            f"{shown} must be a finite number" + (f" ({rule.describe()})" if rule else "") + tail
        )
    if isinstance(value, int) and not -_INT64 <= value < _INT64:
        raise UserError(
            f"{shown} is too large: it must fit in 64 bits"
            + (f" and be {rule.describe()}" if rule else "")
            + tail
        )
    if isinstance(value, (int, float)) and rule is not None and not rule.admits(value):
        raise UserError(f"{shown} must be {rule.describe()}{tail}")
    if isinstance(value, str):
        ch = control_char(value)
        if ch is not None:
            shown = f"{where} {value!r}" if where.startswith("--") else f"{where}={value!r}"
            raise UserError(
                f"{shown} holds the control character {ch!r}; paths and "
                "names must be printable text: remove it"
            )


def check_fields(obj: Any, prefix: str) -> None:
    """check_value for every field of the dataclass `obj`, named `prefix.field`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        where = f"{prefix}.{f.name}" if prefix else f.name
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):  # a table of an array ([[data.sources]])
                    check_fields(item, f"{where}[{i}]")
                else:
                    check_value(where, item, f.metadata.get(RANGE))
        else:
            check_value(where, value, f.metadata.get(RANGE))
