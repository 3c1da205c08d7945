"""`dime move`'s pure part: flows named as ``dime status`` prints them, which flows a
request selects, and which of our addresses each goes to."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from dime.moves import describe, parse_endpoint, parse_flow, resolve, select
from stacktrans.link_routes import LocalLink
from stacktrans.socket_table import TCP, UDP, FlowKey

A = ip_address
FLOW = FlowKey(TCP, A("198.51.100.2"), 41080, A("192.0.2.1"), 5001)
FLOW2 = FlowKey(UDP, A("198.51.100.2"), 5353, A("192.0.2.1"), 53)
OTHER = FlowKey(TCP, A("198.51.100.2"), 41081, A("192.0.2.9"), 5001)
FLOW6 = FlowKey(TCP, A("2001:db8::1"), 80, A("2001:db8::2"), 41000)
FLOWS = [FLOW, FLOW2, OTHER, FLOW6]

# Ours: m1 has an IPv4 and an IPv6 address, m2 two IPv4 ones, m3 an IPv4 one only.
LINKS = {
    A("198.51.100.2"): LocalLink("m1", 2, 24),
    A("2001:db8::1"): LocalLink("m1", 2, 64),
    A("203.0.113.7"): LocalLink("m2", 3, 24),
    A("203.0.113.5"): LocalLink("m2", 3, 24),
    A("192.0.2.77"): LocalLink("m3", 4, 24),
}


def test_parse_flow_reads_what_dime_status_prints() -> None:
    assert parse_flow("tcp 198.51.100.2:41080 192.0.2.1:5001") == FLOW
    assert parse_flow("UDP  198.51.100.2:5353   192.0.2.1:53") == FLOW2
    assert parse_flow("tcp [2001:db8::1]:80 [2001:db8::2]:41000") == FLOW6
    for key in FLOWS:
        assert parse_flow(describe(key)) == key
    assert describe(FLOW6) == "tcp [2001:db8::1]:80 [2001:db8::2]:41000"


def test_parse_endpoint() -> None:
    assert parse_endpoint("[2001:db8::1]:80") == (A("2001:db8::1"), 80)
    assert parse_endpoint("192.0.2.1:65535") == (A("192.0.2.1"), 65535)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("sctp 198.51.100.2:41080 192.0.2.1:5001", "PROTO LOCAL REMOTE"),
        ("tcp 198.51.100.2:41080", "PROTO LOCAL REMOTE"),
        ("tcp 198.51.100.2 192.0.2.1:5001", "not addr:port"),
        ("tcp 198.51.100.2:41080 192.0.2.1:", "not addr:port"),
        ("tcp 198.51.100.2:0 192.0.2.1:5001", "not addr:port"),
        ("tcp 198.51.100.2:65536 192.0.2.1:5001", "not addr:port"),
        ("tcp 2001:db8::1:80 192.0.2.1:5001", "[addr]:port"),
        ("tcp 198.51.100.300:41080 192.0.2.1:5001", "not an address"),
        ("tcp [192.0.2.1:80 192.0.2.1:5001", "not an address"),
        ("tcp host:80 192.0.2.1:5001", "not an address"),
    ],
)
def test_parse_flow_errors_are_one_line(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=r"^[^\n]*$") as err:
        parse_flow(text)
    assert says in str(err.value)


def test_select_by_flow() -> None:
    assert select({"flow": "tcp 198.51.100.2:41080 192.0.2.1:5001"}, FLOWS) == [FLOW]


def test_select_by_peer_takes_every_flow_to_it_in_a_stable_order() -> None:
    assert select({"peer": "192.0.2.1"}, FLOWS) == [FLOW, FLOW2]
    assert select({"peer": "192.0.2.1"}, reversed(FLOWS)) == [FLOW, FLOW2]
    assert select({"peer": "2001:db8::2"}, FLOWS) == [FLOW6]


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        ({"flow": "tcp 198.51.100.2:41099 192.0.2.1:5001"}, "no flow tcp 198.51.100.2:41099"),
        ({"peer": "192.0.2.200"}, "no flow to 192.0.2.200"),
        ({"peer": "nowhere"}, "not an address"),
        ({}, "name a flow"),
        ({"flow": "tcp 198.51.100.2:41080 192.0.2.1:5001", "peer": "192.0.2.1"}, "name a flow"),
        ({"flow": "tcp 198.51.100.2:41080"}, "PROTO LOCAL REMOTE"),
    ],
)
def test_select_errors(request_: dict[str, str], says: str) -> None:
    with pytest.raises(ValueError, match=r"^[^\n]*$") as err:
        select(request_, FLOWS)
    assert says in str(err.value)


def test_resolve_an_interface_keeps_a_flows_own_address_on_it() -> None:
    assert resolve("m1", LINKS, [FLOW, FLOW6]) == {FLOW: FLOW.local, FLOW6: FLOW6.local}


def test_resolve_an_interface_gives_its_first_address_of_the_flows_version() -> None:
    assert resolve("m2", LINKS, [FLOW]) == {FLOW: A("203.0.113.7")}  # as the links list it
    assert resolve("m3", LINKS, [FLOW, FLOW2]) == {FLOW: A("192.0.2.77"), FLOW2: A("192.0.2.77")}
    mine = FlowKey(TCP, A("203.0.113.5"), 41080, A("192.0.2.1"), 5001)
    assert resolve("m2", LINKS, [mine]) == {mine: A("203.0.113.5")}


def test_resolve_an_address() -> None:
    assert resolve("203.0.113.5", LINKS, [FLOW, FLOW2]) == {
        FLOW: A("203.0.113.5"),
        FLOW2: A("203.0.113.5"),
    }
    assert resolve("2001:db8::1", LINKS, [FLOW6]) == {FLOW6: A("2001:db8::1")}


@pytest.mark.parametrize(
    ("via", "keys", "says"),
    [
        ("192.0.2.1", [FLOW], "192.0.2.1 is not an address of this host"),
        ("m9", [FLOW], "no interface 'm9'"),
        ("m3", [FLOW6], "m3 has no IPv6 address for tcp [2001:db8::1]:80"),
        ("m2", [FLOW, FLOW6], "m2 has no IPv6 address"),
        ("203.0.113.5", [FLOW6], "203.0.113.5 has no IPv6 address"),
        ("2001:db8::1", [FLOW], "2001:db8::1 has no IPv4 address"),
    ],
)
def test_resolve_errors(via: str, keys: list[FlowKey], says: str) -> None:
    with pytest.raises(ValueError, match=r"^[^\n]*$") as err:
        resolve(via, LINKS, keys)
    assert says in str(err.value)


def test_resolve_with_no_flow_still_checks_what_it_names() -> None:
    assert resolve("m1", LINKS, []) == {}
    with pytest.raises(ValueError, match="no interface"):
        resolve("m9", LINKS, [])
