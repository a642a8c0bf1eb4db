"""Serve a database described by a TOML file (see :mod:`certbroker.adapters.sql`) as a department
adapter.

    python -m certbroker.adapters.sql --config FILE [--database-url URL] [sdk flags]

Every flag of :mod:`certbroker.adapters.sdk.app` applies (decision tokens, registration, TLS,
metrics).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from certbroker.adapters import sdk
from certbroker.adapters.sql.adapter import SqlAdapter


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="the adapter's TOML file")
    parser.add_argument("--database-url", help="overrides database.url of the file")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, serve until signalled; the process exit status (2: bad config)."""
    return sdk.main(
        lambda args: [SqlAdapter.from_file(args.config, url=args.database_url)],
        argv=argv,
        prog="python -m certbroker.adapters.sql",
        description="Serve a SQLite or PostgreSQL database as a department adapter.",
        add_adapter_arguments=_arguments,
        log_label=lambda args: f"sql:{Path(args.config).stem}",
    )


if __name__ == "__main__":
    sys.exit(main())
