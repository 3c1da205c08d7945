"""A flood of spoofed HELLOs at the CH, on the real kernel (issue 10).

The Fig. 7 testbed with an attacker namespace on the router: thousands of HELLOs,
signed and unsigned in turn, each from another address of ``SPOOF_NET``, sent
through a raw socket to the CH's IHMP port for a few seconds
(:mod:`testbed.flood`), while a TCP transfer MH -> CH runs, handed off before the
flood (so the CH translates it). The CH's dime may answer such a HELLO only with a
cookie, which is smaller than the HELLO, and must keep nothing. Checked:

* the peers in the CH's table stay at their count before the flood (the MH alone)
  and under the configured cap (``max_peers``, small here), in every status;
* the CH daemon's RSS grows by less than ``RSS_BOUND_MIB`` (see there), and the
  flood leaves no conntrack entries (dime takes IHMP out of conntrack);
* every ``dime status`` asked during the flood answers (no timing is asserted);
* the transfer arrives intact (SHA-256), with no TCP reset, and the MH is still
  the CH's peer at its new address;
* no answer of the CH to the spoofed range is larger than the smallest HELLO of
  the flood (nft counters in the router), and there are answers;
* the drops are counted by reason, and cookies were sent;
* spoofed TCP SYNs to the CH's open port (a new flow from each source) make the CH
  send no IHMP at all: no HELLO to a source that may be spoofed.

Speed figures are the benchmark's (``python -m testbed.flood bench``), not this test's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from testbed.flood import (
    HEADERS,
    SPOOF_NET,
    Flooder,
    Watch,
    add_attacker,
    conntrack_count,
    install_counters,
    read_counters,
    smallest_request,
)
from testbed.procstat import ProcCpu
from testbed.runner import Dime, any_established, handed_off, up_all
from tests.netns_util import check_transfer, daemons_stopped, fig7_testbed, tcp_transfer

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

SOURCES = 6000  # spoofed sources, one HELLO each (signed and unsigned in turn)
SECONDS = 4.0  # how long the flood lasts
SYNS = 300  # spoofed TCP SYNs to the CH's open port, after the HELLOs
MAX_PEERS = 64  # the CH's cap, small: the flood would fill it many times over
# The CH daemon's RSS may grow by less than this: IHMP keeps at most its bounded
# per-source rate table (about 1 MiB). (Before dime took IHMP out of conntrack, each
# spoofed source left a conntrack entry, which dime's liveness sweep listed: 3.7 to
# 8.9 MiB for 6000 sources, 17 to 44 MiB for 50,000.)
RSS_BOUND_MIB = 8.0
RATE = 4.0  # Mbit/s: the TCP transfer's pace


def test_flood_of_spoofed_hellos_creates_nothing_and_answers_small(tmp_path: Path) -> None:
    with fig7_testbed("flood") as fig:
        p = fig.plan
        attacker = add_attacker(fig)
        request_min = smallest_request("mixed")  # the unsigned HELLO
        install_counters(fig.r, p.c1.host, SPOOF_NET, larger_than=HEADERS + request_min)
        cfg = tmp_path / "dime.toml"
        cfg.write_text(f"[ihmp]\nmax_peers = {MAX_PEERS}\nmax_half_open = 16\n")
        daemons = {n: Dime.in_dir(getattr(fig, n), tmp_path, n) for n in ("ch", "mh")}
        ch, mh = daemons["ch"], daemons["mh"]

        def logs() -> str:
            return "\n".join(d.log_tail(60) for d in daemons.values())

        # Built while dime starts (a key per signed HELLO), sent on go().
        flooder = Flooder.start(attacker, p.c1.host, SOURCES, kind="mixed", rate=SOURCES / SECONDS)
        try:
            with daemons_stopped(daemons.values, logs):
                up_all([ch, mh], "-v", "--config", str(cfg))
                built = flooder.ready(timeout=120)
                assert built["sources"] == SOURCES
                assert built["request_bytes_min"] == request_min
                nbytes = int(RATE * 1e6 / 8 * (SECONDS + 8))
                server, client = tcp_transfer(
                    fig.mh, fig.ch, p.c1.host, nbytes, RATE, timeout=90, hold_open=True
                )
                ch.wait_status(any_established, timeout=20)
                fig.hard_handoff_mh(0.5)
                st = ch.wait_status(handed_off(p.m1.host, p.m2.host), timeout=30)
                # Translated: the flow's identifier is still the MH's old address.
                assert [s["remote"].rsplit(":", 1)[0] for s in st["sockets"]] == [p.m1.host]

                before = ch.status()
                assert before["limits"]["max_peers"] == MAX_PEERS
                pid = int(before["pid"])
                peers_before = before["counters"]["peers"]
                rss_before = ProcCpu(pid).rss_kib()
                ct_before = conntrack_count(fig.ch)
                watch = Watch(ch, pid, interval=0.2, timeout=60)
                watch.start()
                try:
                    flooder.go()
                    sent = flooder.result(timeout=SECONDS * 10 + 60)
                    time.sleep(1.5)  # the daemon drains its socket; one more poll or so
                finally:
                    watch.stop()
                after = ch.status()
                rss_after = ProcCpu(pid).rss_kib()
                at_router = read_counters(fig.r)
                ct_after = conntrack_count(fig.ch)

                # Then spoofed SYNs to the CH's open port: a new flow from each
                # source, which the CH's dime must not answer with a HELLO.
                syns = Flooder.start(attacker, p.c1.host, SYNS, kind="syn", rate=SYNS / 2)
                try:
                    syns.ready(timeout=60)
                    syns.go()
                    syn_sent = syns.result(timeout=60)
                finally:
                    syns.stop()
                time.sleep(1.0)
                after_syns_status = ch.status()
                after_syns = after_syns_status["counters"]
                hellos_for_syns = after_syns["messages_sent"] - after["counters"]["messages_sent"]
                at_router_syns = read_counters(fig.r)

                check_transfer((fig.ch, fig.mh), server, client, nbytes, logs())
                c0, c1 = before["counters"], after["counters"]
                dropped = {
                    k: v - c0["dropped"].get(k, 0)
                    for k, v in c1["dropped"].items()
                    if v - c0["dropped"].get(k, 0)
                }
                cookies = c1["cookies_sent"] - c0["cookies_sent"]
                rss_max = max([rss_after, *(kib for _, kib in watch.rss_kib)])
                peers_seen = [q.status["counters"]["peers"] for q in watch.polls if q.status]
                received = c1["messages_received"] - c0["messages_received"]
                mib = (
                    f"{rss_before / 1024:.1f} -> {rss_after / 1024:.1f} (max {rss_max / 1024:.1f})"
                )
                slowest = max((q.seconds for q in watch.polls), default=0.0)
                print(
                    f"\nflood: {sent}; at the router {at_router}; CH received {received}, "
                    f"cookies {cookies}, dropped {dropped} (before the flood {c0['dropped']}); "
                    f"conntrack entries {ct_before} -> {ct_after}; peers {peers_before} -> "
                    f"{c1['peers']} (seen {sorted(set(peers_seen))}); RSS MiB {mib}; "
                    f"{len(watch.polls)} status polls, slowest {slowest:.2f} s"
                )

                assert sent["sent"] == SOURCES, sent
                # Spoofed SYNs made no IHMP at all (no HELLO to their sources).
                print(f"SYNs: {syn_sent}; CH IHMP sent meanwhile {hellos_for_syns}, "
                      f"dropped {after_syns['dropped']}")  # fmt: skip
                assert syn_sent["sent"] == SYNS, syn_sent
                assert hellos_for_syns == 0, after_syns
                # They made hosts, within the cap, and the MH's (with its flow) stayed.
                assert after_syns["peers"] <= MAX_PEERS, after_syns
                assert handed_off(p.m1.host, p.m2.host)(after_syns_status), after_syns_status
                assert at_router_syns["larger"]["packets"] == 0, at_router_syns
                # dime status answered every time during the flood.
                assert watch.polls, "no status poll ran during the flood"
                unanswered = [q for q in watch.polls if q.status is None]
                assert not unanswered, f"{len(unanswered)} status polls unanswered\n{logs()}"
                # The flood created no peer, and the cap held throughout.
                assert peers_seen and all(n == peers_before for n in peers_seen), peers_seen
                assert c1["peers"] == peers_before <= MAX_PEERS
                assert c1["peers_half_open"] == 0
                # Memory stayed flat, and the flood left nothing in conntrack.
                assert ct_after - ct_before < 100, (ct_before, ct_after)
                assert rss_max - rss_before < RSS_BOUND_MIB * 1024, (rss_before, rss_max)
                # The MH is still the CH's peer, at its new address.
                assert handed_off(p.m1.host, p.m2.host)(after), after["hids"]
                # Answers went back to the spoofed range, none larger than a request.
                assert at_router["requests"]["packets"] > 0
                assert at_router["answers"]["packets"] > 0, at_router
                assert at_router["larger"]["packets"] == 0, at_router
                # Drops are counted by reason; cookies were sent.
                assert sum(dropped.values()) > 0, c1["dropped"]
                assert cookies > 0
                assert c1["messages_received"] > c0["messages_received"]
                for d in (ch, mh):
                    d.down().check()
        finally:
            flooder.stop()
