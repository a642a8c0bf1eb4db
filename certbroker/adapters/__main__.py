"""Run one department's demo adapter as its own gRPC server process.

    python -m certbroker.adapters --record-type household --dataset-dir DIR
        (--broker-public-key PEM | --no-decision-token) [--host H] [--port P]
        [--register BROKER_HOST:PORT --credential-file FILE [--advertise HOST[:PORT]]
         [--heartbeat-s N] [--broker-ca PEM]]
        [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]
        [--delay-ms N] [--metrics-port P] [--log-level L]

Secure by default: it refuses to start without the broker's public key, since without it any
caller reaching the port could read records; ``--no-decision-token`` is the development escape
hatch. Prints exactly one line, ``READY port=<N>``, to stdout once serving (so a parent process
can read the port); logs go to stderr. SIGTERM or SIGINT stop it gracefully (exit status 0).
See :mod:`certbroker.adapters.sdk.app` for the flags shared with every adapter process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from certbroker.adapters import demo, sdk


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record-type", required=True, choices=sorted(demo.ADAPTERS))
    parser.add_argument("--dataset-dir", required=True, type=Path)


def _build(args: argparse.Namespace) -> list[sdk.Adapter]:
    # Generating is blocking but happens once, before serving.
    demo.ensure_datasets(args.dataset_dir)
    return [demo.open_adapter(args.record_type, args.dataset_dir)]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, serve until signalled; the process exit status."""
    return sdk.main(
        _build,
        argv=argv,
        prog="python -m certbroker.adapters",
        description="Serve one demo department adapter over gRPC.",
        add_adapter_arguments=_arguments,
        log_label=lambda args: str(args.record_type),
    )


if __name__ == "__main__":
    sys.exit(main())
