"""Serve the console over HTTP with uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import uvicorn

from certbroker.console.app import create_app
from certbroker.console.web import Settings


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0 = any free port): the port is known before the
    app starts, so it can be printed once the console answers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(settings: Settings, sock: socket.socket, ready: Callable[[], None]) -> None:
    """Run the console on ``sock``; ``ready()`` once it answers. Returns after SIGTERM/SIGINT."""
    config = uvicorn.Config(
        create_app(settings),
        lifespan="on",
        # No access log: URLs hold resident IDs (filters) and, once, an OIDC code.
        access_log=False,
        log_level="warning",
        server_header=False,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        ready()
    await task
