"""Run one department's demo adapter as its own gRPC server process.

    python -m adapters --record-type household --dataset-dir DIR [--host 127.0.0.1] [--port 0]

Prints exactly one line, ``READY port=<N>``, to stdout once serving (so a parent process can
read the port); logs go to stderr. SIGTERM or SIGINT stop it gracefully (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from adapters import demo, sdk

#: Seconds in-flight calls get to finish on shutdown.
GRACE_SECONDS = 5.0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, serve until signalled; the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m adapters", description="Serve one demo department adapter over gRPC."
    )
    parser.add_argument("--record-type", required=True, choices=sorted(demo.ADAPTERS))
    parser.add_argument("--dataset-dir", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s adapter[{args.record_type}] %(name)s: %(message)s",
    )
    return asyncio.run(_serve(args.record_type, args.dataset_dir, args.host, args.port))


async def _serve(record_type: str, dataset_dir: Path, host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # Generating is blocking but happens once, before serving.
    demo.ensure_datasets(dataset_dir)
    adapter = demo.open_adapter(record_type, dataset_dir)
    try:
        server, bound = await sdk.serve([adapter], host=host, port=port)
        try:
            print(f"READY port={bound}", flush=True)
            logging.getLogger("adapters").info("serving %s on %s:%d", record_type, host, bound)
            await stop.wait()
        finally:
            await server.stop(GRACE_SECONDS)
    finally:
        demo.close_all([adapter])
    return 0


if __name__ == "__main__":
    sys.exit(main())
