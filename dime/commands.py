"""The ``dime`` commands, as click reads them: everything :func:`dime.cli.main` (the
program) does not start itself, which is all but a plain ``dime up`` (see
:mod:`dime.cli`). Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import click

from dime import cli, control, keystore
from dime.cli import EXIT_USAGE, fail, load_config, serve, setup_logging
from dime.config import ConfigError, parse_public_key, run_dir, state_dir


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """DIME: TCP and UDP connections that survive address changes."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--dataplane", type=click.Choice(cli.DATAPLANES), help="Data plane.")
@click.option("--port", type=click.IntRange(*cli.PORTS), help="IHMP UDP port.")
@click.option("--strict", is_flag=True, default=None, help="Accept only configured peer keys.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def up(**options: Any) -> None:
    """Run the daemon in the foreground in this network namespace."""
    cli.up(**options)  # the same parameters: cli.up's


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def nat(config_path: Path | None, verbose: int) -> None:
    """Run an IHMP-aware NAT on this NAT router (foreground, this network namespace).

    It tells the peers of dime hosts behind this NAT which port each of their flows
    got (NAT_ENTRY), so a host that moves here needs no guessing."""
    cfg = load_config(config_path)
    setup_logging(cfg, verbose)
    from dime.natd import NatDaemon

    serve(NatDaemon(cfg).run(), "dime nat")


@main.command()
@click.option("--port", type=click.IntRange(*cli.PORTS), help="UDP port (default: 4731).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def rendezvous(port: int | None, config_path: Path | None, verbose: int) -> None:
    """Serve as a rendezvous point (foreground, this network namespace).

    Hosts that list this one in their `rendezvous` config key register their
    addresses here; when both ends of a connection move at once, or a peer's NAT
    filters, their address events are forwarded through it (signed end to end).
    Data never passes through it."""
    cfg = load_config(config_path)
    if port is not None:
        cfg.port = port
    setup_logging(cfg, verbose)
    from dime.rendezvousd import RendezvousDaemon

    serve(RendezvousDaemon(cfg).run(), "dime rendezvous")


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
            + (
                f" ({c['flows_ended_after_sweeps']} flows a sweep missed, ended by a lookup)"
                if c.get("flows_ended_after_sweeps")
                else ""
            )
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
    path = out or state_dir(load_config(config_path)) / keystore.HOST_KEY
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
    sdir = state_dir(load_config(config_path))
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
    sdir = state_dir(load_config(config_path))
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
