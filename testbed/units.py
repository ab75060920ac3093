"""Parsing of human strings ("20mbit", "5ms", "0.5%") — only at CLI and file edges.

Inside the code every quantity carries its unit in its name (``rate_kbit``, ``delay_ms``).
"""

from __future__ import annotations

import re

_RATE_UNITS = {  # multiplier to kbit/s; tc's units (bit = bit/s, bps = bytes/s)
    "bit": 1e-3,
    "kbit": 1.0,
    "mbit": 1e3,
    "gbit": 1e6,
    "bps": 8e-3,
    "kbps": 8.0,
    "mbps": 8e3,
    "gbps": 8e6,
}
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"


def parse_rate_kbit(text: str) -> float:
    """Parse a tc-style rate ("20mbit", "500kbit", "1gbit", "2.5mbps") into kbit/s.

    A bare number is read as mbit, the unit researchers quote most.
    """
    m = re.fullmatch(_NUM + r"\s*([a-z]*)", text.strip().lower())
    if not m:
        raise ValueError(f"not a rate: {text!r} (expected e.g. 20mbit, 500kbit, 1gbit)")
    unit = m.group(2) or "mbit"
    if unit not in _RATE_UNITS:
        raise ValueError(f"unknown rate unit {unit!r} in {text!r} (use {', '.join(_RATE_UNITS)})")
    value = float(m.group(1)) * _RATE_UNITS[unit]
    if value <= 0:
        raise ValueError(f"rate must be positive: {text!r}")
    return value


def parse_time_ms(text: str) -> float:
    """Parse "5ms", "200us", "1.5s" into milliseconds (a bare number is ms)."""
    m = re.fullmatch(_NUM + r"\s*([a-z]*)", text.strip().lower())
    if not m or (m.group(2) or "ms") not in _TIME_UNITS:
        raise ValueError(f"not a time: {text!r} (expected e.g. 5ms, 200us, 1s)")
    return float(m.group(1)) * _TIME_UNITS[m.group(2) or "ms"]


def parse_percent(text: str) -> float:
    """Parse "0.5%" (or "0.5") into percent, 0..100."""
    m = re.fullmatch(_NUM + r"\s*%?", text.strip())
    if not m:
        raise ValueError(f"not a percentage: {text!r} (expected e.g. 0.5%)")
    value = float(m.group(1))
    if not 0 <= value <= 100:
        raise ValueError(f"percentage out of range 0..100: {text!r}")
    return value


def format_rate(rate_kbit: float) -> str:
    """Render kbit/s the way tc accepts it, exactly (integer kbit)."""
    return f"{int(round(rate_kbit))}kbit"
