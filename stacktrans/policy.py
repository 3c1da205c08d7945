"""Per-flow locator policy: which local address a flow should leave from.

The config's ``[[policy]]`` rules, in order; the first that matches a flow applies.
A rule names the local interfaces or addresses a flow should use, most preferred
first (``via``), what to fall back to when none of them works (``backup``), and
whether a flow goes back to a preferred one when it returns (``return``).

Pure: no I/O. The caller says which local addresses work now (and on which
interface) and applies the answer.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from ihmp.addr import IPAddress, addr_key
from stacktrans.socket_table import TCP, UDP, FlowKey

PROTOS = {"tcp": TCP, "udp": UDP}


def parse_address(text: str) -> IPAddress | None:
    """``text`` as an address literal (IPv4 or IPv6), or None: an interface name."""
    try:
        return ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Rule:
    """One ``[[policy]]`` table; a field left None matches anything."""

    index: int  # 0-based position in the config
    proto: int | None = None  # socket_table.TCP or UDP
    remote: IPv4Network | IPv6Network | None = None  # contains the peer's identifier
    remote_port: int | None = None
    local_port: int | None = None
    via: tuple[str, ...] = ()  # as configured: interface names or address text
    backup: tuple[str, ...] = ()
    return_: bool = True

    def matches(self, key: FlowKey) -> bool:
        """Whether the flow ``key`` (identifiers, as its socket sees them) is this rule's."""
        return (
            (self.proto is None or key.proto == self.proto)
            # An address of the other family is simply not in the network.
            and (self.remote is None or key.remote in self.remote)
            and (self.remote_port is None or key.rport == self.remote_port)
            and (self.local_port is None or key.lport == self.local_port)
        )

    def to_json(self) -> dict[str, Any]:
        """The rule as it would be configured (unset match fields left out)."""
        out: dict[str, Any] = {}
        if self.proto is not None:
            out["proto"] = {v: k for k, v in PROTOS.items()}.get(self.proto, self.proto)
        if self.remote is not None:
            out["remote"] = str(self.remote)
        if self.remote_port is not None:
            out["remote_port"] = self.remote_port
        if self.local_port is not None:
            out["local_port"] = self.local_port
        out["via"] = list(self.via)
        out["backup"] = list(self.backup)
        out["return"] = self.return_
        return out


@dataclass(frozen=True)
class Policy:
    """The rules in config order. No rules: no flow has a preference."""

    rules: tuple[Rule, ...] = ()

    def rule_for(self, key: FlowKey) -> Rule | None:
        """The first rule that matches ``key``, or None."""
        return next((rule for rule in self.rules if rule.matches(key)), None)

    def interface_names(self) -> set[str]:
        """Every via/backup entry that is an interface name, not an address."""
        return {
            entry
            for rule in self.rules
            for entry in rule.via + rule.backup
            if parse_address(entry) is None
        }

    def check_interfaces(self, known: Collection[str]) -> None:
        """Raise ValueError (one line naming the key) for the first interface name
        not in ``known``. Addresses are not checked: they may come and go."""
        for rule in self.rules:
            for field_name, entries in (("via", rule.via), ("backup", rule.backup)):
                for entry in entries:
                    if parse_address(entry) is None and entry not in known:
                        raise ValueError(
                            f"policy[{rule.index}].{field_name}: no interface {entry!r}"
                        )


def rank(rule: Rule, working: Mapping[IPAddress, str], like: IPAddress) -> list[IPAddress]:
    """The working addresses ``rule`` allows for a flow whose local identifier is
    ``like``, best first: those of ``via`` in its order, then those of ``backup``.

    Only addresses of ``like``'s IP version count. An interface entry gives its
    working addresses, ``like`` first if it is one of them (the flow keeps its
    own address when it can), then in ``addr_key`` order; an address entry gives
    itself if it works. Each address appears once, at its best place.
    """
    usable = {addr: name for addr, name in working.items() if addr.version == like.version}
    out: list[IPAddress] = []
    for entry in rule.via + rule.backup:
        for addr in _entry_addresses(entry, usable, like):
            if addr not in out:
                out.append(addr)
    return out


def _entry_addresses(
    entry: str, usable: Mapping[IPAddress, str], like: IPAddress
) -> Iterable[IPAddress]:
    addr = parse_address(entry)
    if addr is not None:
        return [addr] if addr in usable else []
    on_it = sorted((a for a, name in usable.items() if name == entry), key=addr_key)
    if like in on_it:
        on_it.remove(like)
        on_it.insert(0, like)
    return on_it


def choose(
    rule: Rule, working: Mapping[IPAddress, str], like: IPAddress, current: IPAddress | None
) -> IPAddress | None:
    """The local locator ``rule`` wants for a flow whose local identifier is ``like``,
    among ``working`` (local address -> its interface name: the addresses usable now).

    The first of :func:`rank`: the first entry of via, then of backup, that has a
    working address of ``like``'s version. With ``return_`` False, a ``current``
    locator that the rule allows and that still works is kept (a flow does not go
    back when a preferred one returns). None when nothing in via/backup works: the
    caller then keeps any working address.
    """
    candidates = rank(rule, working, like)
    if not rule.return_ and current in candidates:
        return current
    return candidates[0] if candidates else None
