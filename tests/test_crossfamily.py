"""Flows carried across IP versions, without a kernel: the decision (translation),
the kernel elements that send their packets to the daemon, and the user-space path
that translates them (into a recording carrier: nothing is sent)."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.inet import TCP as ScapyTCP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6ParamProblem, IPv6
from scapy.packet import Raw

from ihmp.states import Trigger
from stacktrans.family import complete, icmp_across
from stacktrans.nfqueue import DROP
from stacktrans.socket_table import TCP, FlowKey
from stacktrans.userspace import UserspacePath
from tests.test_dataplane import FakeNft, dataplane
from tests.test_userspace import RecordingCarrier

A = ip_address
L4, L6 = A("198.51.100.2"), A("2001:db8:1::2")  # ours
P4, P6 = A("192.0.2.1"), A("2001:db8:c1::1")  # the peer's
FLOW = FlowKey(TCP, L4, 40000, P4, 5001)


def dual_stack() -> tuple[Any, Any, FakeNft, int]:
    """A v4 flow to a dual-stack peer that reaches us at both our addresses."""
    nft = FakeNft()
    tr, table, _ = dataplane(nft)
    tr.set_local_addresses({L4, L6})
    tr.flow_seen(FLOW, now=0.0)
    entry = table.lookup(P4)
    assert entry is not None
    hid = entry.hid
    table.transition(hid, Trigger.HELLO_ACKED)
    table.add_active(hid, P6)
    table.add_local(hid, L4)
    table.add_local(hid, L6)
    nft.batches.clear()
    return tr, table, nft, hid


def test_a_flow_with_no_locator_of_its_version_left_is_carried_across() -> None:
    tr, table, nft, hid = dual_stack()
    assert tr.translation(hid).cross == {}
    tr.local_removed(L4)  # we lost IPv4 (IHMP: the peer no longer reaches us there)
    table.remove_local(hid, L4)
    assert tr.translation(hid).cross == {(L4, P4): (L6, P6)}
    entry = tr.sockets.get(FLOW)
    assert (tr.via_of(entry), tr.remote_of(entry)) == (L6, P6)
    text = "\n".join(nft.batches)
    assert f"add element inet dime xout4 {{ {L4} . {P4} }}" in text
    assert f"add element inet dime xin6 {{ {hid} . tcp . 5001 . 40000 }}" in text
    # The peer's own IPv4 needs a route of its version to reach the queue: along P6.
    assert tr.translated_remotes()[P4] == P6
    # IPv4 back, and verified by the peer: its own version again, elements gone.
    nft.batches.clear()
    tr.local_added(L4)
    table.add_local(hid, L4)
    assert tr.translation(hid).cross == {}
    text = "\n".join(nft.batches)
    assert f"delete element inet dime xout4 {{ {L4} . {P4} }}" in text
    assert f"delete element inet dime xin6 {{ {hid} . tcp . 5001 . 40000 }}" in text


def test_the_peer_losing_its_version_carries_across_too() -> None:
    tr, table, _, hid = dual_stack()
    table.remove_address(hid, P4)
    assert tr.translation(hid).cross == {(L4, P4): (L6, P6)}


def test_nothing_is_carried_across_without_both_ends_in_the_other_version() -> None:
    tr, table, _, hid = dual_stack()
    table.remove_local(hid, L6)  # the peer does not reach us over IPv6
    tr.local_removed(L4)
    table.remove_local(hid, L4)
    assert tr.translation(hid).cross == {}


def test_the_user_space_path_carries_both_ways() -> None:
    tr, table, _, hid = dual_stack()
    tr.local_removed(L4)
    table.remove_local(hid, L4)
    carrier = RecordingCarrier()
    path = UserspacePath(tr, lambda: 0.0, carrier=carrier)  # type: ignore[arg-type]
    seg = ScapyTCP(sport=40000, dport=5001, seq=7, flags="PA") / Raw(b"data" * 100)
    assert path.outbound(bytes(IP(src=str(L4), dst=str(P4)) / seg)) == DROP
    way, packet, dst = carrier.sent[-1]
    assert (way, dst) == ("out", P6)
    # (The TCP checksum is left partial, for the kernel to complete.)
    assert complete(packet) == bytes(IPv6(src=str(L6), dst=str(P6), hlim=64) / seg)
    back = ScapyTCP(sport=5001, dport=40000, seq=9, flags="A") / Raw(b"ok")
    assert path.inbound(bytes(IPv6(src=str(P6), dst=str(L6)) / back)) == DROP
    way, packet, dst = carrier.sent[-1]
    assert (way, dst) == ("into", L4)
    got = IP(complete(packet))
    assert (got.src, got.dst) == (str(P4), str(L4))
    assert bytes(got[ScapyTCP]) == bytes(IP(bytes(IP(src=str(P4), dst=str(L4)) / back))[ScapyTCP])
    assert path.carried == 2


def test_a_routers_packet_too_big_about_a_carried_packet_reaches_the_flow() -> None:
    """An ICMPv6 "packet too big" quoting a packet we carried (our IPv6 locator to the
    peer's, the v4 flow's ports): the carrier hears the MTU (and tells the flow's
    stack); the kernel gets nothing. Other errors, and quotes of no carried flow,
    are left alone."""
    tr, table, _, hid = dual_stack()
    tr.local_removed(L4)
    table.remove_local(hid, L4)
    carrier = RecordingCarrier()
    path = UserspacePath(tr, lambda: 0.0, carrier=carrier)  # type: ignore[arg-type]
    sent = (
        IPv6(src=str(L6), dst=str(P6))
        / ScapyTCP(sport=40000, dport=5001, seq=77)
        / Raw(b"x" * 1400)
    )
    router = "2001:db8:99::1"
    ptb = IPv6(src=router, dst=str(L6)) / ICMPv6PacketTooBig(mtu=1400) / bytes(sent)[:1232]
    assert path.inbound(bytes(ptb)) == DROP
    assert carrier.sent == [("mtu", (1400, FLOW, 77), P6)]
    other = IPv6(src=str(L6), dst=str(P6)) / ScapyTCP(sport=40001, dport=5001) / Raw(b"x")
    ptb_other = IPv6(src=router, dst=str(L6)) / ICMPv6PacketTooBig(mtu=1400) / bytes(other)
    assert path.inbound(bytes(ptb_other)) is None
    assert len(carrier.sent) == 1


def test_unreachables_of_a_carried_flow_cross_both_ways() -> None:
    """A router's ICMPv6 unreachable about a packet we carried reaches the IPv4 flow's
    stack as its ICMP counterpart; our stack's ICMP error about a packet of such a
    flow goes to the peer as ICMPv6, quoting the packet as it came on the wire.
    Errors with no counterpart a socket acts on are not passed on."""
    tr, table, _, hid = dual_stack()
    tr.local_removed(L4)
    table.remove_local(hid, L4)
    carrier = RecordingCarrier()
    path = UserspacePath(tr, lambda: 0.0, carrier=carrier)  # type: ignore[arg-type]
    sent = bytes(IPv6(src=str(L6), dst=str(P6)) / ScapyTCP(sport=40000, dport=5001, seq=77))
    router = "2001:db8:99::1"
    unreachable = IPv6(src=router, dst=str(L6)) / ICMPv6DestUnreach(code=3) / sent
    assert path.inbound(bytes(unreachable)) == DROP
    assert carrier.sent == [("error", (3, 1, 77), FLOW)]  # host unreachable
    problem = IPv6(src=router, dst=str(L6)) / ICMPv6ParamProblem(code=0) / sent
    assert path.inbound(bytes(problem)) is None
    # Our stack refuses a segment of the flow (as its socket saw it: P4 -> L4).
    came = IP(src=str(P4), dst=str(L4)) / ScapyTCP(sport=5001, dport=40000, seq=99)
    ours = IP(src=str(L4), dst=str(P4)) / ICMP(type=3, code=3) / bytes(came)[:28]
    assert path.outbound(bytes(ours)) == DROP
    wire = FlowKey(TCP, P6, 5001, L6, 40000)  # the segment as it came: P6 -> L6
    assert carrier.sent[-1] == ("error", (1, 4, 99), wire)  # port unreachable


@pytest.mark.parametrize(
    ("version", "kind", "code", "want"),
    [(6, 1, 4, (3, 3)), (6, 1, 1, (3, 10)), (6, 3, 0, (11, 0)), (6, 4, 0, None),
     (4, 3, 3, (1, 4)), (4, 3, 13, (1, 1)), (4, 11, 1, (3, 1)), (4, 3, 4, None),
     (4, 12, 0, None)],
)  # fmt: skip
def test_icmp_errors_map_to_their_rfc_7915_counterparts(
    version: int, kind: int, code: int, want: tuple[int, int] | None
) -> None:
    assert icmp_across(version, kind, code) == want
