"""The goodput experiment's pure parts: paths, the schedule, the receiver's bytes,
the gap's statistics, the summaries per path and the report.

Nothing here runs the testbed or asserts a timing: the runs are made up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from testbed.experiments import goodput
from testbed.experiments.common import RunContext, nearest_rank
from testbed.experiments.goodput import (
    FULL,
    MAIN,
    PATHS,
    DataPath,
    _shortfall,
    gap_stats,
    path_fields,
    receiver_intervals,
    schedule,
    summarize,
    summarize_paths,
)
from testbed.handoff_gap import rx_bytes

# -- nearest rank and the gap's statistics ------------------------------------------------


def test_nearest_rank() -> None:
    xs = [float(x) for x in range(10, 0, -1)]  # 10 .. 1, unsorted on purpose
    assert nearest_rank(xs, 0.9) == 9.0
    assert nearest_rank(xs, 0.5) == 5.0
    assert nearest_rank(xs, 1.0) == 10.0
    assert nearest_rank([3.0], 0.9) == 3.0
    assert nearest_rank([1.0, 2.0], 0.9) == 2.0  # rank ceil(1.8) = 2
    assert nearest_rank([], 0.9) == 0.0
    with pytest.raises(ValueError):
        nearest_rank([1.0], 0.0)


def test_gap_stats_all_recovered() -> None:
    gaps: list[float | None] = [0.1 * k for k in range(1, 11)]
    st = gap_stats(gaps)
    assert st == {"recovered": 10, "gap_s_median": 0.55, "gap_s_p90": 0.9, "gap_s_max": 1.0}


def test_gap_stats_never_recovered_counts_as_infinite_for_p90_and_max() -> None:
    gaps: list[float | None] = [0.1 * k for k in range(1, 10)] + [None]
    st = gap_stats(gaps)
    assert st["recovered"] == 9
    assert st["gap_s_median"] == 0.5  # of the nine that recovered
    assert st["gap_s_p90"] == 0.9  # rank 9 of 10: the last one that recovered
    assert st["gap_s_max"] is None
    st = gap_stats([0.2, None])  # rank 2 of 2: the one that never recovered
    assert st["gap_s_p90"] is None
    assert gap_stats([None])["gap_s_median"] is None
    assert gap_stats([])["gap_s_p90"] is None


# -- the receiver's bytes --------------------------------------------------------------------

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets
    lo:     100       1    0    0    0     0          0         0      100       1
    m1: 5000000    4000    0    0    0     0          0         0    20000     300
   m10:     777       7    0    0    0     0          0         0        0       0
    m2:  250000     200    0    0    0     0          0         0     1000      10
"""


def test_rx_bytes_sums_the_devices_present() -> None:
    assert rx_bytes(NET_DEV, ("m1", "m2")) == 5_250_000
    assert rx_bytes(NET_DEV, ("m1",)) == 5_000_000  # m10 is another device
    assert rx_bytes(NET_DEV, ("m2", "c1")) == 250_000  # c1 absent: left out
    assert rx_bytes(NET_DEV, ("c1",)) is None  # none there: no reading


RECEIVER = [
    "Connecting to host 2001:db8:c1::1, port 5201",
    "Reverse mode, remote host 2001:db8:c1::1 is sending",
    "[  5] local 2001:db8:1::2 port 46390 connected to 2001:db8:c1::1 port 5201",
    "[ ID] Interval           Transfer     Bitrate",
    "[  5]   0.00-0.10   sec  64.0 KBytes  5234 Kbits/sec                  ",
    "[  5]   0.10-0.20   sec  0.00 Bytes  0.00 Kbits/sec                  ",
    "[  5]   0.20-0.30   sec  1.25 MBytes  104857 Kbits/sec",
    "[  5]   0.40-0.50   sec   225 KBytes  18432 Kbits/sec",  # 0.30-0.40 missing
    "[  5]   0.50-0.60   sec   100 KBytes  8192 Kbits/sec",  # past n: left out
    "- - - - - - - - - - - - - - - - - - - - - - - - -",
    "[ ID] Interval           Transfer     Bitrate         Retr",
    "[  5]   0.00-0.60   sec  1.64 MBytes  22900 Kbits/sec    0             sender",
    "[  5]   0.00-0.60   sec  1.63 MBytes  22800 Kbits/sec                  receiver",
]


def test_receiver_intervals() -> None:
    ivs = receiver_intervals(RECEIVER, 5)
    assert ivs == [64 * 1024, 0.0, 1.25 * 1024**2, 0.0, 225 * 1024]


def test_receiver_intervals_ignore_a_sender() -> None:
    sender = "[  5]   0.00-0.10   sec   230 KBytes  18808 Kbits/sec    0    120 KBytes"
    assert receiver_intervals([sender], 2) == [0.0, 0.0]


# -- paths and the schedule ------------------------------------------------------------------


def test_paths() -> None:
    assert [p.key for p in PATHS] == ["v4 MH->CH", "v6 MH->CH", "v4 CH->MH", "v6 CH->MH"]
    assert MAIN.systems == ("dime", "mptcp", "tcp")
    assert all(p.systems == ("dime", "mptcp") for p in PATHS[1:])
    assert DataPath(6, reverse=True).plan.family == 6
    assert path_fields(PATHS[2]) == {"data_path": "v4 CH->MH", "family": 4, "direction": "CH -> MH"}


def _ctx(runs: int, smoke: bool) -> RunContext:
    return RunContext(out=Path("/nonexistent"), runs=runs, smoke=smoke, tmp=Path("/tmp"))


def test_schedule_full_interleaves_every_path() -> None:
    plan = schedule(_ctx(2, smoke=False))
    per_rep = 9 + 3 * 6
    assert len(plan) == 2 * per_rep
    assert [i for i, *_ in plan] == [0] * per_rep + [1] * per_rep  # each repetition: all once
    first = {(p.key, s, h) for _, p, s, h in plan[:per_rep]}
    assert len(first) == per_rep
    assert ("v4 MH->CH", "tcp", "hard") in first
    assert not any(s == "tcp" and p != MAIN for _, p, s, _ in plan)


def test_schedule_smoke_is_short_and_has_a_new_path() -> None:
    plan = schedule(_ctx(10, smoke=True))
    assert len(plan) <= 6
    assert any(p.reverse and p.family == 6 for _, p, _, _ in plan)


# -- summaries per path ----------------------------------------------------------------------


def _run(
    path: DataPath, system: str, handoff: str, goodput_mbps: float, gap: float | None
) -> dict[str, Any]:
    n = round(FULL.duration / goodput.INTERVAL)
    r: dict[str, Any] = {
        "system": system,
        "handoff": handoff,
        "run": 0,
        **path_fields(path),
        "goodput_mbps": goodput_mbps,
        "timeline_mbps": [goodput_mbps] * n,
        "rtt_ms": 60.0 + path.family,  # v6 paths: 66 ms
    }
    if handoff != "none":
        r["gap_s"] = gap
    return r


def _runs() -> list[dict[str, Any]]:
    out = []
    for p in PATHS:
        for s in p.systems:
            out += [
                _run(p, s, "none", 18.0, None),
                _run(p, s, "soft", 18.0 if s == "dime" else 17.0, 0.1),
                _run(p, s, "hard", 11.9, 0.2 if p.reverse else 0.1),
            ]
    return out


def test_summarize_keeps_to_its_path() -> None:
    runs = _runs()
    s = summarize(runs, FULL, PATHS[3])
    assert set(s) == {"dime", "mptcp"}
    assert s["dime"]["none"]["n"] == 1
    assert s["dime"]["hard"]["ideal_mbps"] == 12.0
    assert s["dime"]["hard"]["ratio"] == pytest.approx(11.9 / 12.0, abs=1e-3)
    assert s["dime"]["hard"]["gap_s_p90"] == 0.2
    # Results written before there were paths: every run is the main path's.
    old = [{k: v for k, v in r.items() if k not in ("data_path", "family", "direction")}
           for r in runs if r["data_path"] == MAIN.key]  # fmt: skip
    assert summarize(old, FULL) == summarize(runs, FULL)


def test_summarize_paths_goals_use_each_paths_rtt() -> None:
    paths = summarize_paths(_runs(), FULL)
    assert list(paths) == [p.key for p in PATHS]
    v6r = paths["v6 CH->MH"]
    assert v6r["systems"] == ["dime", "mptcp"] and v6r["direction"] == "CH -> MH"
    assert v6r["rtt_ms"]["mean"] == 66.0
    cmp_ = v6r["comparisons"]
    assert cmp_["goal_gap_s"] == 0.116
    assert cmp_["soft"]["dime_ge_mptcp"] and cmp_["soft"]["dime_ratio_ok"]
    assert not cmp_["hard"]["dime_gap_max_ok"]  # 200 ms > 116 ms
    assert paths["v4 MH->CH"]["comparisons"]["hard"]["dime_gap_max_ok"]
    assert "tcp" in paths["v4 MH->CH"]["summary"]
    assert summarize_paths([], FULL) == {}


def _doc(paths: dict[str, Any]) -> dict[str, Any]:
    main = paths[MAIN.key]
    return {
        "meta": {
            "command": "python -m testbed.experiments goodput",
            "date": "2026-12-02T00:00:00+00:00",
            "machine": {"cpu": "x", "arch": "x86_64", "cpus": 2, "kernel": "6", "python": "3"},
            "smoke": False,
        },
        "config": {"duration_s": 15.0, "events_s": [5.0, 10.0], "runs": 1, "gap_sample_s": 0.01},
        "results": {
            "summary": main["summary"],
            "comparisons": main["comparisons"],
            "rtt_ms": main["rtt_ms"],
            "rtt_loaded_ms": main["rtt_loaded_ms"],
            "paths": paths,
            "delay_line": {"cpu_pct_mean": None, "cpu_pct_max": None, "late_max_ms": None},
        },
    }


def test_report_has_every_path_and_says_what_dime_misses() -> None:
    doc = _doc(summarize_paths(_runs(), FULL))
    text = goodput.report(doc, Path("/tmp"), Path("/tmp"))
    head = "| system | handoff | median | p90 | max | recovered | no handoff | goal | paper |"
    assert head in text
    for p in PATHS:
        assert f"| {p.key} | " in text
    misses = next(line for line in text.splitlines() if line.startswith("**dime misses (all"))
    assert "v6 CH->MH: dime gap max <= 116 ms (hard)" in misses
    assert "v4 MH->CH" not in misses


def test_a_soft_gap_is_judged_beside_the_no_handoff_runs_dip_at_that_instant() -> None:
    """The soft handoff's reference (10 s) falls where BBR probes anyway: a 0.6 s
    soft gap over a 0.58 s dip of the no-handoff run adds 20 ms (met); over none (0),
    0.6 s (missed). A hard handoff is not judged so ("-")."""
    runs = [r for r in _runs() if r["data_path"] == MAIN.key]
    for r in runs:
        if r["system"] == "dime" and r["handoff"] == "soft":
            r["gap_s"] = 0.6
    for dip, met in ((0.58, True), (0.0, False)):
        for r in runs:
            if r["handoff"] == "none":
                r["dip_s"] = dip
        main = summarize_paths(runs, FULL)[MAIN.key]
        soft, hard = main["comparisons"]["soft"], main["comparisons"]["hard"]
        assert soft["dime_gap_median_ok"] is False
        assert soft["dime_gap_beyond_none_ok"] is met
        assert hard["dime_gap_beyond_none_ok"] is None
        text = goodput.report(_doc({MAIN.key: main}), Path("/tmp"), Path("/tmp"))
        row = next(line for line in text.splitlines() if line.startswith("| dime | soft | 600"))
        assert f"| {'580 ms' if dip else '0 ms'} |" in row, row
        beyond = next(line for line in text.splitlines() if "beyond its no-handoff" in line)
        assert beyond.endswith(f"| {'yes' if met else '**no**'} | - |"), beyond


def test_report_reads_results_from_before_paths() -> None:
    doc = _doc(summarize_paths(_runs(), FULL))
    del doc["results"]["paths"]
    for e in doc["results"]["summary"].values():
        for h in ("soft", "hard"):
            del e[h]["gap_s_p90"]
    text = goodput.report(doc, Path("/tmp"), Path("/tmp"))
    assert "All paths" not in text and "dime meets every goal of this experiment." in text
    assert "| dime | hard | 100 ms | - | 100 ms | 1/1 |" in text


def test_the_hard_shortfall_is_seconds_at_the_no_handoff_rate() -> None:
    def path(hard: float, gap: float | None) -> dict[str, Any]:
        none = {"n": 2, "goodput_mbps": 18.0}
        h = {"n": 2, "goodput_mbps": hard, "ideal_mbps": 12.0, "gap_s_median": gap}
        return {"summary": {"dime": {"none": none, "hard": h}}}

    paths = {"v4 MH->CH": path(11.64, 0.18), "v4 CH->MH": path(11.4, None)}
    (text,) = [line for line in _shortfall(paths, 15.0, 5.0) if line]
    # (12 - 11.64) / 18 * 15 = 0.30 s lost; 3 % of the 10 s with an address allowed
    assert "allows 0.30 s): v4 MH->CH 0.30 s (gap median 0.18 s)." in text
    assert "CH->MH" not in text  # never recovered: no median, no figure
    assert _shortfall({"v4 CH->MH": path(11.4, None)}, 15.0, 5.0) == []
