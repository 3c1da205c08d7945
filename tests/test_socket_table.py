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
