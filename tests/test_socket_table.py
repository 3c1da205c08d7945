"""The socket table shares one address object among the flows that name it."""

from __future__ import annotations

import gc
from ipaddress import ip_address

from stacktrans.socket_table import UDP, FlowKey, SocketTable


def _key(lport: int) -> FlowKey:
    # New address objects each time, as a packet parse makes them.
    return FlowKey(UDP, ip_address("10.0.0.1"), lport, ip_address("2001:db8::1"), 53)


def test_flows_share_their_address_objects() -> None:
    table = SocketTable()
    a, b = table.add(_key(1000), 1, 0.0), table.add(_key(1001), 1, 0.0)
    assert a is not None and b is not None
    assert a.key.local is b.key.local and a.key.remote is b.key.remote
    assert a.key == _key(1000)
    assert table.get(_key(1001)) is b
    assert table.inbound(1, 6, UDP, 53, 1000) is a


def test_an_address_no_flow_names_is_forgotten() -> None:
    table = SocketTable()
    table.add(_key(1000), 1, 0.0)
    table.remove(_key(1000))
    gc.collect()
    assert len(table._interned) == 0
    again = table.add(_key(1000), 1, 0.0)
    assert again is not None and again.key == _key(1000)


def test_inbound_lookup_tells_versions_protocols_and_ports_apart() -> None:
    table = SocketTable()
    v4 = table.add(FlowKey(UDP, ip_address("10.0.0.1"), 1000, ip_address("10.0.0.2"), 53), 1, 0.0)
    v6 = table.add(FlowKey(UDP, ip_address("::1:1"), 1000, ip_address("::1:2"), 53), 1, 0.0)
    tcp = table.add(FlowKey(6, ip_address("10.0.0.1"), 1000, ip_address("10.0.0.2"), 53), 1, 0.0)
    big = table.add(
        FlowKey(UDP, ip_address("10.0.0.1"), 65535, ip_address("10.0.0.3"), 65535), 2**40, 0.0
    )
    assert table.inbound(1, 4, UDP, 53, 1000) is v4
    assert table.inbound(1, 6, UDP, 53, 1000) is v6
    assert table.inbound(1, 4, 6, 53, 1000) is tcp
    assert table.inbound(2**40, 4, UDP, 65535, 65535) is big
    assert table.inbound(2, 4, UDP, 53, 1000) is None
    # Behind a NAT the flow's packets carry another port: found by that one only.
    assert v4 is not None and table.rebind(v4, (ip_address("192.0.2.1"), 4000), None)
    assert table.inbound(1, 4, UDP, 4000, 1000) is v4
    assert table.inbound(1, 4, UDP, 53, 1000) is None
    table.remove(v4.key)
    assert table.inbound(1, 4, UDP, 4000, 1000) is None
