"""The ``certbroker`` command line: serve, demo, lookup, token, adapters, policy, audit, console."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from certbroker import audit, config, logs, policy
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import adapters as cli_adapters
from certbroker.cli import admin as cli_admin
from certbroker.cli import audit_log as cli_audit_log
from certbroker.cli import auditor as cli_auditor
from certbroker.cli import citizen as cli_citizen
from certbroker.cli import client, jsonout
from certbroker.cli import console as cli_console
from certbroker.cli import evidence as cli_evidence
from certbroker.cli.table import format_table
from certbroker.v1 import broker_pb2

DEFAULT_STATE = Path(".certbroker")

log = logging.getLogger("certbroker.cli")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the broker until SIGTERM/SIGINT (then drain and exit 0); exit 1 if it cannot start
    (a port in use, an unreadable key) or a part failed to close."""
    from certbroker.errors import BrokerError
    from certbroker.server import app as server
    from certbroker.server import eventloop, workers

    cfg = config.load(
        args.config,
        port=args.port,
        metrics_port=args.metrics_port,
        state_dir=args.state_dir,
        host=args.host,
        workers=args.workers,
        shutdown_grace_s=args.shutdown_grace_s,
        log_format=args.log_format,
        log_level=args.log_level,
    )
    logs.configure(cfg.log_format, cfg.log_level)
    try:
        if cfg.workers > 1:  # a supervisor and N worker processes sharing the port
            return workers.run(cfg)

        def ready(b: server.Broker) -> None:
            print(
                f"certbroker serving on {cfg.host}:{b.port} (metrics on :{b.metrics_port}); "
                f"state in {cfg.state_dir}; policy {b.policies.current.version[:12]}",
                flush=True,
            )
            print(f"READY port={b.port} metrics_port={b.metrics_port}", flush=True)

        eventloop.run(server.serve(cfg, ready))
    except (server.StartError, server.StopError, workers.WorkerError, BrokerError, OSError) as exc:
        serve_error(cfg, str(exc))
        return 1
    return 0


def serve_error(cfg: config.Config, message: str) -> None:
    """Why ``serve`` stopped: a log record when the log is JSON (every stderr line stays one
    JSON object), else the CLI's usual ``error: ...`` line."""
    if cfg.log_format == "json":
        log.error("%s", message)
    else:
        print(f"error: {message}", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    from certbroker.cli import demo

    return demo.run(args.state_dir)


def _clerk_token(args: argparse.Namespace) -> str | None:
    return client.token_or_error(args, "see `certbroker token issue`")


def _call(args: argparse.Namespace, token: str, method: str, request: Message) -> Any:
    """One broker call as a clerk; prints the error and returns None when it is refused."""
    channel, stub = client.stub(args.target)
    try:
        return getattr(stub, method)(request, metadata=client.bearer(token), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"error: {client.call_error(exc)}", file=sys.stderr)
        return None
    finally:
        channel.close()


def _print_json(message: Message) -> None:
    print(jsonout.message(message, indent=2))


def _save_evidence(args: argparse.Namespace, evidence: str) -> None:
    """Write the evidence document the call asked for (``--evidence FILE``)."""
    if args.evidence is not None:
        args.evidence.write_text(evidence + "\n", encoding="ascii")
        print(f"evidence written to {args.evidence}", file=sys.stderr)


def cmd_lookup(args: argparse.Namespace) -> int:
    token = _clerk_token(args)
    if token is None:
        return 2
    request = client.lookup_request(
        args.record_type,
        args.subject,
        args.matter,
        args.case,
        args.consent,
        args.consent_ref,
        _split(args.fields),
    )
    request.evidence = args.evidence is not None
    response = _call(args, token, "Lookup", request)
    if response is None:
        return 1
    _save_evidence(args, response.evidence)
    if args.json:
        _print_json(response)
    else:
        labels: dict[str, str] = {}
        if response.record.HasField("generic"):
            # A catalogue-declared type: its labels come from the schema in force.
            described = _call(
                args,
                token,
                "DescribeRecordType",
                broker_pb2.DescribeRecordTypeRequest(record_type=args.record_type),
            )
            labels = client.labels_of(described) if described is not None else {}
        print(f"{args.record_type} record of {args.subject}:")
        print("\n".join(client.record_lines(response, labels)))
    return 0


def cmd_lookup_matter(args: argparse.Namespace) -> int:
    """LookupMatter: exit 0 if every item came back, 3 if some did not, 1 if refused."""
    token = _clerk_token(args)
    if token is None:
        return 2
    try:
        subjects = [client.parse_subject(s) for s in args.subject]
    except ValueError as exc:
        print(f"error: --subject: {exc}", file=sys.stderr)
        return 2
    if args.package:
        request = client.lookup_package_request(
            args.package, args.case, subjects, args.consent, args.consent_ref
        )
    else:
        request = client.lookup_matter_request(
            args.matter, args.case, subjects, args.consent, args.consent_ref
        )
    request.evidence = args.evidence is not None
    response = _call(args, token, "LookupMatter", request)
    if response is None:
        return 1
    _save_evidence(args, response.evidence)
    if args.json:
        _print_json(response)
    else:
        what = f"package {args.package}" if args.package else f"matter {args.matter}"
        print(f"{what}, case {args.case or '-'}:")
        print("\n".join(client.bundle_lines(response)))
    items = client.all_items(response)
    return 0 if all(i.WhichOneof("result") == "response" for i in items) else 3


def cmd_token_issue(args: argparse.Namespace) -> int:
    idp = DevIdentityProvider(args.state_dir)
    if args.department:  # a department credential, for its adapters' Registry calls
        print(idp.issue_department(args.department, sub=args.sub or "", ttl_s=args.ttl))
        return 0
    if args.operator:
        print(idp.issue_operator(args.sub or "operator", ttl_s=args.ttl))
        return 0
    if args.citizen:  # the dev citizen issuer's token (the provincial app's, in production)
        print(idp.issue_citizen(args.citizen, sub=args.sub or "", ttl_s=args.ttl))
        return 0
    if not (args.sub and args.roles and args.office):
        print("error: a clerk token needs --sub, --roles and --office", file=sys.stderr)
        return 2
    print(idp.issue(args.sub, _split(args.roles), args.office, name=args.name, ttl_s=args.ttl))
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    files = args.files or sorted(config.DEFAULT_POLICY_DIR.glob("*.yaml"))
    problems = policy.check(files)
    for line in problems:
        print(line)
    if not problems:
        print(f"ok: {len(files)} file(s) valid")
    return 1 if problems else 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    report = policy.run_tests(args.dir)
    for line in report.failures:
        print(f"FAIL {line}")
    print(f"{report.passed} passed, {len(report.failures)} failed")
    return 1 if report.failures else 0


def cmd_policy_reload(args: argparse.Namespace) -> int:
    from certbroker.server.app import pid_file

    path = pid_file(args.state_dir)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"error: no running broker for {args.state_dir} ({exc})", file=sys.stderr)
        return 1
    print(f"asked broker {pid} to reload its policies (see its log for the result)")
    return 0


def cmd_audit_query(args: argparse.Namespace) -> int:
    path = cli_audit_log.existing_location(args)  # --db / --dsn / --config, as verify
    if path is None:
        return 2
    flt = audit.QueryFilter(
        clerk=args.clerk,
        subject_id=args.subject,
        matter_code=args.matter,
        record_type=args.record_type,
        decision=args.decision,
        since=client.parse_time(args.since) if args.since else None,
        until=client.parse_time(args.until) if args.until else None,
        limit=args.limit,
    )
    entries = audit.query(path, flt)
    if args.json:
        for entry in entries:
            print(jsonout.dumps(dataclasses.asdict(entry), sort_keys=True))
    else:
        print(format_table(entries))
        print(f"({len(entries)} entries)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="certbroker", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def state(sp: argparse.ArgumentParser, default: Path = DEFAULT_STATE) -> None:
        sp.add_argument(
            "--state-dir",
            type=Path,
            default=default,
            help=f"state directory (keys, audit log, datasets; default {default})",
        )

    s = sub.add_parser("serve", help="run the broker (embedded default without --config)")
    s.add_argument("--config", type=Path, help="TOML configuration file")
    s.add_argument("--host")
    s.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    s.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464)")
    s.add_argument("--state-dir", type=Path)
    s.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the port (default 1); metrics on metrics-port + i",
    )
    s.add_argument(
        "--shutdown-grace-s",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight calls may take to finish (default 10)",
    )
    s.add_argument(
        "--log-format",
        choices=config.LOG_FORMATS,
        help="text (default) or json: one JSON object per line",
    )
    s.add_argument(
        "--log-level",
        choices=config.LOG_LEVELS,
        help="default info; debug also logs every successful call",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("demo", help="start a broker and show a counter session")
    state(s, Path(".certbroker-demo"))
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("lookup", help="look up one record as a clerk")
    s.add_argument("--target", default="127.0.0.1:50051")
    s.add_argument("--token", help="clerk JWT (default: $CERTBROKER_TOKEN)")
    s.add_argument("--record-type", required=True)
    s.add_argument("--subject", required=True, help="resident ID")
    s.add_argument("--matter", required=True, help="matter code (事项编码)")
    s.add_argument("--case", default="", help="case number (办件号)")
    s.add_argument(
        "--consent",
        default="id_card_read",
        choices=[*policy.CONSENT_METHODS, ""],
    )
    s.add_argument("--consent-ref", default="")
    s.add_argument("--fields", default="", help="comma-separated subset of fields")
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--evidence", type=Path, metavar="FILE", help="ask for a signed evidence document; write it"
    )
    s.set_defaults(func=cmd_lookup)

    s = sub.add_parser(
        "lookup-matter",
        help="every record a matter (or a package of matters) needs for one or more citizens, "
        "at once",
    )
    s.add_argument("--target", default="127.0.0.1:50051")
    s.add_argument("--token", help="clerk JWT (default: $CERTBROKER_TOKEN)")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--matter", help="matter code (事项编码)")
    what.add_argument(
        "--package", help="package code (一件事, e.g. YJS-ESF-001): all its matters at once"
    )
    s.add_argument("--case", default="", help="case number (办件号)")
    s.add_argument(
        "--subject",
        action="append",
        required=True,
        metavar="ID:RELATION",
        help="resident ID and relation to the case (seller, spouse, co_owner...); repeatable",
    )
    s.add_argument(
        "--consent",
        default="id_card_read",
        choices=[*policy.CONSENT_METHODS, ""],
    )
    s.add_argument("--consent-ref", default="")
    s.add_argument("--timeout", type=float, default=10.0, help="deadline for the whole bundle")
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--evidence",
        type=Path,
        metavar="FILE",
        help="ask for one signed evidence document; write it",
    )
    s.set_defaults(func=cmd_lookup_matter)

    token = sub.add_parser("token", help="development identity provider").add_subparsers(
        dest="token_command", required=True
    )
    s = token.add_parser(
        "issue",
        help="print a token trusted by `serve` on this state dir: a clerk's (--sub --roles "
        "--office), a department credential (--department) or an operator's (--operator)",
    )
    state(s)
    kind = s.add_mutually_exclusive_group()
    kind.add_argument("--department", help="department credential for this department id")
    kind.add_argument("--operator", action="store_true", help="operator token (Registry admin)")
    kind.add_argument("--citizen", help="citizen token (Citizen service) for this resident ID")
    s.add_argument("--sub", help="clerk id (operator id, or the adapter deployment's name)")
    s.add_argument("--roles", help="comma-separated roles (clerk tokens)")
    s.add_argument("--office", help="office / hall id (clerk tokens)")
    s.add_argument("--name", default="")
    s.add_argument("--ttl", type=int, default=8 * 3600, help="lifetime in seconds")
    s.set_defaults(func=cmd_token_issue)

    cli_adapters.add_parsers(sub)

    pol = sub.add_parser("policy", help="check, test and reload policies").add_subparsers(
        dest="policy_command", required=True
    )
    s = pol.add_parser("check", help="validate policy files (file:line in every error)")
    s.add_argument("files", nargs="*", type=Path)
    s.set_defaults(func=cmd_policy_check)
    s = pol.add_parser("test", help="run the policy unit tests in <dir>/tests")
    s.add_argument("--dir", type=Path, default=config.DEFAULT_POLICY_DIR)
    s.set_defaults(func=cmd_policy_test)
    s = pol.add_parser("reload", help="ask the running broker to reload (SIGHUP)")
    state(s)
    s.set_defaults(func=cmd_policy_reload)

    cli_admin.add_parsers(sub)
    cli_console.add_parser(sub)
    cli_citizen.add_parsers(sub)
    cli_evidence.add_parsers(sub, state)

    aud = sub.add_parser("audit", help="verify and query the audit log").add_subparsers(
        dest="audit_command", required=True
    )
    cli_audit_log.add_integrity_parsers(aud, state)
    cli_auditor.add_parsers(aud, state)
    s = aud.add_parser("query", help="list entries matching filters")
    state(s)
    cli_audit_log.add_location_options(s)
    s.add_argument("--clerk")
    s.add_argument("--subject")
    s.add_argument("--matter")
    s.add_argument("--record-type")
    s.add_argument("--decision", choices=["allow", "deny"])
    s.add_argument("--since", help="ISO 8601 time")
    s.add_argument("--until", help="ISO 8601 time")
    s.add_argument("--limit", type=int, default=1000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_audit_query)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    p = parser()
    args = p.parse_args(argv)
    try:
        return int(args.func(args))
    except (config.ConfigError, policy.PolicyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`certbroker audit query | head`): not an error worth a
        # traceback. Point stdout at devnull so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
