"""The quantities users type and read: ``100mbit``, ``10Gbit/s``, ``1ms``, ``0.4s``, ``1.3B`` (parsed) and
bytes, rates and durations (formatted for the console)."""

from __future__ import annotations

import math
import re

__all__ = [
    "format_bandwidth",
    "format_bytes",
    "format_seconds",
    "parse_bandwidth",
    "parse_count",
    "parse_duration",
]

_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def _finite(value: float, what: str, text: str) -> float:
    # 1e400 reads as inf: no quantity, and no figure can be computed from it
    if not math.isfinite(value):
        raise ValueError(f"{what} {text!r} is too large: expected a finite number")
    return value


def parse_bandwidth(text: str) -> float:
    """Bits per second from ``100mbit``, ``10gbit``, ``10Gbit/s``, ``1.25GB/s`` (bytes) or a plain
    number of bits per second. SI prefixes (k = 1000), as ``tc`` reads ``mbit``."""
    m = re.fullmatch(_NUMBER + r"([kKmMgGtT]?)(bit|bps|b|B)?(?:/s)?\s*", text)
    if not m or (m.group(3) is None and m.group(2)):
        raise ValueError(
            f"bandwidth {text!r}: expected a number and a unit such as 100mbit, 10gbit, 10Gbit/s "
            "or 1.25GB/s (bytes)"
        )
    value = float(m.group(1)) * _SI[m.group(2).lower()]
    return _finite(value * 8 if m.group(3) == "B" else value, "bandwidth", text)


def parse_duration(text: str) -> float:
    """Seconds from ``1ms``, ``50us``, ``0.4s``, ``2min`` or a plain number of seconds."""
    units = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "min": 60.0, "h": 3600.0}
    m = re.fullmatch(_NUMBER + r"([a-z]*)\s*", text)
    if not m or m.group(2) not in units:
        raise ValueError(f"duration {text!r}: expected a number with s, ms, us, min or h")
    return _finite(float(m.group(1)) * units[m.group(2)], "duration", text)


def parse_count(text: str) -> int:
    """An integer from ``1.3B``, ``350M``, ``25K`` or ``1300000`` (K = 1e3, M = 1e6, B = G = 1e9)."""
    m = re.fullmatch(_NUMBER + r"([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise ValueError(f"count {text!r}: expected a number with an optional K, M, B or T")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
    value = round(_finite(float(m.group(1)) * scale[m.group(2).lower()], "count", text))
    if value < 1:
        raise ValueError(f"count {text!r} must be >= 1")
    return value


def format_bytes(n: float) -> str:
    """``22752000`` -> ``"22.8 MB"`` (decimal units: kB, MB, GB, TB; 3 significant digits)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if abs(n) < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def format_bandwidth(bits_per_s: float) -> str:
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:.4g} {unit}"
    return f"{bits_per_s:.4g} bit/s"


def format_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    if s >= 60:
        return f"{s / 60:.3g} min"
    if s >= 1 or s == 0:
        return f"{s:.3g} s"
    return f"{s * 1e3:.3g} ms"
