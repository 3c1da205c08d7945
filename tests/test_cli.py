"""The ``dime`` command line, without a daemon and without touching the kernel.

Commands that would reach a daemon talk to a private control socket name, and the
ones that write keys use a temporary state directory, so nothing here depends on,
or changes, the machine this runs on.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st

from dime import cli, commands, control, keystore
from testbed.runner import dime_executable

DIME = dime_executable()  # this environment's dime (its venv), else the one on PATH
COMMANDS = ("up", "down", "status", "keygen", "set-local-key", "trust", "rendezvous", "nat")
KEY_HEX = bytes(range(32)).hex()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real daemon, state dir or run dir: a private socket name and tmp dirs."""
    monkeypatch.setattr(control, "ADDRESS", f"\0dime-test-{uuid.uuid4().hex}")
    state = tmp_path / "state"
    monkeypatch.setenv("DIME_STATE_DIR", str(state))
    return state


def invoke(*args: str) -> Result:
    return CliRunner().invoke(commands.main, list(args), catch_exceptions=False)


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {text!r}"
    return lines[0]


# -- help ---------------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert re.search(rf"^\s+{re.escape(command)}\s", result.stdout, re.M), command
    assert invoke("-h").stdout == result.stdout


def test_the_installed_entry_point_runs() -> None:
    proc = subprocess.run([DIME, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert all(c in proc.stdout for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: main {command}")


# -- up with a bad config -----------------------------------------------------------------


@pytest.fixture
def nothing_may_start(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any step past config validation is recorded (and refused)."""
    import dime.daemon

    reached: list[str] = []

    def refuse(what: str) -> Any:
        def f(*args: object, **kwargs: object) -> None:
            reached.append(what)
            raise AssertionError(f"dime up went on to {what}")

        return f

    monkeypatch.setattr(dime.daemon.Daemon, "__init__", refuse("create the daemon"))
    monkeypatch.setattr(dime.daemon.Daemon, "run", refuse("run the daemon"))
    monkeypatch.setattr(control, "bind", refuse("take the control socket"))
    monkeypatch.setattr(dime.daemon, "previous_run", refuse("look for a previous run"))
    return reached


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('bogus = "x"\n', "bogus"),
        ("port = 70000\n", "port"),
        ('port = "4731"\n', "port"),
        ("[ihmp]\nmax_rto = 0\n", "ihmp.max_rto"),
        ('[[trust]]\nkey = "00"\naddr = "192.0.2.7"\n', "trust[0].key"),
    ],
)
def test_up_with_a_bad_config_fails_before_starting_anything(
    tmp_path: Path, nothing_may_start: list[str], text: str, key: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = invoke("up", "--config", str(path))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert one_line(result.stderr).startswith(f"dime: config: {key}: ")
    assert nothing_may_start == []


def test_up_with_a_missing_or_broken_config_names_the_file(
    tmp_path: Path, nothing_may_start: list[str]
) -> None:
    missing = tmp_path / "missing.toml"
    result = invoke("up", "--config", str(missing))
    assert result.exit_code == 2
    assert one_line(result.stderr) == (
        f"dime: config: {missing}: cannot read: No such file or directory"
    )
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1\n")
    result = invoke("up", "--config", str(broken))
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith(f"dime: config: {broken}: not valid TOML: ")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    result = invoke("up", "--config", str(binary))
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith(f"dime: config: {binary}: not valid TOML: ")
    assert nothing_may_start == []


def test_up_options_are_checked_by_click(nothing_may_start: list[str]) -> None:
    for args in (["--port", "0"], ["--port", "65536"], ["--dataplane", "ebpf"]):
        result = invoke("up", *args)
        assert result.exit_code == 2, args
        assert "Invalid value" in result.stderr
    assert nothing_may_start == []


def test_up_subprocess_with_an_unknown_key_fails_at_config_validation(tmp_path: Path) -> None:
    """The real entry point: exit 2 and the config error is the only thing printed.

    Safe in any namespace: a config error ends ``dime up`` before it takes the
    control socket or touches the kernel (the in-process tests above prove it).
    """
    path = tmp_path / "bad.toml"
    path.write_text("port = 4731\nnot_a_key = 1\n")
    proc = subprocess.run(
        [DIME, "up", "-v", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert one_line(proc.stderr).startswith("dime: config: not_a_key: unknown key")


# -- dime up without click ----------------------------------------------------------------

UP_TOKENS = (
    "--config", "x.toml", "--config=x.toml", "--config=", "--dataplane", "nft", "auto",
    "nfqueue", "ebpf", "--dataplane=nfqueue", "--port", "4731", "0", "65535", "65536",
    "080", "+80", "--port=99", "--strict", "--strict=1", "-v", "-vv", "--verbose", "-h",
    "--help", "--", "-x", "--conf", "", "up", "v-", "-vh",
)  # fmt: skip


@given(st.lists(st.sampled_from(UP_TOKENS), max_size=7))
@settings(max_examples=400, deadline=None)
def test_up_options_read_only_what_click_reads_the_same(args: list[str]) -> None:
    """What ``dime up`` reads without click, click reads too, to the same values."""
    options = cli.up_options(args)
    if options is not None:
        assert commands.up.make_context("up", list(args)).params == options, args


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-v"],
        ["-vv", "--verbose"],
        ["--dataplane", "nft"],
        ["--dataplane=nfqueue", "--port=4731", "--strict"],
        ["--config", "/etc/dime/dime.toml", "--port", "080", "-v"],
    ],
)
def test_plain_up_options_are_read_without_click(args: list[str]) -> None:
    assert cli.up_options(args) == commands.up.make_context("up", list(args)).params


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["-h"],
        ["--port", "0"],
        ["--port", "+80"],
        ["--dataplane", "ebpf"],
        ["--config"],
        ["--strict", "--strict"],
        ["--port", "1", "--port", "2"],
        ["extra"],
        ["--conf", "x"],
        ["-vh"],
    ],
)
def test_other_up_options_are_left_to_click(args: list[str]) -> None:
    assert cli.up_options(args) is None


def test_dime_up_runs_the_daemon_without_loading_click() -> None:
    """The dime program: ``dime up`` with its options, as click would read them, and
    neither click nor dime.commands resident in the daemon. (The daemon is a stub;
    should the real one be reached, it stops at the control socket, before the
    kernel.)"""
    code = (
        "import logging, sys\n"
        "sys.argv = ['/usr/bin/dime', 'up', '-vv', '--port', '4000', '--dataplane=nft',"
        " '--strict', '--config', '/dev/null']\n"
        "import dime.cli, dime.control, dime.daemon\n"
        "def refuse(*args, **kwargs):\n"
        "    raise SystemExit('the real daemon was reached')\n"
        "dime.control.bind = dime.daemon.previous_run = refuse\n"
        "class Daemon:\n"
        "    def __init__(self, cfg, path):\n"
        "        print(cfg.port, cfg.dataplane, cfg.strict, path, logging.getLogger().level)\n"
        "    async def run(self):\n"
        "        print(sorted(m for m in ('click', 'dime.commands') if m in sys.modules))\n"
        "dime.daemon.Daemon = Daemon\n"
        "dime.cli.main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.split("\n")[:2] == ["4000 nft True /dev/null 10", "[]"], proc.stderr


def test_dime_up_that_click_reads_answers_as_before(tmp_path: Path) -> None:
    """The real entry point: help and a bad option are click's, as before. (With a
    bad config too: were the option taken, the config would stop ``dime up`` before
    it started anything.)"""
    bad = tmp_path / "bad.toml"
    bad.write_text("not_a_key = 1\n")
    up = [DIME, "up", "--config", str(bad)]
    help_ = subprocess.run([*up, "--help"], capture_output=True, text=True, timeout=30)
    assert help_.returncode == 0
    assert help_.stdout.startswith("Usage: dime up [OPTIONS]")
    port = subprocess.run([*up, "--port", "0"], capture_output=True, text=True, timeout=30)
    assert port.returncode == 2
    assert port.stdout == ""
    assert "Error: Invalid value for '--port': 0 is not in the range 1<=x<=65535." in port.stderr


# -- status and down without a daemon ---------------------------------------------------


def test_status_without_a_daemon() -> None:
    for args in (["status"], ["status", "--json"]):
        result = invoke(*args)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert one_line(result.stderr) == "dime: dime is not running in this network namespace"


def test_down_without_a_daemon_or_residue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dime.daemon

    monkeypatch.setattr(dime.daemon, "run_dir", lambda: tmp_path / "run")
    result = invoke("down")
    assert result.exit_code == 0
    assert one_line(result.stdout) == "dime is not running here"


# -- keygen -------------------------------------------------------------------------------


def test_keygen_writes_a_private_pem_and_prints_the_public_key(tmp_path: Path) -> None:
    out = tmp_path / "keys" / "lab.key"
    result = invoke("keygen", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    public = one_line(result.stdout)
    assert re.fullmatch(r"[0-9a-f]{64}", public)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    pem = out.read_text()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----\n")
    assert pem.rstrip().endswith("-----END PRIVATE KEY-----")
    assert keystore.public_hex(keystore.load(out)) == public


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "lab.key"
    first = invoke("keygen", "--out", str(out))
    assert first.exit_code == 0
    before = out.read_bytes()
    again = invoke("keygen", "--out", str(out))
    assert again.exit_code == 1
    assert again.stdout == ""
    assert one_line(again.stderr) == f"dime: {out} exists; not overwriting it"
    assert out.read_bytes() == before
    other = tmp_path / "other"
    other.write_text("not a key")
    assert invoke("keygen", "--out", str(other)).exit_code == 1
    assert other.read_text() == "not a key"


def test_keygen_without_out_writes_the_host_key(isolated: Path) -> None:
    result = invoke("keygen")
    assert result.exit_code == 0
    host = isolated / keystore.HOST_KEY
    assert stat.S_IMODE(host.stat().st_mode) == 0o600
    assert keystore.public_hex(keystore.load(host)) == one_line(result.stdout)
    assert invoke("keygen").exit_code == 1


def test_keygen_into_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("keygen", "--out", str(blocker / "k.key"))
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("dime: ")


# -- trust and set-local-key ------------------------------------------------------------


@pytest.mark.parametrize(
    "pubkey",
    [
        "00" * 31,
        "00" * 33,
        "zz" * 32,
        base64.b64encode(b"\1" * 31).decode(),
        "",
    ],
)
def test_trust_with_a_bad_key_exits_2(isolated: Path, pubkey: str) -> None:
    result = invoke("trust", pubkey, "--addr", "192.0.2.7")
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith("dime: PUBKEY: not a 32-byte Ed25519 public key")
    assert not (isolated / keystore.BINDINGS).exists()


@pytest.mark.parametrize("addr", ["*", "192.0.2.300", "nonsense"])
def test_trust_with_a_bad_addr_exits_2(isolated: Path, addr: str) -> None:
    result = invoke("trust", KEY_HEX, "--addr", addr)
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith("dime: ")
    assert not (isolated / keystore.BINDINGS).exists()


def test_trust_needs_addr() -> None:
    result = invoke("trust", KEY_HEX)
    assert result.exit_code == 2
    assert "--addr" in result.stderr


def test_trust_hex_and_base64_are_saved(isolated: Path) -> None:
    key2 = bytes(range(50, 82))
    result = invoke("trust", KEY_HEX, "--addr", "192.0.2.7")
    assert result.exit_code == 0, result.stderr
    assert one_line(result.stdout) == f"trusting {KEY_HEX} for 192.0.2.7"
    b64 = base64.b64encode(key2).decode()
    result = invoke("trust", b64, "--addr", "2001:db8::/32")
    assert result.exit_code == 0, result.stderr
    # the same address again replaces the earlier binding
    assert invoke("trust", key2.hex(), "--addr", "192.0.2.7").exit_code == 0
    saved = json.loads((isolated / keystore.BINDINGS).read_text())
    assert saved["trust"] == [
        {"key": key2.hex(), "addr": "2001:db8::/32"},
        {"key": key2.hex(), "addr": "192.0.2.7"},
    ]


def test_set_local_key(tmp_path: Path, isolated: Path) -> None:
    key = tmp_path / "lab.key"
    assert invoke("keygen", "--out", str(key)).exit_code == 0
    result = invoke("set-local-key", str(key), "--addr", "198.51.100.0/24")
    assert result.exit_code == 0, result.stderr
    assert one_line(result.stdout) == f"{key} signs messages from 198.51.100.0/24"
    saved = json.loads((isolated / keystore.BINDINGS).read_text())
    assert saved["local_keys"] == [{"file": str(key.resolve()), "addr": "198.51.100.0/24"}]


def test_set_local_key_refuses_bad_input(tmp_path: Path, isolated: Path) -> None:
    key = tmp_path / "lab.key"
    assert invoke("keygen", "--out", str(key)).exit_code == 0
    not_a_key = tmp_path / "junk.key"
    not_a_key.write_text("junk")
    for args in (
        [str(tmp_path / "missing.key")],
        [str(not_a_key)],
        [str(key), "--addr", "198.51.100.0/40"],
    ):
        result = invoke("set-local-key", *args)
        assert result.exit_code == 2, args
        assert one_line(result.stderr).startswith("dime: "), args
    assert not (isolated / keystore.BINDINGS).exists()


# -- format_status ------------------------------------------------------------------------

SAMPLE: dict[str, Any] = {
    "pid": 4242,
    "uptime": 12.5,
    "dataplane": "nft",
    "port": 4731,
    "local_addresses": ["198.51.100.2", "2001:db8:1::2"],
    "ghosts": ["203.0.113.2"],
    "hids": [
        {
            "hid": 1,
            "active": ["192.0.2.1"],
            "unreachable": [],
            "local": ["198.51.100.2"],
            "key": "ab" * 32,
            "state": "established",
        },
        {
            "hid": 23,
            "active": [],
            "unreachable": ["192.0.2.129", "192.0.2.1"],
            "local": [],
            "key": None,
            "state": "hello_sent",
        },
    ],
    "sockets": [
        {
            "proto": "tcp",
            "local": "198.51.100.2:40000",
            "remote": "192.0.2.1:5001",
            "hid": 1,
            "via": "203.0.113.7",
            "to": "192.0.2.1",
            "rule": 0,
        },
        {"proto": "udp", "local": "[2001:db8:1::2]:53", "remote": "[2001:db8::9]:53", "hid": 23},
    ],
    "counters": {
        "messages_sent": 7,
        "messages_received": 5,
        "messages_rejected": {"bad_signature": 2, "replay": 1},
        "retransmissions": 0,
    },
}


def test_format_status_renders_tables() -> None:
    text = commands.format_status(SAMPLE)
    lines = text.splitlines()
    assert lines[0] == "dime pid 4242, up 12.5 s, dataplane nft, IHMP port 4731"
    assert lines[1] == "local addresses: 198.51.100.2 2001:db8:1::2"
    assert lines[2] == "ghost addresses (kept on lo): 203.0.113.2"
    hid_header = next(i for i, line in enumerate(lines) if line.startswith("HID "))
    header, first, second = lines[hid_header : hid_header + 3]
    assert header.split() == ["HID", "STATE", "ACTIVE", "UNREACHABLE", "LOCAL", "NAT", "KEY"]
    assert first.split() == ["1", "established", "192.0.2.1", "-", "198.51.100.2", "-", "ab" * 8]
    assert second.split() == ["23", "hello_sent", "-", "192.0.2.129", "192.0.2.1", "-", "-", "-"]
    # columns line up: every row's fields start where the header's do
    for row in (first, second):
        for column in ("STATE", "ACTIVE", "UNREACHABLE"):
            assert row[header.index(column) - 1] == " "
            assert row[header.index(column)] != " "
    sock_header = next(i for i, line in enumerate(lines) if line.startswith("PROTO"))
    assert lines[sock_header].split() == ["PROTO", "LOCAL", "REMOTE", "HID", "VIA", "TO", "RULE"]
    assert lines[sock_header + 1].split() == [
        *("tcp", "198.51.100.2:40000", "192.0.2.1:5001", "1", "203.0.113.7", "192.0.2.1", "0")
    ]
    assert lines[sock_header + 2].split() == [
        *("udp", "[2001:db8:1::2]:53", "[2001:db8::9]:53", "23", "-", "-", "-")
    ]
    assert lines[-1] == "IHMP: 7 sent, 5 received, rejected: bad_signature 2, replay 1"
    assert all(line == line.rstrip() for line in lines)


def test_format_status_shows_which_end_is_behind_a_nat() -> None:
    behind = {**SAMPLE["hids"][0], "behind_nat": True, "behind_nat_addr": "10.77.1.20"}
    us = {**SAMPLE["hids"][0], "hid": 2, "we_are_behind_nat": True, "we_are_observed_as": "1.2.3.4"}
    counters = {**SAMPLE["counters"], "flows_bound": 3, "knocks_sent": 0, "keepalives_sent": 2}
    text = commands.format_status({**SAMPLE, "hids": [behind, us], "counters": counters})
    assert "peer behind (10.77.1.20)" in text and "we, seen as 1.2.3.4" in text
    assert "NATs: 3 flows bound by knocks, 0 knocks sent, 2 keepalives" in text


def test_format_status_counts_the_flow_ends_the_kernel_announced() -> None:
    ends = {"flow_deaths_heard": 9, "flow_deaths_lost": 1, "flow_deaths_malformed": 0}
    counters = {**SAMPLE["counters"], **ends, "flows_ended_by_events": 4, "full_sweeps": 2}
    text = commands.format_status({**SAMPLE, "counters": counters})
    assert (
        "flow ends: 9 heard from the kernel (1 losses, 0 malformed), 4 flows ended by them, "
        "2 full sweeps" in text
    )
    assert "a sweep missed" not in text
    counters["flows_ended_after_sweeps"] = 3
    text = commands.format_status({**SAMPLE, "counters": counters})
    assert "2 full sweeps (3 flows a sweep missed, ended by a lookup)" in text


def test_format_status_of_an_idle_daemon() -> None:
    idle = {
        **SAMPLE,
        "local_addresses": [],
        "ghosts": [],
        "hids": [],
        "sockets": [],
        "counters": {"messages_sent": 0, "messages_received": 0, "messages_rejected": {}},
    }
    text = commands.format_status(idle)
    assert "local addresses: -" in text
    assert "ghost" not in text
    assert "HID  STATE  ACTIVE  UNREACHABLE  LOCAL  NAT  KEY" in text
    assert "PROTO  LOCAL  REMOTE  HID" in text
    assert text.splitlines()[-1] == "IHMP: 0 sent, 0 received, rejected: none"


def test_format_status_shows_what_the_flood_limits_refused() -> None:
    st = {
        **SAMPLE,
        "counters": {
            **SAMPLE["counters"],
            "dropped": {"cookie_rate": 41748, "rate_limited": 3},
            "cookies_sent": 5499,
            "challenges_sent": 4,
            "addresses_validated": 3,
            "peers": 2,
            "peers_half_open": 1,
            "peers_evicted": 0,
        },
        "limits": {"max_peers": 4096, "max_half_open": 256},
    }
    assert commands.format_status(st).splitlines()[-1] == (
        "flood limits: refused cookie_rate 41748, rate_limited 3; cookies 5499, challenges 4 "
        "(3 answered); peers 2/4096, half-open 1/256, evicted 0"
    )


def test_format_status_shows_the_rendezvous_points() -> None:
    points = [
        {"server": "192.0.2.53", "registered": True, "observed_as": "198.51.100.2"},
        {"server": "[2001:db8::53]:4731", "registered": False, "observed_as": None},
    ]
    counters = {**SAMPLE["counters"], "relays_sent": 3, "relayed_received": 1}
    text = commands.format_status({**SAMPLE, "rendezvous": points, "counters": counters})
    assert "rendezvous point 192.0.2.53: registered, seen as 198.51.100.2" in text
    assert "rendezvous point [2001:db8::53]:4731: not registered" in text
    assert "relayed: 3 sent through rendezvous points, 1 received" in text


def test_format_status_of_a_rendezvous_point() -> None:
    st = {
        "role": "rendezvous",
        "pid": 7,
        "uptime": 3.0,
        "port": 4731,
        "registered_hosts": [
            {
                "key": "ab" * 32,
                "address": "198.51.100.2",
                "port": 40001,
                "advertised": ["10.77.1.20"],
                "expires_in": 80.5,
            },
        ],
        "counters": {"registrations": 4, "relayed": 2, "expired": 0, "refused": {"replay": 1}},
    }
    lines = commands.format_status(st).splitlines()
    assert lines[0] == "dime rendezvous pid 7, up 3.0 s, UDP port 4731"
    assert lines[2].split() == ["KEY", "ADDRESS", "PORT", "ADVERTISED", "EXPIRES", "IN"]
    assert lines[3].split() == ["abababababababab", "198.51.100.2", "40001", "10.77.1.20",
                                "80.5", "s"]  # fmt: skip
    assert lines[-1] == (
        "1 registered hosts; 4 registrations, 2 messages relayed, 0 expired, refused: replay 1"
    )


def test_rendezvous_with_a_bad_config_fails_before_taking_the_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "bind", lambda: pytest.fail("took the control socket"))
    path = tmp_path / "bad.toml"
    path.write_text('rendezvous_server = { accept = ["00"] }\n')
    result = invoke("rendezvous", "--config", str(path))
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith("dime: config: rendezvous_server.accept: ")


def test_status_prints_what_the_daemon_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "request", lambda cmd, **kw: SAMPLE if cmd == "status" else {})
    result = invoke("status", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == SAMPLE
    result = invoke("status")
    assert result.exit_code == 0
    assert result.stdout == commands.format_status(SAMPLE) + "\n"


def test_env_is_isolated(isolated: Path) -> None:
    # guard for the fixture itself: nothing in this module may use the real state dir
    from dime.config import Config, state_dir

    assert state_dir(Config()) == isolated
    assert os.environ["DIME_STATE_DIR"] == str(isolated)
