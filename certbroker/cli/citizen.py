"""``certbroker citizen accesses|dispute`` (a citizen's own view) and ``certbroker notify tail``
(the example consumer of the access notices, printing them as a phone would show them).

The citizen commands call a running broker's ``certbroker.v1.Citizen`` service with a citizen's
token from ``--token`` or ``$CERTBROKER_CITIZEN_TOKEN`` (development: ``certbroker token issue
--citizen <resident ID>``). ``notify tail`` reads the notices' JetStream stream
(``[notify]``), one line per notice, each entry id once (the relay delivers at least once).

Exit codes: 0 done, 1 the broker refused the call / the message broker cannot be reached,
2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import grpc
from google.protobuf import timestamp_pb2

from certbroker import config
from certbroker.citizen.notices import render
from certbroker.cli import client, jsonout
from certbroker.v1 import citizen_pb2, citizen_pb2_grpc

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def _token(args: argparse.Namespace) -> str | None:
    return client.token_or_error(
        args,
        "a citizen's token: `certbroker token issue --citizen <resident ID>`",
        "CERTBROKER_CITIZEN_TOKEN",
    )


def _stamp(target: timestamp_pb2.Timestamp, text: str) -> None:
    target.FromDatetime(client.parse_time(text))


def cmd_accesses(args: argparse.Namespace) -> int:
    """Every access to my records, page after page; one line each (or ``--json``)."""
    token = _token(args)
    if token is None:
        return 2
    request = citizen_pb2.MyAccessesRequest(page_size=args.page_size)
    try:
        if args.since:
            _stamp(request.since, args.since)
        if args.until:
            _stamp(request.until, args.until)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    channel = grpc.insecure_channel(args.target)
    stub = citizen_pb2_grpc.CitizenStub(channel)
    found: list[citizen_pb2.Access] = []
    try:
        while True:
            reply = stub.MyAccesses(request, metadata=client.bearer(token), timeout=args.timeout)
            found.extend(reply.accesses)
            if not reply.next_page_token:
                break
            request.page_token = reply.next_page_token
    except grpc.RpcError as exc:
        print(f"error: {client.call_error(exc)}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    if args.json:
        print(json.dumps([json.loads(jsonout.message(a)) for a in found], ensure_ascii=False))
        return 0
    for a in found:
        when = a.time.ToDatetime().isoformat(timespec="seconds") + "Z"
        who = f"{a.office} {a.clerk}".strip()
        what = f"{a.matter_name or a.matter_code} {a.case_number}".strip()
        fields = ",".join(a.fields) or "-"
        mark = "  [disputed]" if a.disputed else ""
        print(
            f"{when}  {a.decision:<5}  {a.record_label}  {who}  {what}  fields={fields}  "
            f"entry={a.entry_id}{mark}"
        )
    print(f"{len(found)} access(es) to your records")
    return 0


def cmd_dispute(args: argparse.Namespace) -> int:
    """Dispute one access (the entry id ``accesses`` shows)."""
    token = _token(args)
    if token is None:
        return 2
    channel = grpc.insecure_channel(args.target)
    try:
        reply = citizen_pb2_grpc.CitizenStub(channel).Dispute(
            citizen_pb2.DisputeRequest(entry_id=args.entry_id, text=args.text or ""),
            metadata=client.bearer(token),
            timeout=args.timeout,
        )
    except grpc.RpcError as exc:
        print(f"error: {client.call_error(exc)}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    frozen = "; your records are frozen until an officer reviews it" if reply.frozen else ""
    print(f"disputed {args.entry_id}: audit entry {reply.receipt.entry_id}{frozen}")
    return 0


async def _tail(args: argparse.Namespace) -> int:
    import nats
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import ConsumerConfig, DeliverPolicy

    try:
        nc = await nats.connect(args.nats_url, connect_timeout=3, max_reconnect_attempts=3)
    except Exception as exc:  # noqa: BLE001 - any connect failure: say so, exit 1
        print(f"error: cannot reach {args.nats_url}: {exc}", file=sys.stderr)
        return 1
    seen: set[str] = set()
    try:
        js = nc.jetstream()
        policy = DeliverPolicy.ALL if args.all else DeliverPolicy.NEW
        sub = await js.subscribe(
            f"{args.subject}.>",
            stream=args.stream,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=policy),
        )
        while args.count is None or len(seen) < args.count:
            try:
                msg = await sub.next_msg(timeout=args.idle_timeout or 3600.0)
            except NatsTimeout:
                if args.idle_timeout:
                    break
                continue
            notice = json.loads(msg.data)
            key = str(notice.get("entry_id", ""))
            if key in seen:  # at-least-once: a repeat of a notice already shown
                continue
            seen.add(key)
            line = json.dumps(notice, ensure_ascii=False) if args.json else render(notice)
            print(line, flush=True)
    finally:
        await nc.close()
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    """Print the notices as they arrive (``--all``: from the start of the stream)."""
    try:
        return asyncio.run(_tail(args))
    except KeyboardInterrupt:
        return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``certbroker citizen <command>`` and ``certbroker notify tail``."""
    cit = sub.add_parser(
        "citizen", help="a citizen's own view: who accessed my records; dispute one"
    ).add_subparsers(dest="citizen_command", required=True)
    s = cit.add_parser("accesses", help="every access to my records (allowed or denied)")
    s.add_argument("--since", help="ISO 8601 time (no zone = UTC), inclusive")
    s.add_argument("--until", help="ISO 8601 time, exclusive")
    s.add_argument("--page-size", type=int, default=100)
    s.add_argument("--json", action="store_true", help="the accesses as JSON")
    s.set_defaults(func=cmd_accesses)
    d = cit.add_parser("dispute", help="this access was not me / not my case")
    d.add_argument("entry_id", help="the access's entry id (from `citizen accesses`)")
    d.add_argument("--text", help="why (at most 500 characters)")
    d.set_defaults(func=cmd_dispute)
    for p in (s, d):
        p.add_argument("--target", default="127.0.0.1:50051", help="the broker")
        p.add_argument("--token", help="citizen JWT (default: $CERTBROKER_CITIZEN_TOKEN)")
        p.add_argument("--timeout", type=float, default=30.0)

    defaults = config.Config()
    notify = sub.add_parser("notify", help="access notices").add_subparsers(
        dest="notify_command", required=True
    )
    t = notify.add_parser("tail", help="print access notices as a citizen's phone shows them")
    t.add_argument(
        "--nats-url",
        default=os.environ.get("CERTBROKER_NATS_URL") or DEFAULT_NATS_URL,
        help="NATS server (default: $CERTBROKER_NATS_URL or %(default)s)",
    )
    t.add_argument("--stream", default=defaults.notify_stream)
    t.add_argument("--subject", default=defaults.notify_subject)
    t.add_argument("--all", action="store_true", help="from the start of the stream")
    t.add_argument("--count", type=int, help="stop after this many distinct notices")
    t.add_argument("--idle-timeout", type=float, help="stop after this many idle seconds")
    t.add_argument("--json", action="store_true", help="the notices as JSON lines")
    t.set_defaults(func=cmd_tail)
