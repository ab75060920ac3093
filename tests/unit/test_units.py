import pytest

from testbed.units import format_rate, parse_percent, parse_rate_kbit, parse_time_ms


@pytest.mark.parametrize(
    "text,kbit",
    [
        ("20mbit", 20000),
        ("500kbit", 500),
        ("1gbit", 1e6),
        ("8", 8000),
        ("2.5mbit", 2500),
        ("1mbps", 8000),
        ("100bit", 0.1),
        (" 8MBIT ", 8000),
    ],
)
def test_parse_rate(text, kbit):
    assert parse_rate_kbit(text) == pytest.approx(kbit)


@pytest.mark.parametrize("text", ["", "fast", "-1mbit", "0mbit", "10parsecs", "1.2.3mbit"])
def test_parse_rate_rejects(text):
    with pytest.raises(ValueError):
        parse_rate_kbit(text)


@pytest.mark.parametrize("text,ms", [("5ms", 5), ("200us", 0.2), ("1.5s", 1500), ("7", 7)])
def test_parse_time(text, ms):
    assert parse_time_ms(text) == pytest.approx(ms)


def test_parse_percent_and_format():
    assert parse_percent("0.5%") == 0.5
    with pytest.raises(ValueError):
        parse_percent("150%")
    assert format_rate(8000) == "8000kbit"
    assert format_rate(1999.6) == "2000kbit"
