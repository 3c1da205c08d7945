"""The per-flow locator policy: which rule a flow falls under, and which local
address that rule picks among the working ones."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from ihmp.addr import IPAddress
from stacktrans.policy import Policy, Rule, choose, parse_address, rank
from stacktrans.socket_table import TCP, UDP, FlowKey


def a(text: str) -> IPAddress:
    return ip_address(text)


def flow(
    remote: str = "192.0.2.7", rport: int = 22, lport: int = 40000, proto: int = TCP
) -> FlowKey:
    local = "10.0.1.1" if a(remote).version == 4 else "2001:db8:1::1"
    return FlowKey(proto, a(local), lport, a(remote), rport)


# -- matching ---------------------------------------------------------------------------


def test_a_rule_without_match_fields_matches_every_flow() -> None:
    rule = Rule(0, via=("m1",))
    assert rule.matches(flow())
    assert rule.matches(flow("2001:db8::7", 443, 1, UDP))


def test_proto_must_match() -> None:
    rule = Rule(0, proto=UDP, via=("m1",))
    assert rule.matches(flow(proto=UDP))
    assert not rule.matches(flow(proto=TCP))


@pytest.mark.parametrize(
    ("prefix", "inside", "outside"),
    [
        ("192.0.2.0/24", "192.0.2.200", "192.0.3.1"),
        ("192.0.2.7/32", "192.0.2.7", "192.0.2.8"),
        ("2001:db8:aa::/48", "2001:db8:aa:ff::1", "2001:db8:ab::1"),
    ],
)
def test_remote_prefix(prefix: str, inside: str, outside: str) -> None:
    rule = Rule(0, remote=ip_network(prefix), via=("m1",))
    assert rule.matches(flow(inside))
    assert not rule.matches(flow(outside))


def test_a_remote_of_the_other_family_does_not_match() -> None:
    assert not Rule(0, remote=ip_network("0.0.0.0/0"), via=("m1",)).matches(flow("2001:db8::7"))
    assert not Rule(0, remote=ip_network("::/0"), via=("m1",)).matches(flow("192.0.2.7"))


def test_ports_must_match() -> None:
    rule = Rule(0, remote_port=22, local_port=5001, via=("m1",))
    assert rule.matches(flow(rport=22, lport=5001))
    assert not rule.matches(flow(rport=23, lport=5001))
    assert not rule.matches(flow(rport=22, lport=5002))
    # The ports are not interchangeable.
    assert not rule.matches(flow(rport=5001, lport=22))


def test_the_first_matching_rule_wins() -> None:
    ssh = Rule(0, proto=TCP, remote_port=22, via=("m1",))
    lab = Rule(1, remote=ip_network("192.0.2.0/24"), via=("m2",))
    rest = Rule(2, via=("m3",))
    policy = Policy((ssh, lab, rest))
    assert policy.rule_for(flow("192.0.2.7", 22)) is ssh
    assert policy.rule_for(flow("192.0.2.7", 80)) is lab
    assert policy.rule_for(flow("198.51.100.1", 80)) is rest
    assert Policy((ssh, lab)).rule_for(flow("198.51.100.1", 80)) is None
    assert Policy().rule_for(flow()) is None


# -- interfaces -------------------------------------------------------------------------


def test_interface_names_leave_out_addresses() -> None:
    policy = Policy(
        (
            Rule(0, via=("m1", "10.0.2.1"), backup=("m3",)),
            Rule(1, via=("2001:db8:1::1", "m1", "wlan0")),
        )
    )
    assert policy.interface_names() == {"m1", "m3", "wlan0"}


def test_check_interfaces_names_the_first_unknown_one() -> None:
    policy = Policy((Rule(0, via=("m1", "10.0.2.1")), Rule(1, via=("m2",), backup=("m9",))))
    policy.check_interfaces({"m1", "m2", "m9"})  # addresses need not be interfaces
    with pytest.raises(ValueError, match=r"^policy\[1\]\.backup: no interface 'm9'$"):
        policy.check_interfaces({"m1", "m2"})
    with pytest.raises(ValueError, match=r"^policy\[1\]\.via: no interface 'm2'$"):
        policy.check_interfaces({"m1"})
    with pytest.raises(ValueError, match=r"^policy\[0\]\.via: no interface 'm1'$"):
        policy.check_interfaces(set())


def test_parse_address_tells_addresses_from_names() -> None:
    assert parse_address("10.0.2.1") == a("10.0.2.1")
    assert parse_address("2001:db8::1") == a("2001:db8::1")
    assert parse_address("eth0") is None
    assert parse_address("1234") is None


# -- choosing a locator -----------------------------------------------------------------

WORKING: dict[IPAddress, str] = {
    a("10.0.1.1"): "m1",
    a("10.0.1.9"): "m1",
    a("10.0.1.5"): "m1",
    a("2001:db8:1::1"): "m1",
    a("10.0.2.1"): "m2",
    a("2001:db8:2::1"): "m2",
    a("10.0.3.1"): "m3",
}
LIKE4 = a("10.0.2.1")
LIKE6 = a("2001:db8:2::1")


def test_via_order_wins() -> None:
    assert choose(Rule(0, via=("m2", "m1")), WORKING, LIKE4, None) == a("10.0.2.1")
    assert choose(Rule(0, via=("m1", "m2")), WORKING, LIKE4, None) == a("10.0.1.1")


def test_an_interface_offers_like_first_then_addresses_in_order() -> None:
    rule = Rule(0, via=("m1",))
    assert rank(rule, WORKING, LIKE4) == [a("10.0.1.1"), a("10.0.1.5"), a("10.0.1.9")]
    assert rank(rule, WORKING, a("10.0.1.9")) == [a("10.0.1.9"), a("10.0.1.1"), a("10.0.1.5")]
    assert choose(rule, WORKING, a("10.0.1.9"), None) == a("10.0.1.9")


def test_an_address_entry_counts_only_while_it_works() -> None:
    rule = Rule(0, via=("10.0.1.9", "m2"))
    assert choose(rule, WORKING, LIKE4, None) == a("10.0.1.9")
    gone = {k: v for k, v in WORKING.items() if k != a("10.0.1.9")}
    assert choose(rule, gone, LIKE4, None) == a("10.0.2.1")


def test_an_address_listed_twice_is_ranked_once_at_its_best_place() -> None:
    rule = Rule(0, via=("10.0.1.5", "m1"))
    assert rank(rule, WORKING, LIKE4) == [a("10.0.1.5"), a("10.0.1.1"), a("10.0.1.9")]


def test_backup_only_when_nothing_in_via_works() -> None:
    rule = Rule(0, via=("m1", "m2"), backup=("m3",))
    assert choose(rule, WORKING, LIKE4, None) == a("10.0.1.1")
    only_m2_m3 = {k: v for k, v in WORKING.items() if v != "m1"}
    assert choose(rule, only_m2_m3, LIKE4, None) == a("10.0.2.1")
    only_m3 = {k: v for k, v in WORKING.items() if v == "m3"}
    assert choose(rule, only_m3, LIKE4, None) == a("10.0.3.1")
    assert rank(rule, WORKING, LIKE4)[-1] == a("10.0.3.1")  # backup after all of via


def test_none_when_nothing_in_via_or_backup_works() -> None:
    rule = Rule(0, via=("m9", "10.0.9.9"), backup=("m8",))
    assert choose(rule, WORKING, LIKE4, None) is None
    assert choose(Rule(0, via=("m1",)), {}, LIKE4, None) is None


def test_only_addresses_of_the_flows_family_count() -> None:
    rule = Rule(0, via=("m3", "m1"))
    assert choose(rule, WORKING, LIKE4, None) == a("10.0.3.1")
    # m3 has no IPv6 address: an IPv6 flow goes to m1.
    assert choose(rule, WORKING, LIKE6, None) == a("2001:db8:1::1")
    assert rank(rule, WORKING, LIKE6) == [a("2001:db8:1::1")]
    assert choose(Rule(0, via=("m3",)), WORKING, LIKE6, None) is None
    assert choose(Rule(0, via=("10.0.1.1",)), WORKING, LIKE6, None) is None


def test_return_goes_back_to_the_preferred_one() -> None:
    rule = Rule(0, via=("m1",), backup=("m3",), return_=True)
    assert choose(rule, WORKING, LIKE4, a("10.0.3.1")) == a("10.0.1.1")


def test_no_return_keeps_the_current_locator_while_it_works() -> None:
    rule = Rule(0, via=("m1",), backup=("m3",), return_=False)
    assert choose(rule, WORKING, LIKE4, a("10.0.3.1")) == a("10.0.3.1")
    # Within one interface too: no going back to ``like``.
    assert choose(rule, WORKING, a("10.0.1.1"), a("10.0.1.9")) == a("10.0.1.9")
    # Once it stops working, the best one again.
    gone = {k: v for k, v in WORKING.items() if v != "m3"}
    assert choose(rule, gone, LIKE4, a("10.0.3.1")) == a("10.0.1.1")
    assert choose(rule, WORKING, LIKE4, None) == a("10.0.1.1")


def test_no_return_does_not_keep_a_current_locator_the_rule_does_not_allow() -> None:
    rule = Rule(0, via=("m1",), return_=False)
    # m2 works but is not in the rule: the flow goes where the rule says.
    assert choose(rule, WORKING, LIKE4, a("10.0.2.1")) == a("10.0.1.1")
    # Nor one of the other family.
    assert choose(rule, WORKING, LIKE4, a("2001:db8:1::1")) == a("10.0.1.1")


# -- the config form back ---------------------------------------------------------------


def test_to_json_gives_the_config_form() -> None:
    rule = Rule(
        3,
        proto=UDP,
        remote=ip_network("2001:db8::/32"),
        remote_port=53,
        local_port=5001,
        via=("m1", "10.0.2.1"),
        backup=("m3",),
        return_=False,
    )
    assert rule.to_json() == {
        "proto": "udp",
        "remote": "2001:db8::/32",
        "remote_port": 53,
        "local_port": 5001,
        "via": ["m1", "10.0.2.1"],
        "backup": ["m3"],
        "return": False,
    }
    assert Rule(0, via=("m1",)).to_json() == {"via": ["m1"], "backup": [], "return": True}
