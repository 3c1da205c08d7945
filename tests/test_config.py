"""dime's TOML config: defaults, a full file, and one-line errors naming the key."""

from __future__ import annotations

import base64
import os
import tomllib
from ipaddress import ip_network
from pathlib import Path

import pytest

from dime.config import (
    Config,
    ConfigError,
    KeyBinding,
    TrustBinding,
    from_dict,
    load,
    parse_public_key,
)
from ihmp.engine import EngineConfig
from stacktrans.policy import Policy, Rule
from stacktrans.socket_table import TCP, UDP

KEY = bytes(range(32))
KEY_HEX = KEY.hex()
KEY_B64 = base64.b64encode(KEY).decode()
KEY2 = bytes(range(100, 132))


def write(tmp_path: Path, text: str, name: str = "dime.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(data: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def file_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- defaults ---------------------------------------------------------------------------


def test_no_file_gives_the_defaults() -> None:
    cfg = load(None)
    assert cfg == Config()
    assert cfg.port == 4731
    assert cfg.dataplane == "auto"
    assert cfg.strict is False
    assert cfg.log_level == "info"
    assert cfg.state_dir is None
    assert cfg.handoff_window == 1.0
    assert cfg.sweep_interval == 2.0
    assert (cfg.queue_out, cfg.queue_in) == (4731, 4732)
    assert cfg.adopt_existing is True
    assert cfg.ihmp == EngineConfig()
    assert cfg.local_key == [] and cfg.trust == []
    assert cfg.policy == Policy()


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")) == Config()
    assert load(write(tmp_path, "# only a comment\n")) == Config()


# -- a full valid file ------------------------------------------------------------------

FULL = f"""
port = 5000
dataplane = "nfqueue"
strict = true
log_level = "debug"
state_dir = "/srv/dime-state"
handoff_window = 2          # an integer where a number is expected is fine
sweep_interval = 0.5
queue_out = 0
queue_in = 65535
adopt_existing = false

[ihmp]
initial_rto = 0.25
max_rto = 8
max_attempts = 9
probe_attempts = 2
legacy_hold_down = 60.0
path_loss_grace = 12.5

[[local_key]]
file = "/etc/dime/lab.key"
addr = "198.51.100.0/24"

[[local_key]]
file = "/etc/dime/other.key"

[[trust]]
key = "{KEY_HEX}"
addr = "192.0.2.7"

[[trust]]
key = "{KEY_B64}"
addr = "2001:db8::/32"

[[trust]]
key = "  {KEY2.hex().upper()}  "
addr = "203.0.113.0/24"
"""


def test_a_full_file_parses_into_the_right_values(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, FULL))
    assert cfg.port == 5000
    assert cfg.dataplane == "nfqueue"
    assert cfg.strict is True
    assert cfg.log_level == "debug"
    assert cfg.state_dir == Path("/srv/dime-state")
    assert cfg.handoff_window == 2.0 and isinstance(cfg.handoff_window, float)
    assert cfg.sweep_interval == 0.5
    assert (cfg.queue_out, cfg.queue_in) == (0, 65535)
    assert cfg.adopt_existing is False
    assert cfg.ihmp == EngineConfig(
        initial_rto=0.25,
        max_rto=8.0,
        max_attempts=9,
        probe_attempts=2,
        legacy_hold_down=60.0,
        path_loss_grace=12.5,
    )
    assert isinstance(cfg.ihmp.max_rto, float)
    assert isinstance(cfg.ihmp.max_attempts, int)
    assert cfg.ihmp.strict is False  # the top-level strict reaches the engine at start
    assert cfg.local_key == [
        KeyBinding(Path("/etc/dime/lab.key"), "198.51.100.0/24"),
        KeyBinding(Path("/etc/dime/other.key"), "*"),
    ]
    assert cfg.trust == [
        TrustBinding(KEY, "192.0.2.7"),
        TrustBinding(KEY, "2001:db8::/32"),
        TrustBinding(KEY2, "203.0.113.0/24"),
    ]


def test_the_documented_example_is_a_valid_config() -> None:
    import dime.config

    doc = dime.config.__doc__ or ""
    example = "\n".join(line[4:] for line in doc.splitlines() if line.startswith("    "))
    example = example.replace("hex or base64 of the 32-byte Ed25519 public key", KEY_HEX)
    cfg = from_dict(tomllib.loads(example))
    assert cfg.state_dir == Path("/var/lib/dime")
    assert cfg.local_key == [KeyBinding(Path("/etc/dime/lab.key"), "198.51.100.0/24")]
    assert cfg.trust == [TrustBinding(KEY, "192.0.2.7")]
    assert cfg.ihmp == EngineConfig()
    assert len(cfg.policy.rules) == 1 and cfg.policy.rules[0].proto == TCP


def test_one_key_changes_only_that_key() -> None:
    cfg = from_dict({"port": 6000})
    assert cfg.port == 6000
    cfg.port = 4731
    assert cfg == Config()


# -- bad input: one line, starting with the key -----------------------------------------


def test_unknown_top_level_key() -> None:
    msg = error({"prot": 4731})
    assert msg.startswith("prot: unknown key")
    assert "port" in msg  # lists the known keys


def test_unknown_ihmp_key() -> None:
    assert error({"ihmp": {"initial_rtt": 1.0}}).startswith("ihmp.initial_rtt: unknown key")
    # strict is a top-level key, not an [ihmp] one
    assert error({"ihmp": {"strict": True}}).startswith("ihmp.strict: unknown key")


def test_ihmp_must_be_a_table() -> None:
    assert error({"ihmp": 3}).startswith("ihmp: ")


@pytest.mark.parametrize(
    ("data", "key", "detail"),
    [
        ({"port": "4731"}, "port", "expected an integer, got str"),
        ({"port": True}, "port", "expected an integer, got a boolean"),
        ({"port": 4731.0}, "port", "expected an integer, got float"),
        ({"queue_in": False}, "queue_in", "got a boolean"),
        ({"strict": "yes"}, "strict", "expected true or false"),
        ({"strict": 1}, "strict", "expected true or false"),
        ({"adopt_existing": 0}, "adopt_existing", "expected true or false"),
        ({"dataplane": 1}, "dataplane", "expected a string"),
        ({"log_level": ["info"]}, "log_level", "expected a string"),
        ({"state_dir": 7}, "state_dir", "expected a string"),
        ({"handoff_window": "1s"}, "handoff_window", "expected a number"),
        ({"sweep_interval": True}, "sweep_interval", "got a boolean"),
        ({"ihmp": {"max_attempts": "6"}}, "ihmp.max_attempts", "expected an integer"),
        ({"ihmp": {"max_attempts": True}}, "ihmp.max_attempts", "got a boolean"),
        ({"ihmp": {"max_attempts": 6.5}}, "ihmp.max_attempts", "expected an integer"),
        ({"ihmp": {"initial_rto": "0.5"}}, "ihmp.initial_rto", "expected a number"),
        ({"ihmp": {"max_rto": False}}, "ihmp.max_rto", "got a boolean"),
    ],
)
def test_wrong_type(data: dict[str, object], key: str, detail: str) -> None:
    msg = error(data)
    assert msg.startswith(f"{key}: "), msg
    assert detail in msg


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"port": 0}, "port"),
        ({"port": -1}, "port"),
        ({"port": 65536}, "port"),
        ({"queue_out": -1}, "queue_out"),
        ({"queue_in": 65536}, "queue_in"),
    ],
)
def test_out_of_range_port(data: dict[str, object], key: str) -> None:
    msg = error(data)
    assert msg.startswith(f"{key}: must be between")


def test_port_bounds_are_accepted() -> None:
    assert from_dict({"port": 1}).port == 1
    assert from_dict({"port": 65535}).port == 65535


def test_queue_in_equal_to_queue_out() -> None:
    assert error({"queue_in": 7, "queue_out": 7}).startswith("queue_in: must differ")
    # the default queue_in (4732) against a queue_out set to it
    assert error({"queue_out": 4732}).startswith("queue_in: must differ")


def test_the_two_log_groups() -> None:
    assert (Config().log_group, Config().held_log_group) == (4731, 4732)
    assert from_dict({"held_log_group": 9}).held_log_group == 9
    assert error({"held_log_group": 7, "log_group": 7}).startswith("held_log_group: must differ")
    assert error({"log_group": 4732}).startswith("held_log_group: must differ")
    assert error({"held_log_group": 70000}).startswith("held_log_group")


def test_bad_dataplane_and_log_level() -> None:
    msg = error({"dataplane": "ebpf"})
    assert msg.startswith("dataplane: must be one of auto, nft, nfqueue")
    assert "'ebpf'" in msg
    msg = error({"log_level": "verbose"})
    assert msg.startswith("log_level: must be one of debug, info, warning, error")
    assert error({"log_level": "INFO"}).startswith("log_level: ")


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"handoff_window": 0}, "handoff_window"),
        ({"handoff_window": -1.5}, "handoff_window"),
        ({"sweep_interval": 0.0}, "sweep_interval"),
        ({"sweep_interval": float("nan")}, "sweep_interval"),
        ({"ihmp": {"initial_rto": 0}}, "ihmp.initial_rto"),
        ({"ihmp": {"max_rto": -4.0}}, "ihmp.max_rto"),
        ({"ihmp": {"max_attempts": 0}}, "ihmp.max_attempts"),
        ({"ihmp": {"probe_attempts": -1}}, "ihmp.probe_attempts"),
        ({"ihmp": {"legacy_hold_down": 0.0}}, "ihmp.legacy_hold_down"),
        ({"ihmp": {"path_loss_grace": float("nan")}}, "ihmp.path_loss_grace"),
    ],
)
def test_non_positive_durations(data: dict[str, object], key: str) -> None:
    assert error(data).startswith(f"{key}: must be greater than 0")


def test_nan_in_a_toml_file_is_refused(tmp_path: Path) -> None:
    msg = file_error(write(tmp_path, "handoff_window = nan\n"))
    assert msg.startswith("handoff_window: must be greater than 0")


@pytest.mark.parametrize(
    "key",
    [
        KEY_HEX[:-2],  # 31 bytes
        KEY_HEX + "00",  # 33 bytes
        base64.b64encode(KEY[:16]).decode(),
        base64.b64encode(KEY + b"\0").decode(),
        "not a key",
        "",
    ],
)
def test_bad_trust_key(key: str) -> None:
    msg = error({"trust": [{"key": key, "addr": "192.0.2.7"}]})
    assert msg.startswith("trust[0].key: not a 32-byte Ed25519 public key")


def test_trust_key_of_the_wrong_type() -> None:
    assert error({"trust": [{"key": 5, "addr": "192.0.2.7"}]}).startswith("trust[0].key: ")


def test_the_index_of_the_bad_trust_entry_is_named() -> None:
    good = {"key": KEY_HEX, "addr": "192.0.2.7"}
    msg = error({"trust": [good, {"key": "00", "addr": "192.0.2.8"}]})
    assert msg.startswith("trust[1].key: ")


def test_trust_addr_star_is_refused() -> None:
    msg = error({"trust": [{"key": KEY_HEX, "addr": "*"}]})
    assert msg.startswith("trust[0].addr: a trusted key needs an address or prefix")


@pytest.mark.parametrize("addr", ["192.0.2.0/33", "2001:db8::/129", "not-an-address", "", "**"])
def test_bad_addr_prefix(addr: str) -> None:
    msg = error({"trust": [{"key": KEY_HEX, "addr": addr}]})
    assert msg.startswith("trust[0].addr: not an address, prefix or '*'")
    msg = error({"local_key": [{"file": "/k", "addr": addr}]})
    assert msg.startswith("local_key[0].addr: not an address, prefix or '*'")


def test_trust_entry_missing_or_extra_keys() -> None:
    assert error({"trust": [{"addr": "192.0.2.7"}]}).startswith("trust[0].key: missing")
    assert error({"trust": [{"key": KEY_HEX}]}).startswith("trust[0].addr: missing")
    msg = error({"trust": [{"key": KEY_HEX, "addr": "192.0.2.7", "port": 1}]})
    assert msg.startswith("trust[0].port: unknown key")


def test_local_key_missing_file() -> None:
    assert error({"local_key": [{"addr": "198.51.100.0/24"}]}).startswith(
        "local_key[0].file: missing"
    )


def test_local_key_bad_entries() -> None:
    assert error({"local_key": [{"file": 3}]}).startswith("local_key[0].file: expected a string")
    msg = error({"local_key": [{"file": "/k", "path": "/k"}]})
    assert msg.startswith("local_key[0].path: unknown key")
    assert error({"local_key": [{"file": "/k"}, {}]}).startswith("local_key[1].file: missing")


def test_arrays_of_tables_must_be_arrays_of_tables() -> None:
    assert error({"local_key": {"file": "/k"}}).startswith("local_key: must be an array")
    assert error({"trust": "192.0.2.7"}).startswith("trust: must be an array")
    assert error({"trust": [1, 2]}).startswith("trust: must be an array")


def test_errors_from_a_file_name_the_key(tmp_path: Path) -> None:
    msg = file_error(write(tmp_path, 'port = 4731\nbogus = "x"\n'))
    assert msg.startswith("bogus: unknown key")
    msg = file_error(write(tmp_path, "[ihmp]\nmax_attempts = 0\n"))
    assert msg.startswith("ihmp.max_attempts: must be greater than 0")


# -- unreadable and invalid files -------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "port = \n",
        "port = 4731\nport = 4732\n",
        "[ihmp\n",
        'dataplane = "nft\n',
        "= 1\n",
    ],
)
def test_invalid_toml_names_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    msg = file_error(path)
    assert msg.startswith(f"{path}: not valid TOML: ")


def test_a_file_that_is_not_utf8_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"port = 1\n\xff\xfe\n")
    msg = file_error(path)
    assert msg.startswith(f"{path}: not valid TOML: ")


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert file_error(path) == f"{path}: cannot read: No such file or directory"


def test_a_directory_names_the_file(tmp_path: Path) -> None:
    msg = file_error(tmp_path)
    assert msg.startswith(f"{tmp_path}: cannot read: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 1\n")
    path.chmod(0)
    assert file_error(path) == f"{path}: cannot read: Permission denied"


def test_an_unreadable_file_names_the_file_as_root_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "port = 1\n")

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    assert file_error(path) == f"{path}: cannot read: Permission denied"


# -- public keys ------------------------------------------------------------------------


def test_parse_public_key_hex_and_base64() -> None:
    assert parse_public_key(KEY_HEX, "k") == KEY
    assert parse_public_key(KEY_HEX.upper(), "k") == KEY
    assert parse_public_key(KEY_B64, "k") == KEY
    assert parse_public_key(f"\n {KEY_B64}\t", "k") == KEY
    with pytest.raises(ConfigError, match=r"^PUBKEY: not a 32-byte"):
        parse_public_key(KEY_B64[:-4], "PUBKEY")


# -- rendezvous points ------------------------------------------------------------------


def test_rendezvous_points_in_every_form() -> None:
    cfg = from_dict({"rendezvous": ["192.0.2.53", "192.0.2.54:9000", "[2001:db8::53]:4731"]})
    assert [(p.name, str(p.addr), p.port) for p in cfg.rendezvous] == [
        ("192.0.2.53", "192.0.2.53", 4731),
        ("192.0.2.54:9000", "192.0.2.54", 9000),
        ("[2001:db8::53]:4731", "2001:db8::53", 4731),
    ]
    assert load(None).rendezvous == []


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ("192.0.2.53", "must be a list of strings"),
        ([4731], "must be a list of strings"),
        (["rv.example"], "not ADDR, ADDR:PORT or [V6ADDR]:PORT"),
        (["192.0.2.53:0"], "port 0 out of range"),
        (["192.0.2.53", "192.0.2.53:4731"], "listed twice"),
    ],
)
def test_bad_rendezvous_points_are_one_line(value: object, detail: str) -> None:
    with pytest.raises(ConfigError, match=r"^rendezvous: ") as exc:
        from_dict({"rendezvous": value})
    assert detail in str(exc.value)


def test_rendezvous_server_keys() -> None:
    key = "ab" * 32
    cfg = from_dict({"rendezvous_server": {"accept": [key], "max_hosts": 5, "lifetime": 60}})
    server = cfg.rendezvous_server
    assert server.accept == frozenset({bytes.fromhex(key)})
    assert (server.max_hosts, server.lifetime) == (5, 60.0)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"bogus": 1}, "rendezvous_server.bogus"),
        ({"accept": "ab"}, "rendezvous_server.accept"),
        ({"accept": ["00"]}, "rendezvous_server.accept"),
        ({"max_hosts": 0}, "rendezvous_server.max_hosts"),
        ({"lifetime": "long"}, "rendezvous_server.lifetime"),
    ],
)
def test_bad_rendezvous_server_keys(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        from_dict({"rendezvous_server": table})


# -- [[policy]] -------------------------------------------------------------------------

POLICY = """
[[policy]]
proto = "tcp"
remote = "192.0.2.0/24"
remote_port = 22
local_port = 5001
via = ["m1", "10.0.2.1"]
backup = ["m3"]
return = false

[[policy]]
proto = "udp"
remote = "2001:db8::1"
via = ["2001:db8:1::1"]

[[policy]]
via = ["wlan0"]
"""


def test_policy_rules_parse_in_order(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, POLICY))
    assert cfg.policy == Policy(
        (
            Rule(
                0,
                proto=TCP,
                remote=ip_network("192.0.2.0/24"),
                remote_port=22,
                local_port=5001,
                via=("m1", "10.0.2.1"),
                backup=("m3",),
                return_=False,
            ),
            Rule(1, proto=UDP, remote=ip_network("2001:db8::1/128"), via=("2001:db8:1::1",)),
            Rule(2, via=("wlan0",)),
        )
    )
    assert cfg.policy.rules[2].return_ is True


def test_a_rule_in_its_config_form_parses_back_to_itself() -> None:
    rules = load_policy(tomllib.loads(POLICY))
    again = from_dict({"policy": [rule.to_json() for rule in rules]}).policy.rules
    assert again == rules


def load_policy(data: dict[str, object]) -> tuple[Rule, ...]:
    return from_dict(data).policy.rules


def test_a_remote_with_host_bits_is_its_prefix() -> None:
    rules = load_policy({"policy": [{"remote": "192.0.2.9/24", "via": ["m1"]}]})
    assert rules[0].remote == ip_network("192.0.2.0/24")


def test_interface_names_at_the_limits_are_accepted() -> None:
    names = ["a", "x" * 15, "eth0.100", "wlp0s20f3", "br-lan", "1234"]
    assert load_policy({"policy": [{"via": names}]})[0].via == tuple(names)


def rule_error(rule: dict[str, object], index: int = 0) -> str:
    good = {"via": ["m1"]}
    return error({"policy": [good] * index + [rule]})


@pytest.mark.parametrize(
    ("rule", "start"),
    [
        ({"proto": "icmp", "via": ["m1"]}, "policy[0].proto: must be one of tcp, udp"),
        ({"proto": "TCP", "via": ["m1"]}, "policy[0].proto: must be one of tcp, udp"),
        ({"proto": 6, "via": ["m1"]}, "policy[0].proto: must be one of tcp, udp"),
        ({"proto": ["tcp"], "via": ["m1"]}, "policy[0].proto: must be one of tcp, udp"),
        ({"remote": "x", "via": ["m1"]}, "policy[0].remote: not an address or prefix: 'x'"),
        ({"remote": "192.0.2.0/33", "via": ["m1"]}, "policy[0].remote: not an address or prefix"),
        ({"remote": "*", "via": ["m1"]}, "policy[0].remote: not an address or prefix"),
        ({"remote": 3, "via": ["m1"]}, "policy[0].remote: expected a string"),
        ({"remote_port": 0, "via": ["m1"]}, "policy[0].remote_port: must be between 1 and 65535"),
        ({"remote_port": 65536, "via": ["m1"]}, "policy[0].remote_port: must be between 1"),
        ({"remote_port": "22", "via": ["m1"]}, "policy[0].remote_port: expected an integer"),
        ({"remote_port": True, "via": ["m1"]}, "policy[0].remote_port: expected an integer"),
        ({"local_port": -1, "via": ["m1"]}, "policy[0].local_port: must be between 1 and 65535"),
        ({"local_port": 1.5, "via": ["m1"]}, "policy[0].local_port: expected an integer"),
        ({}, "policy[0].via: missing"),
        ({"proto": "tcp"}, "policy[0].via: missing"),
        ({"via": []}, "policy[0].via: must name at least one"),
        ({"via": "m1"}, "policy[0].via: must be a list of interface names or addresses"),
        ({"via": ["m1", 2]}, "policy[0].via: must be a list of interface names or addresses"),
        ({"via": ["x" * 16]}, "policy[0].via: not an interface name or address: 'xxxx"),
        ({"via": [""]}, "policy[0].via: not an interface name or address: ''"),
        ({"via": ["."]}, "policy[0].via: not an interface name or address: '.'"),
        ({"via": [".."]}, "policy[0].via: not an interface name or address: '..'"),
        ({"via": ["a/b"]}, "policy[0].via: not an interface name or address: 'a/b'"),
        ({"via": ["eth 0"]}, "policy[0].via: not an interface name or address: 'eth 0'"),
        ({"via": ["eth\t0"]}, "policy[0].via: not an interface name or address"),
        ({"via": ["eth0:1"]}, "policy[0].via: not an interface name or address: 'eth0:1'"),
        ({"via": ["fe80::1%m1"]}, "policy[0].via: an address with a zone is not a locator"),
        ({"via": ["m1"], "backup": "m2"}, "policy[0].backup: must be a list of interface"),
        ({"via": ["m1"], "backup": [None]}, "policy[0].backup: must be a list of interface"),
        ({"via": ["m1"], "backup": ["a/b"]}, "policy[0].backup: not an interface name or address"),
        ({"via": ["m1"], "return": "yes"}, "policy[0].return: must be a boolean"),
        ({"via": ["m1"], "return": 1}, "policy[0].return: must be a boolean"),
        ({"via": ["m1"], "interface": "m2"}, "policy[0].interface: unknown key (known: backup"),
        ({"via": ["m1"], "return_": False}, "policy[0].return_: unknown key"),
    ],
)
def test_bad_policy_rules_name_the_key(rule: dict[str, object], start: str) -> None:
    assert rule_error(rule).startswith(start)


def test_the_index_of_the_bad_rule_is_named() -> None:
    assert rule_error({"via": ["m1"], "return": "no"}, 2).startswith("policy[2].return: ")


def test_policy_must_be_an_array_of_tables() -> None:
    assert error({"policy": {"via": ["m1"]}}).startswith("policy: must be an array of tables")
    assert error({"policy": ["m1"]}).startswith("policy: must be an array of tables")
