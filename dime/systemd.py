"""sd_notify(3) for ``Type=notify`` units: one datagram to ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("dime")


def notify(state: str) -> None:
    """Tell systemd ``state`` (e.g. ``READY=1``); a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(path)
            sock.send(state.encode())
        except OSError as exc:
            log.warning("systemd notification failed: %s", exc)
