"""The baseline: a bare ``grpc.aio`` unary server that answers every call with a fixed payload.

    python -m bench.echo --size BYTES [--host H] [--port P] [--loop uvloop|asyncio]

Same server model as the broker (``grpc.aio.server``, on the event loop the broker would pick
(:mod:`certbroker.server.eventloop`) unless ``--loop`` says which, default channel options, one
insecure port), but no interceptor, no authentication, no policy, no audit
and no protobuf: bytes in, ``--size`` bytes out. The benchmark sets ``--size`` to the size of
the broker's serialized ``LookupResponse`` in the same run, so both put the same bytes on the
wire and the difference between them is what the broker does.

Prints ``READY port=<N>`` on stdout once serving; SIGTERM or SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

import grpc

from certbroker.server import eventloop

#: Full method name the load generator calls (a generic handler: no proto needed).
SERVICE = "certbroker.bench.Echo"
METHOD = f"/{SERVICE}/Echo"
#: Refuse sizes beyond gRPC's default 4 MiB message limit.
MAX_SIZE = 4 * 1024 * 1024 - 64


def payload(size: int) -> bytes:
    """``size`` bytes that do not compress to nothing (gRPC does not compress by default)."""
    if not 0 <= size <= MAX_SIZE:
        raise ValueError(f"size must be within 0..{MAX_SIZE}, got {size}")
    pattern = bytes(range(256))
    return (pattern * (size // len(pattern) + 1))[:size]


async def serve(host: str, port: int, size: int) -> None:
    """Serve until SIGINT/SIGTERM, printing the READY line once bound."""
    reply = payload(size)

    async def echo(_request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return reply

    server = grpc.aio.server()
    # No (de)serializers: the handler sees and returns raw bytes.
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY port={bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and serve; the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--size", type=int, required=True, help="reply size in bytes")
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), help="default: as the broker would choose"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.size <= MAX_SIZE:
        parser.error(f"--size must be within 0..{MAX_SIZE}")
    if args.loop is not None:  # what certbroker.server.eventloop reads
        os.environ[eventloop.ENV] = args.loop
    eventloop.run(serve(args.host, args.port, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
