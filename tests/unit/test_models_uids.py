"""Expert uid formatting/parsing is strict and round-trips."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.uids import ExpertUid, format_uid, is_uid, parse_uid


@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_roundtrip(layer: int, expert: int) -> None:
    uid = format_uid(layer, expert)
    assert uid == f"L{layer}.E{expert}"
    assert parse_uid(uid) == ExpertUid(layer, expert)
    assert str(parse_uid(uid)) == uid
    assert is_uid(uid)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "L0E1",
        "l0.e1",
        "L01.E1",
        "L0.E01",
        "L-1.E0",
        "L0.E-1",
        " L0.E1",
        "L0.E1 ",
        "L0.E1.W1",
        "L.E1",
        "L1.E",
        "L0.E1\n",
        "L٣.E1",
    ],
)
def test_parse_rejects(bad: str) -> None:
    assert not is_uid(bad)
    with pytest.raises(ValueError, match="expert uid"):
        parse_uid(bad)


@pytest.mark.parametrize("layer,expert", [(-1, 0), (0, -2), (True, 0), (0, 1.0), ("0", 1)])
def test_format_rejects(layer: object, expert: object) -> None:
    with pytest.raises(ValueError):
        format_uid(layer, expert)  # type: ignore[arg-type]
