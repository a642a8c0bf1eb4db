"""``certbroker admin ...``: the broker's Admin service from a security officer's terminal.

Every command calls a running broker's ``certbroker.v1.Admin`` service with a security
officer's token from ``--token`` or ``$CERTBROKER_TOKEN`` (development: ``certbroker token issue
--sub sec-1 --roles security_officer --office security-office``); each call is an entry in the
audit log, and every change needs ``--reason`` and ``--ticket``. Output is one line per control,
or ``--json`` (the service's answer).

Exit codes: 0 done, 1 the broker refused the call (status and reason on stderr), 2 usage (no
token, a time that does not parse).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from certbroker.cli import client, jsonout
from certbroker.v1 import admin_pb2, admin_pb2_grpc

_Request = Callable[[argparse.Namespace, admin_pb2.Justification], tuple[str, Message]]


def _stamp(text: str | None) -> timestamp_pb2.Timestamp | None:
    if not text:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(client.parse_time(text))
    return out


def _show(control: admin_pb2.Control) -> str:
    parts = [f"{control.kind} {control.target}", f"ticket={control.ticket}"]
    if control.HasField("until"):
        parts.append(f"until={control.until.ToDatetime().isoformat()}Z")
    if control.HasField("before"):
        parts.append(f"before={control.before.ToDatetime().isoformat()}Z")
    if control.except_roles:
        parts.append("except=" + ",".join(control.except_roles))
    parts.append(f"by={control.officer}")
    parts.append(f"reason={control.reason!r}")
    return "  ".join(parts)


def _run(args: argparse.Namespace, build: _Request) -> int:
    token = client.token_or_error(
        args, "a security officer's token: `certbroker token issue --roles security_officer ...`"
    )
    if token is None:
        return 2
    why = admin_pb2.Justification(reason=args.reason or "", ticket=args.ticket or "")
    try:
        method, request = build(args, why)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    channel = grpc.insecure_channel(args.target)
    try:
        stub = admin_pb2_grpc.AdminStub(channel)
        reply: Any = getattr(stub, method)(
            request, metadata=client.bearer(token), timeout=args.timeout
        )
    except grpc.RpcError as exc:
        print(f"error: {client.call_error(exc)}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    if args.json:
        print(jsonout.message(reply, indent=2, sort_keys=True))
    elif isinstance(reply, admin_pb2.ListControlsResponse):
        for control in reply.controls:
            print(_show(control))
        print(f"{len(reply.controls)} control(s) in force, version {reply.version}")
    else:
        state = "" if reply.changed else " (nothing was in force)"
        print(f"{method}: {_show(reply.control)}{state}  audit entry {reply.receipt.entry_id}")
    return 0


def _builders() -> dict[str, tuple[str, _Request]]:
    """Subcommand → (help, request builder)."""
    return {
        "disable-clerk": (
            "refuse every call of a clerk (--until: for a while)",
            lambda a, w: (
                "DisableClerk",
                admin_pb2.DisableClerkRequest(sub=a.subject, until=_stamp(a.until), why=w),
            ),
        ),
        "enable-clerk": (
            "lift a clerk's disable",
            lambda a, w: ("EnableClerk", admin_pb2.EnableClerkRequest(sub=a.subject, why=w)),
        ),
        "revoke": (
            "revoke one token (--jti) or every token of a clerk issued before --before",
            _revoke,
        ),
        "disable-office": (
            "refuse every call from an office",
            lambda a, w: (
                "DisableOffice",
                admin_pb2.DisableOfficeRequest(office=a.subject, why=w),
            ),
        ),
        "enable-office": (
            "lift an office's disable",
            lambda a, w: ("EnableOffice", admin_pb2.EnableOfficeRequest(office=a.subject, why=w)),
        ),
        "freeze": (
            "refuse every lookup of a citizen's records (--except-role: still allowed)",
            lambda a, w: (
                "FreezeSubject",
                admin_pb2.FreezeSubjectRequest(
                    subject_id=a.subject, except_roles=a.except_role or [], why=w
                ),
            ),
        ),
        "unfreeze": (
            "lift a citizen's freeze",
            lambda a, w: (
                "UnfreezeSubject",
                admin_pb2.UnfreezeSubjectRequest(subject_id=a.subject, why=w),
            ),
        ),
        "list": (
            "the controls in force",
            lambda _a, w: ("ListControls", admin_pb2.ListControlsRequest(why=w)),
        ),
    }


def _revoke(args: argparse.Namespace, why: admin_pb2.Justification) -> tuple[str, Message]:
    if args.jti:
        return "RevokeToken", admin_pb2.RevokeTokenRequest(jti=args.jti, why=why)
    if not args.subject:
        raise ValueError("revoke: pass --jti, or a clerk's sub (and --before, default now)")
    request = admin_pb2.RevokeTokensBeforeRequest(sub=args.subject, before=_stamp(args.before))
    request.why.CopyFrom(why)
    return "RevokeTokensBefore", request


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``certbroker admin <command>``."""
    adm = sub.add_parser(
        "admin", help="security officers: disable clerks and offices, revoke, freeze"
    ).add_subparsers(dest="admin_command", required=True)
    targets = {
        "disable-clerk": "the clerk's sub",
        "enable-clerk": "the clerk's sub",
        "revoke": "the clerk's sub (revoke every token issued before --before)",
        "disable-office": "the office id",
        "enable-office": "the office id",
        "freeze": "the citizen's resident ID",
        "unfreeze": "the citizen's resident ID",
    }
    for name, (text, build) in _builders().items():
        s = adm.add_parser(name, help=text)
        if name in targets:
            s.add_argument("subject", nargs="?" if name == "revoke" else None, help=targets[name])
        s.add_argument("--reason", help="why (required for every change)")
        s.add_argument("--ticket", help="the incident or request number (required for changes)")
        s.add_argument("--target", default="127.0.0.1:50051", help="the broker")
        s.add_argument("--token", help="security officer JWT (default: $CERTBROKER_TOKEN)")
        s.add_argument("--timeout", type=float, default=30.0)
        s.add_argument("--json", action="store_true", help="the service's answer as JSON")
        if name == "disable-clerk":
            s.add_argument("--until", help="ISO 8601 time the disable ends (no zone = UTC)")
        if name == "revoke":
            s.add_argument("--jti", help="revoke the one token with this jti")
            s.add_argument("--before", help="ISO 8601 time (default now; no zone = UTC)")
        if name == "freeze":
            s.add_argument("--except-role", action="append", help="a role still allowed")
        s.set_defaults(func=lambda a, build=build: _run(a, build))
