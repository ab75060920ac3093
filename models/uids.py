"""Expert uids: the strings ``L{layer}.E{expert}`` naming one routed expert of one MoE layer.

Uids are the keys of the split manifest, of the expert-backend requests and of the results
CSVs. The format is strict: decimal integers without sign, spaces or leading zeros
(``L0.E7``, ``L31.E0``; not ``L01.E7``, ``l0.e7`` or ``L0.E-1``).
"""

from __future__ import annotations

import re
from typing import NamedTuple

_UID_RE = re.compile(r"L(0|[1-9][0-9]*)\.E(0|[1-9][0-9]*)")


class ExpertUid(NamedTuple):
    """A parsed expert uid."""

    layer: int
    expert: int

    def __str__(self) -> str:
        return format_uid(self.layer, self.expert)


def format_uid(layer: int, expert: int) -> str:
    """Format ``(layer, expert)`` as ``"L{layer}.E{expert}"``.

    Raises
    ------
    ValueError
        If either index is not a non-negative ``int`` (``bool`` is rejected too).
    """
    for name, v in (("layer", layer), ("expert", expert)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
    return f"L{layer}.E{expert}"


def parse_uid(uid: str) -> ExpertUid:
    """Parse ``"L{layer}.E{expert}"`` strictly.

    Raises
    ------
    ValueError
        If ``uid`` is not exactly of that form.
    """
    if not isinstance(uid, str):
        raise ValueError(f"expert uid: expected a string like 'L0.E3', got {uid!r}")
    m = _UID_RE.fullmatch(uid)
    if m is None:
        raise ValueError(
            f"expert uid: {uid!r} is not of the form 'L<layer>.E<expert>' (e.g. 'L0.E3')"
        )
    return ExpertUid(int(m.group(1)), int(m.group(2)))


def is_uid(uid: object) -> bool:
    """True iff ``uid`` is a well-formed expert uid string."""
    return isinstance(uid, str) and _UID_RE.fullmatch(uid) is not None
