"""Per-address tables and policy rules, without a kernel: what is wanted, and that
only the difference is applied (a fake rtnetlink client records the requests)."""

from __future__ import annotations

import errno
import socket
from ipaddress import ip_address, ip_network
from typing import Any

from stacktrans import rtnl
from stacktrans.link_routes import (
    PROTO,
    LinkRoutes,
    LocalAddress,
    Route,
    Rule,
    Selector,
    assign_slots,
    is_routing_change,
    preferred_sources,
    route_of,
    routes_wanted,
    rule_of,
    rules_wanted,
)
from stacktrans.netlink import attr

A1, A2, A6 = ip_address("10.91.1.2"), ip_address("10.91.2.2"), ip_address("2001:db8:2::2")
L1, L2 = LocalAddress(A1, 24, 3), LocalAddress(A2, 24, 4)
L6 = LocalAddress(A6, 64, 4)
V4, V6 = socket.AF_INET, socket.AF_INET6


def _main(family: int, dst: str | None, dst_len: int, oif: int, **extra: Any) -> dict[str, Any]:
    msg = {"family": family, "dst_len": dst_len, "table": 254, "type": 1, "scope": 0}
    msg |= {"RTA_OIF": oif} | ({"RTA_DST": dst} if dst else {}) | extra
    return msg


MAIN = [
    _main(V4, None, 0, 3, RTA_GATEWAY="10.91.1.1", RTA_PRIORITY=100),
    _main(V4, None, 0, 4, RTA_GATEWAY="10.91.2.1", RTA_PRIORITY=200),
    _main(V4, "10.91.1.0", 24, 3, scope=253, RTA_PREFSRC="10.91.1.2"),
    _main(V4, "10.91.2.0", 24, 4, scope=253, RTA_PREFSRC="10.91.2.2"),
    _main(V4, "192.0.2.0", 24, 4, RTA_GATEWAY="10.91.2.9"),  # not copied
    _main(V6, "2001:db8:2::", 64, 4, RTA_PRIORITY=256),
    _main(V6, "fe80::", 64, 4, RTA_PRIORITY=256),  # not copied
    _main(V6, None, 0, 4, RTA_GATEWAY="fe80::1", RTA_PRIORITY=1024),
]


def test_slots_are_stable_and_reused() -> None:
    slots = assign_slots({}, [A2, A1])
    assert slots == {A1: 0, A2: 1}
    slots = assign_slots(slots, [A2])
    assert slots == {A2: 1}
    assert assign_slots(slots, [A2, A6, A1]) == {A2: 1, A1: 0, A6: 2}


def test_each_address_table_copies_its_links_default_and_prefix_routes() -> None:
    got = routes_wanted([L1, L2, L6], {A1: 100, A2: 101, A6: 102}, MAIN)
    assert got == {
        Route("0.0.0.0", 0, 100, 3, "10.91.1.1", "10.91.1.2", 100, 0),
        Route("10.91.1.0", 24, 100, 3, None, "10.91.1.2", 0, 253),
        Route("0.0.0.0", 0, 101, 4, "10.91.2.1", "10.91.2.2", 200, 0),
        Route("10.91.2.0", 24, 101, 4, None, "10.91.2.2", 0, 253),
        Route("2001:db8:2::", 64, 102, 4, None, "2001:db8:2::2", 256, 0),
        Route("::", 0, 102, 4, "fe80::1", "2001:db8:2::2", 1024, 0),
    }


def test_from_rules_come_first_then_selectors_in_order_for_known_addresses() -> None:
    tables = {A1: 100, A2: 101}
    web = Selector(proto=6, remote=ip_network("192.0.2.0/24"), remote_port=443, via=(A6, A2, A1))
    ssh = Selector(proto=6, local_port=2222, via=(A2,))
    v6 = Selector(remote=ip_network("2001:db8::/32"), via=(A1,))  # no IPv6 via: no rule
    got = sorted(rules_wanted(tables, [web, v6, ssh], 500), key=lambda r: (r.priority, r.table))
    to = ("192.0.2.0", 24)
    assert got == [
        Rule(V4, 500, 100, src=("10.91.1.2", 32)),
        Rule(V4, 500, 101, src=("10.91.2.2", 32)),
        Rule(V4, 501, 101, dst=to, ip_proto=6, dport=443),
        Rule(V4, 502, 100, dst=to, ip_proto=6, dport=443),
        Rule(V4, 503, 101, ip_proto=6, sport=2222),
    ]


def test_selector_rules_stop_below_main() -> None:
    many = [Selector(local_port=p, via=(A1,)) for p in range(10)]
    got = rules_wanted({A1: 100}, many, 32760)
    assert max(r.priority for r in got) == 32765


def _rule_msg(rule: Rule) -> dict[str, Any]:
    """A rule as the kernel dumps it, through the real decoder."""
    body = rtnl._FIBRULE.pack(
        rule.family,
        rule.dst[1] if rule.dst else 0,
        rule.src[1] if rule.src else 0,
        0,
        0,
        0,
        0,
        1,
        0,
    )
    body += attr(rtnl.FRA_PRIORITY, rule.priority.to_bytes(4, "little"))
    body += attr(rtnl.FRA_TABLE, rule.table.to_bytes(4, "little"))
    if rule.src:
        body += attr(rtnl.FRA_SRC, socket.inet_pton(rule.family, rule.src[0]))
    if rule.dst:
        body += attr(rtnl.FRA_DST, socket.inet_pton(rule.family, rule.dst[0]))
    if rule.ip_proto is not None:
        body += attr(rtnl.FRA_IP_PROTO, bytes([rule.ip_proto]))
    if rule.dport is not None:
        body += attr(rtnl.FRA_DPORT_RANGE, rtnl._PORTS.pack(rule.dport, rule.dport))
    msg = rtnl.decode(rtnl.RTM_NEWRULE, memoryview(body))
    assert msg is not None
    return msg  # fmt: skip


def test_dumped_rules_and_routes_read_back_as_what_was_added() -> None:
    rule = Rule(V4, 19729, 19728, dst=("10.91.9.0", 24), ip_proto=6, dport=22)
    assert rule_of(_rule_msg(rule)) == rule
    from_ = Rule(V6, 19728, 19729, src=("2001:db8::2", 128))
    assert rule_of(_rule_msg(from_)) == from_
    route = Route("0.0.0.0", 0, 19728, 3, "10.91.1.1", "10.91.1.2", 100, 0)
    msg = _main(V4, None, 0, 3, RTA_GATEWAY="10.91.1.1", RTA_PRIORITY=100, RTA_PREFSRC="10.91.1.2")
    assert route_of(msg | {"table": 19728}) == route


class FakeRtnl:
    """Records writes; the kernel's state is what was written; ``refuse`` fails."""

    def __init__(self, main: list[dict[str, Any]]) -> None:
        self.main = main
        self.routes_in: dict[Route, None] = {}
        self.rules_in: dict[Rule, None] = {}
        self.log: list[tuple[str, Any]] = []
        self.refuse: set[Any] = set()
        self.answers: dict[str, dict[str, Any] | OSError] = {}  # route_get, by dst

    def __call__(self) -> FakeRtnl:
        return self

    def __enter__(self) -> FakeRtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def routes(self, family: int) -> list[dict[str, Any]]:
        ours = [
            _main(family, r.dst if r.dst_len else None, r.dst_len, r.oif, table=r.table,
                  scope=r.scope, RTA_PREFSRC=r.prefsrc, RTA_PRIORITY=r.metric)
            | ({"RTA_GATEWAY": r.gateway} if r.gateway else {})
            for r in self.routes_in
            if (":" in r.dst) == (family == V6)
        ]  # fmt: skip
        return [m for m in self.main if m["family"] == family] + ours

    def rules(self, family: int) -> list[dict[str, Any]]:
        return [_rule_msg(u) for u in self.rules_in]

    def route_get(self, dst: str, src: str | None = None) -> dict[str, Any]:
        answer = self.answers[dst]
        if isinstance(answer, OSError):
            raise answer
        return answer

    def route(self, verb: str, dst: str, dst_len: int, proto: int, **kw: Any) -> None:
        r = Route(dst, dst_len, kw["table"], kw["oif"], kw["gateway"], kw["prefsrc"],
                  kw["priority"], kw["scope"])  # fmt: skip
        self._write(verb, r, self.routes_in)

    def rule(self, verb: str, family: int, table: int, priority: int, **kw: Any) -> None:
        u = Rule(family, priority, table, kw["src"], kw["dst"], kw["ip_proto"], kw["sport"],
                 kw["dport"])  # fmt: skip
        self._write(verb, u, self.rules_in)

    def _write(self, verb: str, item: Any, into: dict[Any, None]) -> None:
        self.log.append((verb, item))
        if item in self.refuse:
            raise OSError(errno.EEXIST, "File exists")
        if verb == "add":
            into[item] = None
        else:
            into.pop(item)


def test_only_the_difference_is_applied_and_close_removes_all() -> None:
    fake = FakeRtnl(list(MAIN))
    lr = LinkRoutes(table_base=100, priority_base=500, open_rtnl=fake)  # type: ignore[arg-type]
    lr.update([L1, L2])
    assert len(fake.routes_in) == 4 and len(fake.rules_in) == 2
    fake.log.clear()
    lr.update([L1, L2])
    assert fake.log == []  # nothing changed
    lr.set_selectors([Selector(proto=6, remote_port=22, via=(A2, A1))])
    assert fake.log == [("add", Rule(V4, 501, 101, ip_proto=6, dport=22)),
                        ("add", Rule(V4, 502, 100, ip_proto=6, dport=22))]  # fmt: skip
    fake.log.clear()
    lr.update([L1])  # A2 left: its table, its rules go; the selector moves up
    assert ("add", Rule(V4, 501, 100, ip_proto=6, dport=22)) in fake.log
    assert len(fake.routes_in) == 2 and len(fake.rules_in) == 2
    lr.close()
    assert fake.routes_in == {} and fake.rules_in == {}


def test_a_refused_request_does_not_stop_the_rest_and_is_tried_again() -> None:
    fake = FakeRtnl(list(MAIN))
    default1 = Route("0.0.0.0", 0, 100, 3, "10.91.1.1", "10.91.1.2", 100, 0)
    fake.refuse = {default1}
    lr = LinkRoutes(table_base=100, priority_base=500, open_rtnl=fake)  # type: ignore[arg-type]
    lr.update([L1, L2])
    assert len(fake.routes_in) == 3 and len(fake.rules_in) == 2
    fake.refuse.clear()
    lr.refresh()
    assert default1 in fake.routes_in


def test_routes_the_kernel_flushed_are_added_again_on_refresh() -> None:
    fake = FakeRtnl(list(MAIN))
    lr = LinkRoutes(table_base=100, priority_base=500, open_rtnl=fake)  # type: ignore[arg-type]
    lr.update([L1, L2])
    flushed = [r for r in fake.routes_in if r.oif == 4]
    for r in flushed:
        del fake.routes_in[r]  # link 2 went down
    lr.refresh()
    assert all(r in fake.routes_in for r in flushed)


def test_preferred_sources_is_each_routes_source_and_skips_the_unreachable() -> None:
    getter = FakeRtnl([])
    getter.answers = {
        "192.0.2.1": {"RTA_OIF": 3, "RTA_PREFSRC": "203.0.113.2"},
        "192.0.2.9": OSError(errno.ENETUNREACH, "Network is unreachable"),
        "2001:db8::1": {"RTA_OIF": 3},  # a route that names no source
    }
    dsts = [ip_address(a) for a in ("192.0.2.1", "192.0.2.9", "2001:db8::1")]
    assert preferred_sources(dsts, getter) == {dsts[0]: ip_address("203.0.113.2")}


def test_only_main_table_unicast_routes_not_ours_are_routing_changes() -> None:
    default = {"event": "RTM_NEWROUTE", "table": 254, "type": 1, "proto": 3}
    assert is_routing_change(default)
    assert is_routing_change(default | {"event": "RTM_DELROUTE"})
    assert not is_routing_change(default | {"proto": PROTO})  # our own copies
    assert not is_routing_change(default | {"table": 255, "type": 2})  # local table
    assert not is_routing_change(default | {"table": 19728})  # another table
    assert not is_routing_change(default | {"event": "RTM_NEWADDR"})
