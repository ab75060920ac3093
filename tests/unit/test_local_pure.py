import ipaddress

import pytest

from testbed.errors import ConfigError
from testbed.lab.local import Names, check_name, pick_subnet


def test_pick_subnet_avoids_used_networks():
    used = {ipaddress.ip_network("10.213.1.0/24"), ipaddress.ip_network("10.213.2.5/32")}
    assert pick_subnet(used) == ipaddress.ip_network("10.213.3.0/24")
    assert pick_subnet(set()) == ipaddress.ip_network("10.213.1.0/24")
    # a host route covering everything leaves nothing
    with pytest.raises(Exception, match="no free /24"):
        pick_subnet({ipaddress.ip_network("10.0.0.0/8")})


def test_names_are_exact_and_short_enough():
    n = Names("abcdefgh")
    assert all(len(x) <= 15 for x in (n.bridge, n.ifb, n.veth(64)))
    assert n.is_our_netns("tb-abcdefgh-d3") and not n.is_our_netns("tb-abcdefgh2-d3")
    assert Names("a").is_our_link("tb-a-1") and not Names("a").is_our_link("tb-ab-1")
    assert not Names("a").is_our_link("tb-a1")


@pytest.mark.parametrize("bad", ["", "Demo", "1abc", "toolongname", "a-b", "a b"])
def test_check_name_rejects(bad):
    with pytest.raises(ConfigError, match="--name"):
        check_name(bad)
