"""The ``dime`` command line.

    dime up [--config FILE] [--dataplane auto|nft|nfqueue] [--port N] [--strict] [-v]
    dime move (--flow "PROTO LOCAL REMOTE" | --peer ADDR) --via IFACE|ADDR
    dime reload
    dime rendezvous [--port N] [--config FILE] [-v]
    dime nat [--config FILE] [-v]
    dime down
    dime status [--json]
    dime keygen [--out FILE]
    dime set-local-key KEYFILE [--addr ADDR|PREFIX|*]
    dime trust PUBKEY --addr ADDR|PREFIX

Every command acts on the current network namespace. Errors are one line on
stderr and a non-zero exit status.
"""

from __future__ import annotations

import importlib.util
import sys

# The dime program speaks no TLS, and its one hash (the cookies' HMAC-SHA256) has a
# builtin implementation: keep asyncio from loading ssl, and hashlib and hmac from
# loading OpenSSL's libcrypto through _hashlib (cryptography brings its own
# OpenSSL). 4.9 MiB of the daemon's RSS. Only in the daemon (`dime up`): an importer
# (tests, the testbed) keeps its ssl, and so does `dime nat`, which loads pyroute2
# (which imports ssl); the daemon's own pyroute2 fallback takes ssl back first
# (stacktrans.kernel_flows.conntrack_udp4).
if (
    __name__ == "dime.cli"
    and sys.argv[1:2] == ["up"]
    and sys.argv[0].endswith("/dime")
    # ... where hashlib has SHA-256 without OpenSSL (some builds leave it out)
    and any(importlib.util.find_spec(m) is not None for m in ("_sha2", "_sha256"))
):
    for _module in ("ssl", "_hashlib"):
        # None there makes importing it raise ImportError, which both callers handle.
        sys.modules.setdefault(_module, None)  # type: ignore[arg-type]

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn

import click

from dime import control, keystore
from dime.config import (
    Config,
    ConfigError,
    interface_names,
    load,
    parse_public_key,
    run_dir,
    state_dir,
)

EXIT_ERROR = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"dime: {message}", err=True)
    sys.exit(code)


def _config(path: Path | None) -> Config:
    try:
        return load(path)
    except ConfigError as exc:
        fail(f"config: {exc}", EXIT_USAGE)


def _logging(cfg: Config, verbose: int) -> None:
    level = {0: cfg.log_level, 1: "info"}.get(verbose, "debug")
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """DIME: TCP and UDP connections that survive address changes."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--dataplane", type=click.Choice(["auto", "nft", "nfqueue"]), help="Data plane.")
@click.option("--port", type=click.IntRange(1, 65535), help="IHMP UDP port.")
@click.option("--strict", is_flag=True, default=None, help="Accept only configured peer keys.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def up(
    config_path: Path | None,
    dataplane: str | None,
    port: int | None,
    strict: bool | None,
    verbose: int,
) -> None:
    """Run the daemon in the foreground in this network namespace."""
    cfg = _config(config_path)
    try:
        cfg.policy.check_interfaces(interface_names())
    except ValueError as exc:
        fail(f"config: {exc}", EXIT_USAGE)
    if dataplane is not None:
        cfg.dataplane = dataplane
    if port is not None:
        cfg.port = port
    if strict:
        cfg.strict = True
    _logging(cfg, verbose)
    from dime.daemon import Daemon

    _serve(Daemon(cfg, config_path).run(), "dime")


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def nat(config_path: Path | None, verbose: int) -> None:
    """Run an IHMP-aware NAT on this NAT router (foreground, this network namespace).

    It tells the peers of dime hosts behind this NAT which port each of their flows
    got (NAT_ENTRY), so a host that moves here needs no guessing."""
    cfg = _config(config_path)
    _logging(cfg, verbose)
    from dime.natd import NatDaemon

    _serve(NatDaemon(cfg).run(), "dime nat")


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), help="UDP port (default: 4731).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def rendezvous(port: int | None, config_path: Path | None, verbose: int) -> None:
    """Serve as a rendezvous point (foreground, this network namespace).

    Hosts that list this one in their `rendezvous` config key register their
    addresses here; when both ends of a connection move at once, or a peer's NAT
    filters, their address events are forwarded through it (signed end to end).
    Data never passes through it."""
    cfg = _config(config_path)
    if port is not None:
        cfg.port = port
    _logging(cfg, verbose)
    from dime.rendezvousd import RendezvousDaemon

    _serve(RendezvousDaemon(cfg).run(), "dime rendezvous")


def _serve(daemon: Coroutine[Any, Any, None], name: str) -> None:
    """Run a daemon until it stops; what stops it early is one line and exit 1."""
    from stacktrans.service import StartError

    try:
        asyncio.run(daemon)
    except (control.AlreadyRunning, StartError, keystore.KeyFileError) as exc:
        fail(str(exc))
    except PermissionError as exc:
        fail(f"permission denied ({exc.filename or exc}): run {name} as root")
    except OSError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the stop.")
@click.option(
    "--keep",
    is_flag=True,
    help="Leave the kernel state and the peers for the next `dime up` to take over "
    "(an upgrade or restart without breaking connections).",
)
def down(timeout: float, keep: bool) -> None:
    """Stop the daemon of this network namespace and remove everything it installed."""
    try:
        control.request("down", keep=keep)
    except control.NotRunning:
        if keep:
            click.echo("dime is not running here")
            return
        from stacktrans.service import clean_leftovers

        if asyncio.run(clean_leftovers(run_dir())):
            click.echo("dime was not running; removed what it had left behind")
        else:
            click.echo("dime is not running here")
        return
    deadline = time.monotonic() + timeout
    while control.running():
        if time.monotonic() > deadline:
            fail(f"the daemon did not stop within {timeout:.0f} s")
        time.sleep(0.1)
    click.echo("dime stopped")


@main.command()
@click.option(
    "--flow", "flow", metavar='"PROTO LOCAL REMOTE"', help="One flow, as status shows it."
)
@click.option("--peer", "peer", metavar="ADDR", help="Every flow to this peer (its address).")
@click.option("--via", required=True, metavar="IFACE|ADDR", help="Our interface or address.")
def move(flow: str | None, peer: str | None, via: str) -> None:
    """Move a live flow, or every flow to a peer, to another local link or address.

    Signed with the peer (IHMP FLOW_MOVE); returns once the peer has acknowledged and
    the data plane uses the new address. It stays there while that address works;
    then the policy (if a rule matches) decides again.

    \b
    dime move --flow "tcp 198.51.100.2:41080 192.0.2.1:5001" --via wlan0
    dime move --peer 192.0.2.1 --via 203.0.113.7
    """
    if (flow is None) == (peer is None):
        fail("name a flow (--flow) or a peer (--peer)", EXIT_USAGE)
    try:
        reply = control.request("move", timeout=30, flow=flow, peer=peer, via=via)
    except control.NotRunning as exc:
        fail(str(exc))
    if "error" in reply:
        fail(reply["error"])
    for name, addr in reply.get("moved", []):
        click.echo(f"{name}: via {addr}")


@main.command()
def reload() -> None:
    """Read the config file again: its [[policy]] applies to new and existing flows.

    The daemon also reloads on SIGHUP. A bad file changes nothing (exit 1). Other
    keys take effect at the next `dime up`."""
    try:
        reply = control.request("reload")
    except control.NotRunning as exc:
        fail(str(exc))
    if "error" in reply:
        fail(reply["error"])
    click.echo(f"reloaded: {reply.get('rules', 0)} policy rules")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status(as_json: bool) -> None:
    """Show HIDs, sockets and counters."""
    try:
        st = control.request("status")
    except control.NotRunning as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(format_status(st))


def format_status(st: dict[str, Any]) -> str:
    if st.get("role") == "rendezvous":
        return _format_rendezvous(st)
    lines = [
        f"dime pid {st['pid']}, up {st['uptime']} s, dataplane {st['dataplane']}, "
        f"IHMP port {st['port']}",
        f"local addresses: {' '.join(st['local_addresses']) or '-'}",
    ]
    if st.get("ghosts"):
        lines.append(f"ghost addresses (kept on lo): {' '.join(st['ghosts'])}")
    lines += [
        "",
        _table(
            ["HID", "STATE", "ACTIVE", "UNREACHABLE", "LOCAL", "NAT", "KEY"],
            [
                [
                    str(h["hid"]),
                    h["state"],
                    " ".join(h["active"]) or "-",
                    " ".join(h["unreachable"]) or "-",
                    " ".join(h["local"]) or "-",
                    _nat(h),
                    (h["key"] or "-")[:16],
                ]
                for h in st["hids"]
            ],
        ),
        "",
        _table(
            ["PROTO", "LOCAL", "REMOTE", "HID", "VIA", "TO", "RULE"],
            [
                [
                    s["proto"],
                    s["local"],
                    s["remote"],
                    str(s["hid"]),
                    s.get("via", "-"),
                    s.get("to", "-"),
                    "-" if s.get("rule") is None else str(s["rule"]),
                ]
                for s in st["sockets"]
            ],
        ),
        "",
    ]
    c = st["counters"]
    rejected = ", ".join(f"{k} {v}" for k, v in c["messages_rejected"].items()) or "none"
    lines.append(
        f"IHMP: {c['messages_sent']} sent, {c['messages_received']} received, rejected: {rejected}"
    )
    if "dropped" in c:
        lines.append(_defences(c, st.get("limits", {})))
    for r in st.get("rendezvous", []):
        seen = f", seen as {r['observed_as']}" if r.get("observed_as") else ""
        state = "registered" if r["registered"] else "not registered"
        lines.append(f"rendezvous point {r['server']}: {state}{seen}")
    if c.get("relays_sent") or c.get("relayed_received"):
        lines.append(
            f"relayed: {c.get('relays_sent', 0)} sent through rendezvous points, "
            f"{c.get('relayed_received', 0)} received"
        )
    if st.get("policy"):
        lines.append(f"locator policy: {len(st['policy'])} rules (dime status --json shows them)")
    if "flow_deaths_heard" in c:
        lines.append(
            f"flow ends: {c['flow_deaths_heard']} heard from the kernel "
            f"({c.get('flow_deaths_lost', 0)} losses, {c.get('flow_deaths_malformed', 0)} "
            f"malformed), {c.get('flows_ended_by_events', 0)} flows ended by them, "
            f"{c.get('full_sweeps', 0)} full sweeps"
        )
    if c.get("flows_bound") or c.get("knocks_sent") or c.get("keepalives_sent"):
        lines.append(
            f"NATs: {c.get('flows_bound', 0)} flows bound by knocks, "
            f"{c.get('knocks_sent', 0)} knocks sent, {c.get('keepalives_sent', 0)} keepalives"
        )
    return "\n".join(lines)


def _format_rendezvous(st: dict[str, Any]) -> str:
    """``dime status`` of a rendezvous point: the hosts registered with it."""
    c = st["counters"]
    refused = ", ".join(f"{k} {v}" for k, v in c["refused"].items()) or "none"
    hosts = st["registered_hosts"]
    rows = [
        [h["key"][:16], h["address"], str(h["port"]), " ".join(h["advertised"]),
         f"{h['expires_in']} s"]
        for h in hosts
    ]  # fmt: skip
    header = ["KEY", "ADDRESS", "PORT", "ADVERTISED", "EXPIRES IN"]
    return "\n".join(
        [
            f"dime rendezvous pid {st['pid']}, up {st['uptime']} s, UDP port {st['port']}",
            "",
            _table(header, rows),
            "",
            f"{len(hosts)} registered hosts; {c['registrations']} registrations, "
            f"{c['relayed']} messages relayed, {c['expired']} expired, refused: {refused}",
        ]
    )


def _nat(h: dict[str, Any]) -> str:
    """The peer behind a NAT (its own address there), or we behind one (as it sees us)."""
    if h.get("behind_nat"):
        return f"peer behind ({h.get('behind_nat_addr')})"
    if h.get("we_are_behind_nat"):
        return f"we, seen as {h.get('we_are_observed_as')}"
    return "-"


def _defences(c: dict[str, Any], limits: dict[str, Any]) -> str:
    """One line: what the flood limits refused, and where the table stands."""
    dropped = ", ".join(f"{k} {v}" for k, v in c["dropped"].items()) or "none"
    return (
        f"flood limits: refused {dropped}; cookies {c['cookies_sent']}, challenges "
        f"{c['challenges_sent']} ({c['addresses_validated']} answered); peers {c['peers']}"
        f"/{limits.get('max_peers', '-')}, half-open {c['peers_half_open']}"
        f"/{limits.get('max_half_open', '-')}, evicted {c['peers_evicted']}"
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="The daemon's config file (for its state_dir).",
)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), help="Key file (default: the host key).")
@CONFIG_OPTION
def keygen(out: Path | None, config_path: Path | None) -> None:
    """Generate an Ed25519 key (mode 0600) and print its public key."""
    path = out or state_dir(_config(config_path)) / keystore.HOST_KEY
    if path.exists():
        fail(f"{path} exists; not overwriting it")
    try:
        key = keystore.generate(path)
    except OSError as exc:
        fail(f"{path}: {exc.strerror}")
    click.echo(keystore.public_hex(key))


def _reload() -> None:
    try:
        reply = control.request("reload-keys")
    except control.NotRunning:
        return
    if "error" in reply:
        fail(f"the running daemon refused the new bindings: {reply['error']}")
    click.echo("the running daemon uses it now")


@main.command("set-local-key")
@click.argument("keyfile", type=click.Path(path_type=Path))
@click.option("--addr", default="*", show_default=True, help="Address, prefix or *.")
@CONFIG_OPTION
def set_local_key(keyfile: Path, addr: str, config_path: Path | None) -> None:
    """Sign IHMP messages sent from ADDR with KEYFILE (the paper's set_local_key)."""
    sdir = state_dir(_config(config_path))
    try:
        bindings = keystore.Bindings.load(sdir)
        bindings.set_local_key(keyfile, addr)
        bindings.save(sdir)
    except (keystore.KeyFileError, ValueError) as exc:
        fail(str(exc), EXIT_USAGE)
    click.echo(f"{keyfile} signs messages from {addr}")
    _reload()


@main.command()
@click.argument("pubkey")
@click.option("--addr", required=True, help="The peer's address or prefix.")
@CONFIG_OPTION
def trust(pubkey: str, addr: str, config_path: Path | None) -> None:
    """Bind peer key PUBKEY (hex or base64) to ADDR a priori."""
    sdir = state_dir(_config(config_path))
    try:
        key = parse_public_key(pubkey, "PUBKEY")
        bindings = keystore.Bindings.load(sdir)
        bindings.add_trust(key, addr)
        bindings.save(sdir)
    except (ConfigError, keystore.KeyFileError, ValueError) as exc:
        fail(str(exc), EXIT_USAGE)
    click.echo(f"trusting {key.hex()} for {addr}")
    _reload()


if __name__ == "__main__":
    main()
