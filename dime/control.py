"""The control socket: how ``dime status`` and ``dime down`` talk to the daemon.

An abstract unix socket, which exists per network namespace: two daemons in two
namespaces never see each other's, with no flags, and binding it is also the
"already running" lock. One JSON request line, one JSON reply line.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

ADDRESS = "\0dime-control"

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class AlreadyRunning(RuntimeError):
    pass


class NotRunning(RuntimeError):
    pass


def bind() -> socket.socket:
    """Take the control socket of this namespace, or raise AlreadyRunning."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(ADDRESS)
    except OSError as exc:
        sock.close()
        raise AlreadyRunning(
            "dime is already running in this network namespace (stop it with: dime down)"
        ) from exc
    sock.listen(16)
    sock.setblocking(False)
    return sock


async def serve(sock: socket.socket, handler: Handler) -> asyncio.AbstractServer:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(line)
                reply = await handler(request) if isinstance(request, dict) else None
                if reply is None:
                    reply = {"error": "a request is one JSON object"}
            except ValueError as exc:
                reply = {"error": f"bad request: {exc}"}
            writer.write((json.dumps(reply) + "\n").encode())
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(client, sock=sock)


async def serve_forever(sock: socket.socket, handler: Handler) -> None:
    """Answer requests on ``sock`` (from :func:`bind`) with ``handler`` until cancelled."""
    server = await serve(sock, handler)
    async with server:
        await server.serve_forever()


def request(cmd: str, timeout: float = 10, **args: Any) -> dict[str, Any]:
    """Send one request to this namespace's daemon. Raises NotRunning."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(ADDRESS)
    except OSError as exc:
        sock.close()
        raise NotRunning("dime is not running in this network namespace") from exc
    with sock:
        sock.sendall((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return dict(json.loads(data)) if data else {}


def running() -> bool:
    try:
        request("ping", timeout=2)
    except (NotRunning, OSError, ValueError):
        return False
    return True
