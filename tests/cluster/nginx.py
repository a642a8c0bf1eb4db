"""nginx (Debian's package) in front of brokers, as the cluster test starts it.

A foreground process (``daemon off``) with its prefix, pid file, logs and temp paths inside a
temp directory; ``grpc_pass`` to an upstream of the brokers, one HTTP/2 listener on loopback.
The access log names the upstream that answered each call (``$upstream_addr``), so a test can
see which broker took it. Missing nginx skips the test -- or fails it under ``CI=true``.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.audit.pg_support import _unavailable

NGINX = Path("/usr/sbin/nginx")
START_S = 30.0

CONF = """\
{user}worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format upstreams '$status|$upstream_addr|$upstream_status|$request_uri';
    access_log {dir}/access.log upstreams;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream brokers {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://brokers;
            # A broker that is gone (connection refused) is skipped: the call goes to the next.
            grpc_next_upstream error timeout;
            grpc_connect_timeout 2s;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_nginx() -> None:
    """Skip the test (fail it under ``CI=true``) when Debian's nginx is not installed."""
    if not NGINX.exists():
        _unavailable(f"{NGINX} is missing (apt-get install nginx)")


class Nginx:
    """nginx proxying gRPC on ``127.0.0.1:port`` to ``upstreams`` (``host:port`` each)."""

    def __init__(self, directory: Path, upstreams: Sequence[str]) -> None:
        require_nginx()
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # As root, nginx would run its worker as "nobody", which cannot write the temp dir.
        user = f"user {pwd.getpwuid(os.getuid()).pw_name};\n" if os.geteuid() == 0 else ""
        servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=60s;" for u in upstreams)
        conf = directory / "nginx.conf"
        conf.write_text(CONF.format(user=user, dir=directory, servers=servers, port=self.port))
        with (directory / "stderr.log").open("w") as stderr:
            self.process = subprocess.Popen(
                [str(NGINX), "-p", str(directory), "-c", str(conf), "-g", "daemon off;"],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + START_S
        while not self._accepts():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"nginx did not start:\n{self.errors()}")
            time.sleep(0.05)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def errors(self) -> str:
        logs = [self.dir / "stderr.log", self.dir / "error.log"]
        return "\n".join(p.read_text() for p in logs if p.exists())

    def access(self) -> list[tuple[str, str, str]]:
        """(status, upstream address(es), request URI) of every call so far; a call passed on
        from a failed broker to the next names both (``"127.0.0.1:1, 127.0.0.1:2"``)."""
        path = self.dir / "access.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [(f[0], f[1], f[-1]) for f in (line.split("|") for line in lines)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finishes and flushes logs
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
