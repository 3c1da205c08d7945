"""The experiments' smoke mode, as CI runs it: one short run of each, small sizes.

Each experiment runs as ``python -m testbed.experiments NAME --smoke --out DIR`` (its
own process, as a user would run it); the test checks that it wrote well-formed
results and its plots, and that RESULTS.md can be generated from them. No timing or
performance figure is asserted: CI machines differ.

The six processes are started together, side by side (each in namespaces of its
own): they spend much of their time waiting on transfers, daemons and timers, and
smoke figures mean nothing, so sharing the CPUs costs nothing but wall time saved.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.experiments import NAMES, load
from testbed.experiments.report import write_report

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NEEDS_PLOT = ("goodput", "scalability")


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smoke")


def _module_exists(name: str) -> bool:
    return (ROOT / "testbed" / "experiments" / f"{name}.py").exists()


@pytest.fixture(scope="module")
def runs(out: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Every experiment's smoke run, all started at once; output in ``out/NAME.log``."""
    procs = {}
    for name in filter(_module_exists, NAMES):
        with (out / f"{name}.log").open("wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "testbed.experiments", name, "--smoke", "--out", str(out)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()  # it stops its daemons and removes its namespaces
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


# Structure (never values) each experiment's results must have.
def _check_scalability(res: dict[str, Any]) -> None:
    for mode in ("nft", "nfqueue"):
        levels = res[mode]["levels"]
        assert [lv["n"] for lv in levels] == sorted(lv["n"] for lv in levels)
        for lv in levels:
            assert {"rx_gbps", "ratio", "entries_before", "wire"} <= set(lv)
            assert lv["entries_before"] >= lv["n"], "background flows missing from the table"
    assert set(res["goal"]) == {"nft", "nfqueue"}


def _check_signaling(res: dict[str, Any]) -> None:
    for row in res["connections"] + res["peers"]:
        assert row["handoffs"]
        for h in row["handoffs"]:
            assert isinstance(h["wire_total"], int)
            assert isinstance(h["counters_total"], int)
            assert isinstance(h["alive"], int)


def _check_overhead(res: dict[str, Any]) -> None:
    for rows in res.values():
        assert set(rows) == {"none", "nft", "nfqueue"}
        for e in rows.values():
            assert e["runs"] and "after_gbps" in e


def _check_footprint(res: dict[str, Any]) -> None:
    assert res["import_floor_kib"] > 0
    for mode in ("nft", "nfqueue"):
        r = res[mode]
        assert r["startup"]["all_s"]
        assert r["idle"]["rss_kib"] > 0 and r["levels"]
        for level in r["levels"]:
            assert level["rss_kib"] >= level["rss_anon_kib"] > 0
            assert level["entries"] > level["flows"] // 2
        assert set(res["goals"][mode]) >= {"idle_met", "flows_met", "startup_met"}


CHECKS = {
    "scalability": _check_scalability,
    "signaling": _check_signaling,
    "overhead": _check_overhead,
    "footprint": _check_footprint,
}


def check_experiment(name: str, out: Path, code: int) -> None:
    """One experiment's smoke run: it exited 0 and wrote well-formed results."""
    log = (out / f"{name}.log").read_text(errors="replace")
    assert code == 0, f"{name} failed:\n{log[-4000:]}"
    doc = json.loads((out / f"{name}.json").read_text())
    assert {"experiment", "meta", "config", "results"} <= set(doc)
    assert doc["experiment"] == name
    meta = doc["meta"]
    assert meta["command"] and "testbed.experiments" in meta["command"]
    assert {"kernel", "cpus", "python"} <= set(meta["machine"])
    assert meta["smoke"] is True
    assert all(math.isfinite(x) or math.isnan(x) for x in _numbers(doc["results"]))
    if name in CHECKS:
        CHECKS[name](doc["results"])
    plots = sorted(out.glob(f"{name}*.png"))
    if name in NEEDS_PLOT:
        assert plots, f"{name} wrote no plot"
    for png in plots:
        assert png.read_bytes()[:8] == PNG_MAGIC, f"{png} is not a PNG"


# One test, not one per experiment: under pytest-xdist the fixture that starts the
# six runs would start them again on every worker that got one of its tests.
@pytest.mark.timeout(1200)
def test_every_experiment_in_smoke_mode(
    out: Path, runs: dict[str, subprocess.Popen[bytes]]
) -> None:
    failed = {}
    for name in NAMES:
        if not _module_exists(name):
            continue
        try:
            check_experiment(name, out, runs[name].wait(timeout=1100))
        except AssertionError as exc:  # every experiment is checked: report them all
            failed[name] = str(exc)
    assert not failed, "\n\n".join(f"== {n}\n{e}" for n, e in failed.items())
    check_results_md(out, runs)


def check_results_md(out: Path, runs: dict[str, subprocess.Popen[bytes]]) -> None:
    """RESULTS.md from whatever the smoke runs left: a section for every experiment."""
    if not all(_module_exists(n) for n in NAMES):
        return  # not every experiment module is written yet
    target = write_report(out, out / "RESULTS.md")
    text = target.read_text()
    for name in NAMES:
        title = load(name).TITLE
        assert f"## {title}" in text, f"no section for {name}"
        if (out / f"{name}.json").exists():
            section = text.split(f"## {title}", 1)[1]
            assert not section.lstrip().startswith("Not run yet"), name
