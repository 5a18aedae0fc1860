"""Byte sizes as people type them, and as tables show them.

``parse_size`` reads ``"16GiB"``, ``"16G"``, ``"512MB"``, ``"1.5TB"``, ``"1048576"`` or
``"16 gib"`` and returns a whole number of bytes.  The unit rules:

- ``KiB MiB GiB TiB PiB`` (and ``Ki Mi Gi ...``) are binary: powers of 1024.
- bare ``K M G T P`` are **binary** too, as in most command-line tools (``free -g``,
  ``ulimit``, ``docker --memory``, ``sort -S``, Java ``-Xmx``): people who type
  ``--cpu-mem 16G`` mean the 16 GiB their machine reports.
- ``KB MB GB TB PB`` are decimal: powers of 1000, as the SI prefixes (and disk vendors)
  mean them.
- ``B`` or no unit: bytes.

Case is ignored (``gib`` == ``GiB``; ``Gb`` means gigabytes, never gigabits), a space may
separate number and unit, and a fractional result is rounded down to whole bytes.

``format_size`` always uses binary units with two decimals (``"1.50 GiB"``) so the
columns of a table line up and compare at a glance.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from flexgraph.errors import FlexgraphError

_BINARY = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_DECIMAL = {"k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "p": 1000**5}

# number (no sign, no exponent: "1e9" is more likely a typo than a size), then a unit.
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)

_EXAMPLE = "e.g. '16GiB', '512MB' or '1048576'"


def _multiplier(unit: str) -> int | None:
    """Bytes per ``unit`` (already lower-cased), or None when it is not a size unit."""
    if unit in ("", "b"):
        return 1
    prefix, rest = unit[0], unit[1:]
    if rest in ("", "i", "ib"):       # K, Ki, KiB: binary (bare letter: CLI convention)
        return _BINARY.get(prefix)
    if rest == "b":                   # KB: decimal (SI)
        return _DECIMAL.get(prefix)
    return None


def parse_size(value: str | int) -> int:
    """Bytes in ``value`` (``"16GiB"``, ``"16G"``, ``"512MB"``, ``"1.5TB"``, ``"1048576"``
    or an int).  Raises a one-line ``FlexgraphError`` naming the bad value otherwise."""
    if isinstance(value, bool):       # bool is an int subclass; True bytes is a bug
        raise FlexgraphError(f"bad size {value!r}: expected a byte count, {_EXAMPLE}")
    if isinstance(value, int):
        if value < 0:
            raise FlexgraphError(f"bad size {value!r}: must not be negative, {_EXAMPLE}")
        return value
    m = _SIZE_RE.match(str(value))
    mult = _multiplier(m.group(2).lower()) if m else None
    if m is None or mult is None:
        raise FlexgraphError(f"bad size {value!r}: expected a number with an optional unit, {_EXAMPLE}")
    try:
        # Decimal keeps "1.5TB" exact (float would give 1499999999999.9998).
        return int(Decimal(m.group(1)) * mult)
    except InvalidOperation:          # pragma: no cover - the regex only admits valid numbers
        raise FlexgraphError(f"bad size {value!r}: expected a number with an optional unit, {_EXAMPLE}")


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(n: int | float) -> str:
    """``1610612736`` -> ``"1.50 GiB"``; below 1 KiB plain bytes (``"512 B"``)."""
    sign, x = ("-", -n) if n < 0 else ("", n)
    if x < 1024:
        return f"{sign}{int(x)} B"
    i = 0
    while x >= 1024 and i < len(_UNITS) - 1:
        x /= 1024
        i += 1
    return f"{sign}{x:.2f} {_UNITS[i]}"
