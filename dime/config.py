"""dime's one configuration file (TOML). Every key is optional.

    # /etc/dime/dime.toml
    port = 4731                 # IHMP UDP port (both ends must agree)
    dataplane = "auto"          # auto | nft | nfqueue
    strict = false              # accept only peer keys configured below
    log_level = "info"          # debug | info | warning | error
    state_dir = "/var/lib/dime" # host key and key bindings (default: per network namespace,
                                # /var/lib/dime/netns-<inode> outside the initial one;
                                # the environment's DIME_STATE_DIR overrides the default)
    handoff_window = 1.0        # s: an address lost and another gained within it is a handoff
    sweep_interval = 2.0        # s: how often every socket is listed to drop ended flows,
                                # where the kernel does not announce them (at most; with
                                # many flows a sweep waits 20x its own cost)
    safety_sweep = 600.0        # s: the same listing where it does (sock_diag destroy
                                # events): in case one was missed
    queue_out = 4731            # NFQUEUE numbers (outbound, inbound)
    queue_in = 4732
    log_group = 4731            # NFLOG group through which the kernel tells dime of new
                                # flows (nft data plane), each at once
    held_log_group = 4732       # NFLOG group of the notices of flows the kernel holds
                                # already (it learned them): batched, up to 64 or 10 ms;
                                # must differ from log_group
    adopt_existing = true       # take over connections opened before dime started
    follow_routes = true        # a flow no [[policy]] rule names moves to the source the
                                # kernel's routing prefers towards its peer (a new default
                                # route takes flows along while the old link still works;
                                # false: a flow keeps its address until that goes)
    nat_keepalive = 25.0        # s: behind a NAT, keep its mapping alive this often while
                                # flows need it (0: never)
    nat_port = 4733             # `dime nat` (on a NAT router): its own UDP port, and the
                                # NFQUEUE number of the IHMP it forwards
    rendezvous = ["192.0.2.53", "[2001:db8::53]:4731"]
                                # rendezvous points (`dime rendezvous`) to register with
                                # and relay through when both ends move at once, or a
                                # peer's NAT filters (default: none; port default 4731)

    [ihmp]                      # protocol timing and flood limits
    initial_rto = 0.5           # s, first retransmission timeout
    max_rto = 2.0               # s, backoff cap
    max_attempts = 10           # HELLO transmissions before a peer counts as legacy
    probe_attempts = 3          # for probes of potentially reachable paths
    exchange_deadline = 30.0    # s, how long an address event is retransmitted
    legacy_hold_down = 300.0    # s, no HELLO to a peer that never answered
    path_loss_grace = 30.0      # s, a peer with no path left is kept this long
    dead_path_hold = 300.0      # s, a path whose probes went unanswered is not tried first
    max_peers = 4096            # hosts in the HID table; the least recently used idle one
                                # goes to make room (hosts with flows never do)
    max_half_open = 256         # of them, hosts whose first HELLO is unanswered
    max_challenges = 8          # addresses of one peer being validated at once
    unverified_rate = 5.0       # datagrams/s taken from a source no peer was verified at
    unverified_burst = 20.0
    cookie_rate = 500.0         # HELLO cookies sent per second, all sources together
    knock_rate = 300.0          # knocks checked per second from one NAT address
    knock_burst = 3000.0
    relay_rate = 50.0           # datagrams/s taken from one rendezvous point
    relay_burst = 200.0

    [rendezvous_server]         # `dime rendezvous` only (it also uses port and log_level)
    accept = ["03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"]
                                # host keys it serves (hex or base64; default: any)
    max_hosts = 10000           # registrations kept; a new host beyond it is refused
    lifetime = 90.0             # s a registration lasts unless renewed (hosts: every 25 s)
    rate = 20.0                 # datagrams/s taken from one source
    burst = 60.0

    [[local_key]]               # the paper's set_local_key; more specific wins
    file = "/etc/dime/lab.key"
    addr = "198.51.100.0/24"    # an address, a prefix or "*"

    [[trust]]                   # a peer key bound a priori (required in strict mode)
    key = "hex or base64 of the 32-byte Ed25519 public key"
    addr = "192.0.2.7"

    [[policy]]                  # which local interface a flow uses; the first rule that
                                # matches it applies (a rule with no match keys: all)
    proto = "tcp"               # tcp | udp
    remote = "192.0.2.0/24"     # the peer's identifier: an address or prefix
    remote_port = 22
    local_port = 5001
    via = ["wlan0", "eth0"]     # interfaces or local addresses, most preferred first
    backup = ["wwan0"]          # used only when nothing in via works
    return = true               # go back when a preferred one returns

A bad value is one line naming the key; unknown keys are refused.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path
from typing import Any, TypeVar

from ihmp.engine import EngineConfig
from ihmp.keys import parse_scope
from ihmp.registration import RendezvousAddressError, RendezvousPoint
from ihmp.rendezvous import ServerConfig
from stacktrans.policy import PROTOS, Policy, Rule, parse_address

DEFAULT_STATE_DIR = Path("/var/lib/dime")
LOG_LEVELS = ("debug", "info", "warning", "error")
DATAPLANES = ("auto", "nft", "nfqueue")

_T = TypeVar("_T")


class ConfigError(ValueError):
    """One line: which key is wrong and why."""


@dataclass(frozen=True)
class KeyBinding:
    file: Path
    addr: str = "*"


@dataclass(frozen=True)
class TrustBinding:
    key: bytes
    addr: str


@dataclass
class Config:
    port: int = 4731
    dataplane: str = "auto"
    strict: bool = False
    log_level: str = "info"
    state_dir: Path | None = None  # None: /var/lib/dime, or a per-namespace subfolder
    handoff_window: float = 1.0
    sweep_interval: float = 2.0
    safety_sweep: float = 600.0
    queue_out: int = 4731
    queue_in: int = 4732
    log_group: int = 4731
    held_log_group: int = 4732
    adopt_existing: bool = True
    follow_routes: bool = True
    nat_keepalive: float = 25.0
    nat_port: int = 4733
    ihmp: EngineConfig = field(default_factory=EngineConfig)
    local_key: list[KeyBinding] = field(default_factory=list)
    trust: list[TrustBinding] = field(default_factory=list)
    rendezvous: list[RendezvousPoint] = field(default_factory=list)
    rendezvous_server: ServerConfig = field(default_factory=ServerConfig)
    policy: Policy = field(default_factory=Policy)


def parse_public_key(text: str, where: str) -> bytes:
    """A raw Ed25519 public key from hex or base64; ConfigError naming ``where``."""
    text = text.strip()
    raw: bytes | None = None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise ConfigError(f"{where}: not a 32-byte Ed25519 public key in hex or base64")
    return raw


def _check_type(key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    # TOML integers are fine where a float is expected; bools are not numbers here.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{key}: expected {_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {_name(kind)}, got {type(value).__name__}")
    return value


def _name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(kind, str(kind)) if isinstance(kind, type) else "a value"


def _positive(key: str, value: float) -> float:
    if not value > 0:  # also refuses nan, which TOML allows
        raise ConfigError(f"{key}: must be greater than 0, got {value}")
    return value


def _port(key: str, value: int, low: int = 1) -> int:
    if not low <= value <= 65535:
        raise ConfigError(f"{key}: must be between {low} and 65535, got {value}")
    return value


_SCALARS: dict[str, type] = {
    "port": int,
    "dataplane": str,
    "strict": bool,
    "log_level": str,
    "state_dir": str,
    "handoff_window": float,
    "sweep_interval": float,
    "safety_sweep": float,
    "queue_out": int,
    "queue_in": int,
    "log_group": int,
    "held_log_group": int,
    "adopt_existing": bool,
    "follow_routes": bool,
    "nat_keepalive": float,
    "nat_port": int,
}


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document. Raises ConfigError."""
    cfg = Config()
    allowed = set(_SCALARS) | {
        "ihmp",
        "local_key",
        "trust",
        "rendezvous",
        "rendezvous_server",
        "policy",
    }
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(allowed))})")
    for key, kind in _SCALARS.items():
        if key in data:
            setattr(cfg, key, _check_type(key, data[key], kind))
    cfg.port = _port("port", cfg.port)
    cfg.queue_out = _port("queue_out", cfg.queue_out, 0)
    cfg.queue_in = _port("queue_in", cfg.queue_in, 0)
    cfg.log_group = _port("log_group", cfg.log_group, 0)
    cfg.held_log_group = _port("held_log_group", cfg.held_log_group, 0)
    cfg.nat_port = _port("nat_port", cfg.nat_port)
    if cfg.nat_port == cfg.port:
        raise ConfigError("nat_port: must differ from port (the hosts behind the NAT use that)")
    if cfg.queue_out == cfg.queue_in:
        raise ConfigError("queue_in: must differ from queue_out")
    if cfg.held_log_group == cfg.log_group:
        raise ConfigError("held_log_group: must differ from log_group")
    if cfg.dataplane not in DATAPLANES:
        raise ConfigError(
            f"dataplane: must be one of {', '.join(DATAPLANES)}, got {cfg.dataplane!r}"
        )
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(
            f"log_level: must be one of {', '.join(LOG_LEVELS)}, got {cfg.log_level!r}"
        )
    _positive("handoff_window", cfg.handoff_window)
    _positive("sweep_interval", cfg.sweep_interval)
    _positive("safety_sweep", cfg.safety_sweep)
    if "state_dir" in data:
        cfg.state_dir = Path(data["state_dir"])
    if cfg.nat_keepalive < 0:
        raise ConfigError(f"nat_keepalive: must be 0 (never) or more, got {cfg.nat_keepalive}")
    cfg.ihmp = _ihmp(data.get("ihmp", {}))
    cfg.ihmp.nat_keepalive = cfg.nat_keepalive
    cfg.local_key = [_local_key(i, item) for i, item in enumerate(_tables("local_key", data))]
    cfg.trust = [_trust(i, item) for i, item in enumerate(_tables("trust", data))]
    cfg.rendezvous = _rendezvous(data.get("rendezvous", []))
    cfg.rendezvous_server = _rendezvous_server(data.get("rendezvous_server", {}))
    rules = [_policy_rule(i, item) for i, item in enumerate(_tables("policy", data))]
    cfg.policy = Policy(tuple(rules))
    return cfg


def _rendezvous(data: Any) -> list[RendezvousPoint]:
    if not isinstance(data, list) or not all(isinstance(i, str) for i in data):
        raise ConfigError('rendezvous: must be a list of strings ("ADDR", "ADDR:PORT", ...)')
    try:
        points = [RendezvousPoint.parse(text) for text in data]
    except RendezvousAddressError as exc:
        raise ConfigError(f"rendezvous: {exc}") from None
    if len({(p.addr, p.port) for p in points}) != len(points):
        raise ConfigError("rendezvous: a rendezvous point is listed twice")
    return points


def _rendezvous_server(data: Any) -> ServerConfig:
    if not isinstance(data, dict):
        raise ConfigError("rendezvous_server: must be a table ([rendezvous_server])")
    server = ServerConfig()
    known = {f.name for f in fields(ServerConfig)}
    for key, value in data.items():
        where = f"rendezvous_server.{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
        if key == "accept":
            if not isinstance(value, list):
                raise ConfigError(f"{where}: must be a list of public keys")
            keys = [parse_public_key(_check_type(where, k, str), where) for k in value]
            server.accept = frozenset(keys)
            continue
        kind = int if isinstance(getattr(server, key), int) else float
        setattr(server, key, _positive(where, _check_type(where, value, kind)))
    return server


def _tables(key: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    items = data.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{key}: must be an array of tables ([[{key}]])")
    return items


def _ihmp(data: Any) -> EngineConfig:
    if not isinstance(data, dict):
        raise ConfigError("ihmp: must be a table ([ihmp])")
    eng = EngineConfig()
    # Top-level keys: strict, nat_keepalive.
    known = {f.name: f for f in fields(EngineConfig) if f.name not in ("strict", "nat_keepalive")}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"ihmp.{key}: unknown key (known: {', '.join(sorted(known))})")
        default = getattr(eng, key)
        kind = int if isinstance(default, int) else float
        value = _check_type(f"ihmp.{key}", value, kind)
        _positive(f"ihmp.{key}", value)
        setattr(eng, key, value)
    return eng


def _scope(where: str, value: Any) -> str:
    value = _check_type(where, value, str)
    try:
        parse_scope(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: not an address, prefix or '*': {value!r}") from exc
    return str(value)


def _local_key(i: int, item: dict[str, Any]) -> KeyBinding:
    where = f"local_key[{i}]"
    extra = set(item) - {"file", "addr"}
    if extra:
        raise ConfigError(f"{where}.{sorted(extra)[0]}: unknown key (known: addr, file)")
    if "file" not in item:
        raise ConfigError(f"{where}.file: missing")
    path = Path(_check_type(f"{where}.file", item["file"], str))
    return KeyBinding(path, _scope(f"{where}.addr", item.get("addr", "*")))


def _trust(i: int, item: dict[str, Any]) -> TrustBinding:
    where = f"trust[{i}]"
    extra = set(item) - {"key", "addr"}
    if extra:
        raise ConfigError(f"{where}.{sorted(extra)[0]}: unknown key (known: addr, key)")
    for k in ("key", "addr"):
        if k not in item:
            raise ConfigError(f"{where}.{k}: missing")
    key = parse_public_key(_check_type(f"{where}.key", item["key"], str), f"{where}.key")
    addr = _scope(f"{where}.addr", item["addr"])
    if addr == "*":
        raise ConfigError(f"{where}.addr: a trusted key needs an address or prefix, not '*'")
    return TrustBinding(key, addr)


_POLICY_KEYS = ("proto", "remote", "remote_port", "local_port", "via", "backup", "return")


def _policy_rule(i: int, item: dict[str, Any]) -> Rule:
    where = f"policy[{i}]"
    extra = set(item) - set(_POLICY_KEYS)
    if extra:
        known = ", ".join(sorted(_POLICY_KEYS))
        raise ConfigError(f"{where}.{sorted(extra)[0]}: unknown key (known: {known})")
    if "via" not in item:
        raise ConfigError(f"{where}.via: missing")
    via = _locators(f"{where}.via", item["via"])
    if not via:
        raise ConfigError(f"{where}.via: must name at least one interface or address")
    return Rule(
        index=i,
        proto=_optional(where, item, "proto", _proto),
        remote=_optional(where, item, "remote", _remote),
        remote_port=_optional(where, item, "remote_port", _rule_port),
        local_port=_optional(where, item, "local_port", _rule_port),
        via=via,
        backup=_locators(f"{where}.backup", item.get("backup", [])),
        return_=_boolean(f"{where}.return", item.get("return", True)),
    )


def _optional(
    where: str, item: dict[str, Any], key: str, parse: Callable[[str, Any], _T]
) -> _T | None:
    return parse(f"{where}.{key}", item[key]) if key in item else None


def _proto(where: str, value: Any) -> int:
    if not isinstance(value, str) or value not in PROTOS:
        raise ConfigError(f"{where}: must be one of {', '.join(PROTOS)}, got {value!r}")
    return PROTOS[value]


def _remote(where: str, value: Any) -> IPv4Network | IPv6Network:
    value = _check_type(where, value, str)
    try:
        return ip_network(value, strict=False)  # host bits ignored, as in trust.addr
    except ValueError:
        raise ConfigError(f"{where}: not an address or prefix: {value!r}") from None


def _rule_port(where: str, value: Any) -> int:
    return _port(where, _check_type(where, value, int))


def _boolean(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be a boolean")
    return value


def _locators(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: must be a list of interface names or addresses")
    for entry in value:
        _locator(where, entry)
    return tuple(value)


def _locator(where: str, entry: str) -> None:
    addr = parse_address(entry)
    if isinstance(addr, IPv6Address) and addr.scope_id:
        # Working addresses carry no zone, so a zoned one would never match.
        raise ConfigError(f"{where}: an address with a zone is not a locator: {entry!r}")
    if addr is None and not _ifname(entry):
        raise ConfigError(f"{where}: not an interface name or address: {entry!r}")


def _ifname(name: str) -> bool:
    # The kernel's dev_valid_name(): under IFNAMSIZ bytes, not "." or "..", and
    # no '/', ':' (alias labels) or whitespace.
    return (
        0 < len(name.encode()) < 16
        and name not in (".", "..")
        and not any(c in "/:\0" or c.isspace() for c in name)
    )


def interface_names() -> set[str]:
    """The names of this network namespace's interfaces (what policy rules name)."""
    return {name for _, name in socket.if_nameindex()}


def load(path: Path | None) -> Config:
    """The configuration at ``path`` (None: all defaults). Raises ConfigError."""
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 (byte {exc.start})") from exc
    # Imported here: a daemon without a config file (the default) keeps tomllib and
    # the datetime it imports out of its memory (0.25 MiB).
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return from_dict(data)


# The kernel gives the initial network namespace a fixed inode (PROC_NET_INIT_INO).
INIT_NETNS_INODE = 0xEFFFFFF9


def netns_id() -> str | None:
    """An id of this network namespace, or None for the machine's initial one.

    The namespace's inode: unique among live namespaces, and readable without
    privileges (unlike /proc/1/ns/net in some containers).
    """
    try:
        inode = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
    return None if inode == INIT_NETNS_INODE else f"netns-{inode}"


def state_dir(cfg: Config) -> Path:
    """Where keys live: per network namespace, so two daemons never share one.

    The config's ``state_dir`` wins, then the environment's ``DIME_STATE_DIR``.
    """
    if cfg.state_dir is not None:
        return cfg.state_dir
    if os.environ.get("DIME_STATE_DIR"):
        return Path(os.environ["DIME_STATE_DIR"])
    ns = netns_id()
    return DEFAULT_STATE_DIR if ns is None else DEFAULT_STATE_DIR / ns


def run_dir() -> Path:
    """Where the crash-cleanup record lives (per network namespace)."""
    ns = netns_id()
    return Path("/run/dime") / (ns or "init")
