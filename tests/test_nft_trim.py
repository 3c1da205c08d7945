"""A long nft batch gives the C heap it leaves behind back to the kernel."""

from __future__ import annotations

import pytest

from stacktrans import heap, nft


class FakeLib:
    def cmd(self, commands: str) -> tuple[int, str, str]:
        return 0, "", ""


def _nft() -> nft.Nft:
    n = object.__new__(nft.Nft)
    n._nft = FakeLib()
    return n


def test_only_long_batches_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[None] = []
    monkeypatch.setattr(heap, "trim_heap", lambda: trims.append(None))
    n = _nft()
    n.run("add element inet dime flows4 { udp . 10.0.0.1 . 1 . 10.0.0.2 . 2 }")
    assert trims == []
    n.run("\n".join(["add element inet dime flows4 { udp . 10.0.0.1 . 1 . 10.0.0.2 . 2 }"] * 2000))
    assert len(trims) == 1


def test_trim_heap_keeps_what_is_in_use() -> None:
    kept = [bytes(1000) for _ in range(1000)]
    heap.trim_heap(collect=True)
    assert all(b == bytes(1000) for b in kept)  # live memory untouched
