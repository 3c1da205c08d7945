"""Our nft table's text, checked by the kernel's own nft in a throwaway namespace."""

from __future__ import annotations

import os
import re
from ipaddress import ip_address

import pytest

from stacktrans.nft import IN_KERNEL_PREFIX, NftTable, QueueSpec, merge_elements, ruleset
from stacktrans.socket_table import TCP, FlowKey, SocketEntry
from testbed.netns import topology

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a namespace")


def nft_check(text: str) -> tuple[int, str]:
    with topology("nftc") as topo:
        ns = topo.add_ns("x")
        proc = ns.popen("nft", "-c", "-f", "-", stdin=-1, stdout=-1, stderr=-1)
        _, err = proc.communicate(text.encode(), timeout=30)
        return proc.returncode, err.decode()


@pytest.mark.netns
@needs_root
@pytest.mark.parametrize("fast_path", [True, False])
def test_ruleset_is_accepted_by_nft(fast_path: bool) -> None:
    code, err = nft_check(ruleset(fast_path=fast_path, ihmp_port=4731))
    assert code == 0, err


@pytest.mark.netns
@needs_root
@pytest.mark.parametrize("every_packet", [True, False])
def test_native_queue_rules_fail_only_on_the_missing_queue_statement(
    every_packet: bool,
) -> None:
    """This kernel has no nft queue: every error must point at a queue statement,
    so the rest of the native-queue table is valid nft."""
    text = ruleset(fast_path=not every_packet, queue=QueueSpec(10, 11, 4731, every_packet))
    code, err = nft_check(text)
    if code == 0:
        return  # a kernel with nft queue: all of it is accepted
    errors = [line for line in err.splitlines() if "Error:" in line]
    assert errors, err
    for line in errors:
        assert "Could not process rule" in line, err
    # Each failing rule is one of ours with a queue statement.
    failing = re.findall(r"^\s+(.*queue num \d+ bypass)$", err, re.M)
    assert len(failing) == len(errors), err


def test_native_queue_rules_select_what_the_iptables_rules_select() -> None:
    first = ruleset(fast_path=True, queue=QueueSpec(10, 11, 4731, every_packet=False))
    every = ruleset(fast_path=False, queue=QueueSpec(10, 11, 4731, every_packet=True))
    assert "ct state new meta mark != 0 queue num 10 bypass" in first
    assert "chain q_new" in first and "chain q_new" not in every
    assert "meta l4proto { tcp, udp } queue num 11 bypass" in every
    for text in (first, every):
        assert 'oifname "lo" return' in text and "udp dport 4731 return" in text
        assert "icmpv6 type" in text and "packet-too-big" in text


def test_the_kernel_learns_first_packets_and_logs_them_in_nft_mode_only() -> None:
    fast = ruleset(fast_path=True, ihmp_port=4731, log_group=77)
    slow = ruleset(fast_path=False, ihmp_port=4731, log_group=77)
    assert "log group" not in slow and "learn_out" not in slow
    for way in ("out", "in"):
        assert f"chain learn_{way} {{" in fast
        for f in ("4", "6"):
            assert f"chain new_{way}{f} {{" in fast and f"chain learn_{way}{f} {{" in fast
    # Learned: the flow and its inbound restoration, from the packet path.
    assert "add @flows4 { meta l4proto . ip saddr . th sport . ip daddr . th dport }" in fast
    assert "add @rid6 { meta mark . meta l4proto . th sport . th dport : ip6 saddr }" in fast
    assert "add @taken6 { meta mark . meta l4proto . th sport . th dport }" in fast
    # A known host's other addresses, and a taken inbound key: the daemon decides.
    assert "meta mark set ip daddr map @hid4 meta mark set 0xd1e6 return" in fast
    assert "meta mark . meta l4proto . th dport . th sport @taken4 meta mark set 0xd1e6" in fast
    assert "meta mark 0xd1e6 meta mark set 0" in fast  # cleared again both ways
    assert fast.count("log group 77 snaplen 80") >= 6
    assert "flags dynamic; size 2097152;" in fast


@pytest.mark.parametrize("fast_path", [True, False])
def test_no_map_is_looked_up_as_a_set(fast_path: bool) -> None:
    """Linux 6.1 refuses ``expr @m`` where m is a map (no data wanted): "Could not
    process rule: Invalid argument". Maps are only looked up for their data
    (``map @m``) or added to (``add @m``)."""
    text = ruleset(
        fast_path=fast_path,
        queue=QueueSpec(10, 11, 4731, not fast_path),
        ihmp_port=4731,
        log_group=77,
    )
    maps = re.findall(r"^  map (\w+) \{", text, re.M)
    assert "rid4" in maps or not fast_path
    assert "sender" in maps
    for name in maps:
        for m in re.finditer(rf"(\S+) @{name}\b", text):
            assert m.group(1) in ("map", "add"), text[text.rfind("\n", 0, m.start()) :][:200]


def test_notices_of_flows_the_kernel_holds_say_so() -> None:
    """Learned in the packet path, or a SYN-ACK of a flow in the flow set: prefix
    "k" (the daemon adds nothing); a flow passed unknown: no prefix."""
    fast = ruleset(fast_path=True, ihmp_port=4731, log_group=77, held_log_group=78)
    chains = {c.split(" {", 1)[0]: c for c in fast.split("  chain ")[1:]}
    # Those go to their own group (which the daemon lets the kernel batch); the
    # others, which may need a prompt reaction (a HELLO), to the first.
    held = f'log group 78 snaplen 80 prefix "{IN_KERNEL_PREFIX}"'
    logs = re.findall(r"log group \d+ snaplen 80(?: prefix \"\w+\")?", fast)
    assert logs and set(logs) == {"log group 77 snaplen 80", held}
    # Without a group of their own, the same group.
    one = ruleset(fast_path=True, ihmp_port=4731, log_group=77)
    assert f'log group 77 snaplen 80 prefix "{IN_KERNEL_PREFIX}"' in one
    assert "log group 78" not in one
    for way in ("out", "in"):
        assert f"jump synack_{way}" in chains[f"learn_{way}"]
        # What is neither new nor a SYN-ACK leaves the chain by its first rules.
        rules = [r.strip() for r in chains[f"learn_{way}"].splitlines()[2:4]]
        assert rules == [
            "ct state != new meta l4proto != tcp return",
            "ct state != new tcp flags & (syn | ack) != syn | ack return",
        ]
        synack = chains[f"synack_{way}"]
        assert f"@flows4 {held} return" in synack and f"@flows6 {held} return" in synack
        assert synack.rstrip().splitlines()[-2].strip() == "log group 77 snaplen 80"
        for f in ("4", "6"):
            assert held in chains[f"learn_{way}{f}"]
            assert "prefix" not in chains[f"new_{way}{f}"]


@pytest.mark.parametrize("every_packet", [True, False])
def test_iptables_queue_rules_take_only_marked_first_packets_in_nft_mode(
    every_packet: bool,
) -> None:
    from stacktrans.queue_rules import XtQueueRules

    rules = XtQueueRules(10, 11, 4731, every_packet)._chains(v6=False)
    text = "\n".join(rules["mangle"] + rules["raw"])
    marked = "--ctstate NEW -m mark ! --mark 0 -j NFQUEUE"
    assert (marked in text) is not every_packet
    assert "--tcp-flags SYN,ACK SYN,ACK" not in text  # SYN-ACKs are logged, not queued


def _flows(n: int) -> list[SocketEntry]:
    local, remote = ip_address("192.0.2.1"), ip_address("198.51.100.2")
    return [SocketEntry(FlowKey(TCP, local, 40000 + i, remote, 80), 7, 0.0, 0.0) for i in range(n)]


def test_element_commands_are_merged_per_set_and_verb_in_order() -> None:
    cmds = [
        "add element inet dime flows4 { a }",
        "add element inet dime rid4 { x : 1 }",
        "add element inet dime flows4 { b }",
        "delete element inet dime flows4 { a }",
        "delete element inet dime rid4 { x }",
        "add element inet dime flows4 { a }",
        "flush set inet dime flows4",
        "add element inet dime flows4 { c }",
    ]
    assert merge_elements(cmds) == [
        "add element inet dime flows4 { a, b }",
        "add element inet dime rid4 { x : 1 }",
        # A delete never moves past an add (nor an add past a delete) of the set.
        "delete element inet dime flows4 { a }",
        "delete element inet dime rid4 { x }",
        "add element inet dime flows4 { a }",
        "flush set inet dime flows4",
        "add element inet dime flows4 { c }",
    ]
    # Each flow's elements: one command per set, whatever the number of flows.
    table = NftTable(None, fast_path=True)  # type: ignore[arg-type]
    per_flow = table._flow_cmds("delete", _flows(1))
    merged = merge_elements(table._flow_cmds("delete", _flows(50)))
    assert len(per_flow) >= 4 and len(merged) == len(per_flow)
    assert all(m.count(",") == 49 for m in merged)


@pytest.mark.netns
@needs_root
def test_merged_element_commands_are_accepted_by_nft() -> None:
    table = NftTable(None, fast_path=True)  # type: ignore[arg-type]
    flows = _flows(3)
    batch = merge_elements(table._flow_cmds("add", flows)) + merge_elements(
        table._flow_cmds("delete", flows)
    )
    assert len(batch) < len(table._flow_cmds("add", flows))
    text = ruleset(fast_path=True, ihmp_port=4731, log_group=77) + "\n" + "\n".join(batch)
    code, err = nft_check(text)
    assert code == 0, err
