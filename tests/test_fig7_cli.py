"""``python -m testbed.fig7 up|down``: one command builds the testbed, one removes it,
and a build that fails part-way leaves nothing behind."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from testbed import fig7
from testbed.netns import CommandError

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

NAMES = {f"fig7-{s}" for s in fig7.SHORT_NAMES}


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testbed.fig7", *args], capture_output=True, text=True, timeout=60
    )


def test_up_builds_a_working_testbed_down_removes_it_and_a_failed_build_leaves_nothing() -> None:
    # One test, not two: both use the fixed fig7-* names, and parallel workers
    # would see each other's namespaces.
    try:
        res = cli("up")
        assert res.returncode == 0, res.stderr
        assert namespaces() >= NAMES
        ping = subprocess.run(
            ["ip", "netns", "exec", "fig7-mh", "ping", "-c1", "-W2", fig7.V4.c1.host],
            capture_output=True,
            text=True,
        )
        assert ping.returncode == 0, ping.stdout
    finally:
        res = cli("down")
    assert res.returncode == 0 and "removed fig7-ch, fig7-r, fig7-mh" in res.stdout
    assert not NAMES & namespaces()
    assert cli("down").stdout.strip() == "nothing to remove"

    bad = dataclasses.replace(fig7.V4, m2=fig7.Subnet("x", "not-an-address", "x", 24))
    with pytest.raises(CommandError):
        fig7.up(bad)
    assert not NAMES & namespaces()
