"""An NFQUEUE served from the asyncio loop.

``netfilterqueue``'s ``run(block=False)`` handles the packets already waiting and
returns, so the queue's file descriptor can sit in the event loop like any socket.
Its callbacks swallow exceptions (and a packet with no verdict stays queued until
the queue overflows), so every packet gets its verdict in a ``finally``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dime.queue")

Handler = Callable[[bytes], bytes | None]
#: What a handler returns for a packet that must go no further (a knock).
DROP = b""


class QueueError(RuntimeError):
    pass


class PacketQueue:
    """Queue ``num``: each packet goes through ``handler``, then is accepted."""

    def __init__(self, num: int, handler: Handler, *, max_len: int = 8192) -> None:
        self.num = num
        self.handler = handler
        self.max_len = max_len
        self.packets = 0
        self.errors = 0
        self._q: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            from netfilterqueue import NetfilterQueue
        except ImportError as exc:  # pragma: no cover - install problem
            raise QueueError("netfilterqueue is missing: pip install netfilterqueue") from exc
        q = NetfilterQueue()
        try:
            q.bind(self.num, self._on_packet, max_len=self.max_len)
        except OSError as exc:
            raise QueueError(
                f"cannot bind NFQUEUE {self.num} ({exc}): the kernel needs nfnetlink_queue "
                "(CONFIG_NETFILTER_NETLINK_QUEUE), and no other program may use that queue"
            ) from exc
        self._q, self._loop = q, loop
        loop.add_reader(q.get_fd(), q.run, False)

    def stop(self) -> None:
        if self._q is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._q.get_fd())
        self._q.unbind()
        self._q = None

    def _on_packet(self, pkt: Any) -> None:
        self.packets += 1
        drop = False
        try:
            new = self.handler(pkt.get_payload())
            if new == DROP:
                drop = True
            elif new is not None:
                pkt.set_payload(new)
        except Exception:  # a packet must never take the daemon down
            self.errors += 1
            log.exception("queue %d: packet handler failed; packet passed unchanged", self.num)
        finally:
            if drop:
                pkt.drop()
            else:
                pkt.accept()
