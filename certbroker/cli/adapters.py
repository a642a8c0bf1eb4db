"""``certbroker adapters list|register|deregister``: the Registry from an operator's terminal.

Every command talks to a running broker's ``certbroker.v1.Registry`` with a token from
``--token`` or ``$CERTBROKER_TOKEN``: an operator token (``certbroker token issue --operator``)
sees and manages every department; a department credential only its own instances.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable

import grpc
from google.protobuf import timestamp_pb2

from certbroker.cli import client, jsonout
from certbroker.v1 import registry_pb2, registry_pb2_grpc

SCHEMA_VERSION = "certbroker.v1"


_Use = Callable[[registry_pb2_grpc.RegistryStub, tuple[tuple[str, str]]], int]


def _call(args: argparse.Namespace, use: _Use) -> int:
    """Run ``use(stub, metadata)`` against ``--target`` with the token; 1 on an RPC error."""
    token = client.token_or_error(args, "see `certbroker token issue --operator`")
    if token is None:
        return 2
    with grpc.insecure_channel(args.target) as channel:
        try:
            return use(registry_pb2_grpc.RegistryStub(channel), client.bearer(token))
        except grpc.RpcError as exc:
            print(f"error: {client.call_error(exc)}", file=sys.stderr)
            return 1


def _time(stamp: timestamp_pb2.Timestamp) -> str:
    return f"{stamp.ToDatetime(dt.UTC):%Y-%m-%d %H:%M:%S}Z"


def cmd_list(args: argparse.Namespace) -> int:
    def use(stub: registry_pb2_grpc.RegistryStub, md: tuple[tuple[str, str]]) -> int:
        reply = stub.ListAdapters(
            registry_pb2.ListAdaptersRequest(department=args.department),
            metadata=md,
            timeout=args.timeout,
        )
        if args.json:
            for item in reply.adapters:
                print(jsonout.message(item, sort_keys=True))
            return 0
        header = (
            "INSTANCE",
            "DEPARTMENT",
            "RECORD TYPES",
            "ENDPOINT",
            "LIVE",
            "LEASE UNTIL",
            "BREAKER",
        )
        rows = [header]
        for a in reply.adapters:
            rows.append(
                (
                    a.instance_id,
                    a.department,
                    ",".join(a.record_types),
                    a.endpoint,
                    "yes" if a.live else "no",
                    _time(a.lease_expires_at),
                    a.breaker_state,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        print(f"({len(reply.adapters)} instances)")
        return 0

    return _call(args, use)


def cmd_register(args: argparse.Namespace) -> int:
    def use(stub: registry_pb2_grpc.RegistryStub, md: tuple[tuple[str, str]]) -> int:
        reply = stub.Register(
            registry_pb2.RegisterRequest(
                department=args.department,
                record_types=[v.strip() for v in args.record_types.split(",") if v.strip()],
                endpoint=args.endpoint,
                schema_version=args.schema_version,
            ),
            metadata=md,
            timeout=args.timeout,
        )
        print(f"registered instance {reply.instance_id} (lease {reply.lease_seconds} s)")
        print(
            "note: it leaves routing when the lease lapses unless its adapter heartbeats",
            file=sys.stderr,
        )
        return 0

    return _call(args, use)


def cmd_deregister(args: argparse.Namespace) -> int:
    def use(stub: registry_pb2_grpc.RegistryStub, md: tuple[tuple[str, str]]) -> int:
        stub.Deregister(
            registry_pb2.DeregisterRequest(instance_id=args.instance_id),
            metadata=md,
            timeout=args.timeout,
        )
        print(f"deregistered instance {args.instance_id}")
        return 0

    return _call(args, use)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``adapters list|register|deregister`` to the ``certbroker`` parser."""
    adapters = sub.add_parser(
        "adapters", help="list and manage registered department adapters (operators)"
    ).add_subparsers(dest="adapters_command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--target", default="127.0.0.1:50051", help="the broker")
        sp.add_argument("--token", help="operator or department JWT (default: $CERTBROKER_TOKEN)")
        sp.add_argument("--timeout", type=float, default=10.0)

    s = adapters.add_parser("list", help="registered instances, their leases and breakers")
    common(s)
    s.add_argument("--department", default="", help="only this department")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(func=cmd_list)

    s = adapters.add_parser("register", help="register an adapter instance for a department")
    common(s)
    s.add_argument("--department", required=True)
    s.add_argument("--record-types", required=True, help="comma-separated")
    s.add_argument("--endpoint", required=True, help="host:port the broker dials")
    s.add_argument("--schema-version", default=SCHEMA_VERSION)
    s.set_defaults(func=cmd_register)

    s = adapters.add_parser("deregister", help="take an instance out of the registry")
    common(s)
    s.add_argument("instance_id")
    s.set_defaults(func=cmd_deregister)
