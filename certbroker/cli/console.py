"""``certbroker console``: the web console for auditors, hall supervisors and security officers."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from certbroker import config


def cmd_console(args: argparse.Namespace) -> int:
    """Serve the console until SIGTERM/SIGINT; exit 1 if its port cannot be bound."""
    from certbroker.console.app import settings_from
    from certbroker.console.serve import bind, serve

    cfg = config.load(
        args.config,
        state_dir=args.state_dir,
        console_host=args.host,
        console_port=args.port,
        console_broker=args.broker,
    )
    try:
        settings = settings_from(cfg)
        sock = bind(cfg.console_host, cfg.console_port)
    except (OSError, ValueError) as exc:
        print(f"error: cannot start the console: {exc}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    url = f"http://{cfg.console_host}:{port}/"

    def ready() -> None:
        print(f"certbroker console on {url} (broker {settings.broker_target})", flush=True)
        print(f"READY url={url}", flush=True)

    # uvicorn re-raises the signal that stopped it once it has shut down; a stop asked for is
    # a clean exit here (0), as for `certbroker serve`.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    asyncio.run(serve(settings, sock, ready))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``console``."""
    s = sub.add_parser(
        "console",
        help="serve the web console (auditors, hall supervisors, security officers)",
    )
    s.add_argument("--config", type=Path, help="TOML configuration file ([console] section)")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="HTTP port (default 8080; 0 = any free port)")
    s.add_argument("--broker", help="host:port of the broker (default [server] host and port)")
    s.add_argument(
        "--state-dir",
        type=Path,
        help="the broker's state directory: its development IdP and checkpoint key",
    )
    s.set_defaults(func=cmd_console)
