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

This module is the program's entry point; the commands are click's, in
:mod:`dime.commands`. A plain ``dime up`` (the options below, well formed) starts the
daemon without loading click: click and the command line it builds would stay
resident in the daemon for nothing (1.4 MiB of the idle daemon's RSS, with what click
imports: datetime, uuid, platform, gettext). Anything else ``dime up`` is given
(``--help``, an unknown option, a bad value) goes to click, which answers as it
always has.
"""

from __future__ import annotations

import importlib.util
import os
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
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn

from dime import control, keystore
from dime.config import Config, ConfigError, interface_names, load

EXIT_ERROR = 1
EXIT_USAGE = 2

DATAPLANES = ("auto", "nft", "nfqueue")  # dime up --dataplane (click's Choice too)
PORTS = (1, 65535)  # dime up --port, dime rendezvous --port (click's IntRange too)


def main() -> None:
    """The ``dime`` program: ``dime up`` as :func:`up_options` reads it, else click."""
    args = sys.argv[1:]
    if args[:1] == ["up"] and (options := up_options(args[1:])) is not None:
        try:
            up(**options)
        except KeyboardInterrupt:  # before the daemon handles it: as click would
            if sys.stderr is not None:
                print("Aborted!", file=sys.stderr, flush=True)
            sys.exit(EXIT_ERROR)
        return
    from dime.commands import main as commands

    commands()


def up_options(args: list[str]) -> dict[str, Any] | None:
    """The options of ``dime up ARGS`` as click's ``up`` command gets them, or None
    where click must read them: help, an unknown or repeated option, a missing or bad
    value. Only what click reads the same way is read here."""
    opts: dict[str, Any] = {
        "config_path": None,
        "dataplane": None,
        "port": None,
        "strict": None,
        "verbose": 0,
    }
    seen: set[str] = set()
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--verbose":
            opts["verbose"] += 1
            continue
        if arg[:1] == "-" and set(arg[1:]) == {"v"}:  # -v, -vv, ...
            opts["verbose"] += len(arg) - 1
            continue
        name, eq, value = arg.partition("=")
        if name in seen or name not in ("--config", "--dataplane", "--port", "--strict"):
            return None
        seen.add(name)
        if name == "--strict":
            if eq:
                return None
            opts["strict"] = True
            continue
        if not eq:
            if not rest:
                return None
            value = rest.pop(0)
        if not value or value.startswith("-"):
            return None
        if name == "--config":
            # click.Path refuses a path that exists and cannot be read.
            if os.path.exists(value) and not os.access(value, os.R_OK):
                return None
            opts["config_path"] = Path(value)
        elif name == "--dataplane":
            if value not in DATAPLANES:
                return None
            opts["dataplane"] = value
        else:
            if not (value.isascii() and value.isdigit()):
                return None
            opts["port"] = int(value)
            if not PORTS[0] <= opts["port"] <= PORTS[1]:
                return None
    return opts


def up(
    config_path: Path | None,
    dataplane: str | None,
    port: int | None,
    strict: bool | None,
    verbose: int,
) -> None:
    """Run the daemon in the foreground in this network namespace (``dime up``)."""
    cfg = load_config(config_path)
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
    setup_logging(cfg, verbose)
    from dime.daemon import Daemon

    serve(Daemon(cfg, config_path).run(), "dime")


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """One line on stderr, and exit with ``code``."""
    if sys.stderr is not None:
        print(f"dime: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def load_config(path: Path | None) -> Config:
    try:
        return load(path)
    except ConfigError as exc:
        fail(f"config: {exc}", EXIT_USAGE)


def setup_logging(cfg: Config, verbose: int) -> None:
    level = {0: cfg.log_level, 1: "info"}.get(verbose, "debug")
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def serve(daemon: Coroutine[Any, Any, None], name: str) -> None:
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


if __name__ == "__main__":
    main()
