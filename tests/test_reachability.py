"""ihmp.reachability: the three classes of section III-B and the choice of a path.

A different private block, or private and public, is potentially reachable (probed);
only link-local across links, another family, loopback, multicast and unspecified are
known unreachable. Among the paths a host may try, the likelier go first, and pairs
whose probes went unanswered (``dead``) are never chosen.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from ihmp.addr import IPAddress
from ihmp.reachability import Reach, advertisable, best_path, block_of, classify

R, P, U = Reach.REACHABLE, Reach.POTENTIAL, Reach.UNREACHABLE


def A(s: str) -> IPAddress:
    return ip_address(s)


def addrs(*names: str) -> list[IPAddress]:
    return [A(n) for n in names]


# -- classify -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote", "local", "reach"),
    [
        # Both public: known reachable (documentation ranges count as public).
        ("198.51.100.1", "192.0.2.1", R),
        ("203.0.113.9", "8.8.8.8", R),
        ("2001:db8::2", "2001:db8:1::1", R),
        # The same private block: potentially reachable (two sites may both use it).
        ("10.0.0.2", "10.0.0.1", P),
        ("10.200.1.1", "10.0.0.1", P),
        ("172.31.0.1", "172.16.1.2", P),
        ("192.168.2.2", "192.168.0.1", P),
        ("100.64.0.1", "100.127.0.1", P),
        ("fd00::1", "fc00::2", P),
        # Different private blocks: potentially reachable (routed private networks).
        ("10.0.0.1", "172.16.1.2", P),
        ("172.16.1.2", "10.0.0.1", P),
        ("192.168.2.2", "10.0.0.1", P),
        ("10.0.0.1", "192.168.2.2", P),
        ("172.16.1.2", "192.168.2.2", P),
        ("100.64.0.1", "10.0.0.1", P),
        # Private <-> public, both ways: potentially reachable (a NAT, or routing).
        ("198.51.100.1", "10.0.0.1", P),
        ("10.0.0.1", "198.51.100.1", P),
        ("192.168.2.2", "203.0.113.2", P),
        ("2001:db8::1", "fd00::1", P),
        ("fd00::1", "2001:db8::1", P),
        # Link-local unless both ends are in the same link-local block: unreachable.
        ("169.254.7.7", "10.0.0.1", U),
        ("10.0.0.1", "169.254.7.7", U),
        ("169.254.7.7", "198.51.100.1", U),
        ("198.51.100.1", "169.254.7.7", U),
        ("fe80::1", "2001:db8::1", U),
        ("fe80::1", "fd00::1", U),
        ("2001:db8::1", "fe80::1", U),
        # The same link-local block: potentially reachable (the same link, maybe).
        ("169.254.7.7", "169.254.1.1", P),
        ("fe80::1", "fe80::2", P),
        # Another family: unreachable, public or private.
        ("2001:db8::1", "192.0.2.1", U),
        ("192.0.2.1", "2001:db8::1", U),
        ("fd00::1", "10.0.0.1", U),
        ("10.0.0.1", "fd00::1", U),
        # Never locators: loopback, multicast, unspecified (either end).
        ("127.0.0.1", "127.0.0.2", U),
        ("127.0.0.1", "10.0.0.1", U),
        ("10.0.0.1", "127.0.0.1", U),
        ("224.0.0.1", "192.0.2.1", U),
        ("192.0.2.1", "239.1.1.1", U),
        ("0.0.0.0", "192.0.2.1", U),
        ("::1", "2001:db8::1", U),
        ("ff02::1", "fe80::1", U),
        ("2001:db8::1", "::", U),
    ],
)
def test_classify(remote: str, local: str, reach: Reach) -> None:
    assert classify(A(remote), A(local)) is reach


def test_classes_are_ordered_worst_to_best() -> None:
    assert Reach.UNREACHABLE < Reach.POTENTIAL < Reach.REACHABLE
    assert max(U, R, P) is R


@pytest.mark.parametrize(
    ("addr", "block"),
    [
        ("10.1.2.3", "10.0.0.0/8"),
        ("172.16.1.2", "172.16.0.0/12"),
        ("172.31.255.1", "172.16.0.0/12"),
        ("192.168.2.2", "192.168.0.0/16"),
        ("100.64.0.1", "100.64.0.0/10"),
        ("fd12::1", "fc00::/7"),
        ("169.254.7.7", "169.254.0.0/16"),
        ("fe80::1", "fe80::/10"),
        ("172.32.0.1", None),  # just outside 172.16/12
        ("192.0.2.1", None),  # documentation: public here
        ("2001:db8::1", None),
        ("8.8.8.8", None),
    ],
)
def test_block_of(addr: str, block: str | None) -> None:
    assert block_of(A(addr)) == (ip_network(block) if block else None)


def test_advertisable_leaves_out_ipv6_link_local_and_non_locators() -> None:
    for yes in ("192.0.2.1", "10.0.0.1", "169.254.7.7", "fd00::1", "2001:db8::1"):
        assert advertisable(A(yes)), yes
    for no in ("fe80::1", "127.0.0.1", "::1", "224.0.0.1", "0.0.0.0", "::"):
        assert not advertisable(A(no)), no


# -- best_path ------------------------------------------------------------------------


def test_best_path_with_nothing_usable() -> None:
    assert best_path([], addrs("10.0.0.1")) == (U, None, None)
    assert best_path(addrs("10.0.0.2"), []) == (U, None, None)
    # Only known unreachable pairs: nothing to try, nothing to probe.
    assert best_path(addrs("169.254.7.7", "2001:db8::1"), addrs("10.0.0.1")) == (U, None, None)


def test_best_path_prefers_known_reachable_to_potential() -> None:
    remotes = addrs("10.0.0.2", "198.51.100.1")
    locals_ = addrs("10.0.0.1", "192.0.2.1")
    assert best_path(remotes, locals_) == (R, A("192.0.2.1"), A("198.51.100.1"))


def test_best_path_same_block_then_other_private_block_then_public() -> None:
    """Among potentially reachable pairs: the same private block, then another private
    block, then private and public; whatever order the remotes come in."""
    local = addrs("10.0.0.1")
    remotes = addrs("203.0.113.5", "172.16.0.9", "10.0.0.9")
    assert best_path(remotes, local) == (P, A("10.0.0.1"), A("10.0.0.9"))
    assert best_path(remotes[:2], local) == (P, A("10.0.0.1"), A("172.16.0.9"))
    assert best_path(remotes[:1], local) == (P, A("10.0.0.1"), A("203.0.113.5"))
    # The same preference among our own addresses.
    remote = addrs("10.0.0.9")
    locals_ = addrs("192.0.2.1", "172.16.0.1", "10.0.0.1")
    assert best_path(remote, locals_) == (P, A("10.0.0.1"), A("10.0.0.9"))
    assert best_path(remote, locals_[:2]) == (P, A("172.16.0.1"), A("10.0.0.9"))
    assert best_path(remote, locals_[:1]) == (P, A("192.0.2.1"), A("10.0.0.9"))


def test_best_path_link_local_only_within_its_block() -> None:
    remotes = addrs("169.254.7.7", "10.0.0.9")
    assert best_path(remotes, addrs("169.254.1.1")) == (P, A("169.254.1.1"), A("169.254.7.7"))
    assert best_path(remotes, addrs("172.16.0.1")) == (P, A("172.16.0.1"), A("10.0.0.9"))


def test_best_path_breaks_ties_by_order() -> None:
    """Equally likely pairs: the first remote, then the first local, as given."""
    assert best_path(addrs("10.0.0.8", "10.0.0.9"), addrs("10.0.0.1")) == (
        P,
        A("10.0.0.1"),
        A("10.0.0.8"),
    )
    assert best_path(addrs("10.0.0.9", "10.0.0.8"), addrs("10.0.0.2", "10.0.0.1")) == (
        P,
        A("10.0.0.2"),
        A("10.0.0.9"),
    )
    pub = addrs("198.51.100.1", "198.51.100.2")
    assert best_path(pub, addrs("192.0.2.1", "192.0.2.2")) == (
        R,
        A("192.0.2.1"),
        A("198.51.100.1"),
    )


def test_best_path_skips_dead_pairs() -> None:
    """Evidence: a (local, remote) pair whose probes went unanswered is never chosen;
    the next likeliest is, until none is left."""
    remote = addrs("10.0.0.9")
    locals_ = addrs("10.0.0.1", "172.16.0.1", "192.0.2.1")
    dead: set[tuple[IPAddress, IPAddress]] = set()
    assert best_path(remote, locals_, dead) == (P, A("10.0.0.1"), A("10.0.0.9"))
    dead.add((A("10.0.0.1"), A("10.0.0.9")))
    assert best_path(remote, locals_, dead) == (P, A("172.16.0.1"), A("10.0.0.9"))
    dead.add((A("172.16.0.1"), A("10.0.0.9")))
    assert best_path(remote, locals_, dead) == (P, A("192.0.2.1"), A("10.0.0.9"))
    dead.add((A("192.0.2.1"), A("10.0.0.9")))
    assert best_path(remote, locals_, dead) == (U, None, None)
    # Another remote of the same peer is not affected.
    assert best_path(addrs("10.0.0.9", "10.0.0.10"), locals_, dead) == (
        P,
        A("10.0.0.1"),
        A("10.0.0.10"),
    )


def test_dead_pairs_are_local_remote_and_apply_to_any_class() -> None:
    remote, locals_ = addrs("198.51.100.1"), addrs("192.0.2.1", "203.0.113.1")
    dead = {(A("192.0.2.1"), A("198.51.100.1"))}
    assert best_path(remote, locals_, dead) == (R, A("203.0.113.1"), A("198.51.100.1"))
    # The pair the other way round is another path: (remote, local) is not skipped.
    backwards = {(A("198.51.100.1"), A("192.0.2.1"))}
    assert best_path(remote, locals_, backwards) == (R, A("192.0.2.1"), A("198.51.100.1"))
    # A known reachable pair that is dead gives way even to a potentially reachable one.
    remotes = addrs("198.51.100.1", "10.0.0.9")
    locals_ = addrs("192.0.2.1", "10.0.0.1")
    assert best_path(remotes, locals_, dead) == (P, A("10.0.0.1"), A("10.0.0.9"))


def test_best_path_takes_any_iterables() -> None:
    remotes = (a for a in addrs("172.16.0.9", "10.0.0.9"))
    locals_ = iter(addrs("192.0.2.1", "10.0.0.1"))
    dead = frozenset({(A("10.0.0.1"), A("10.0.0.9"))})
    # Every local is tried with every remote (the locals are not used up by the first).
    assert best_path(remotes, locals_, dead) == (P, A("10.0.0.1"), A("172.16.0.9"))
