"""`certbroker demo`: start a broker on its embedded default and play a counter session.

The broker runs as its own process (`certbroker serve`), exactly as an operator would run it;
this module is counter software talking to it over gRPC with real clerk tokens.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from certbroker import audit, config
from certbroker.adapters.demo import synthetic
from certbroker.audit.outbox import read_notices
from certbroker.audit.store.db import backend_for
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.citizen.notices import render
from certbroker.cli import client
from certbroker.cli.table import format_table
from certbroker.contract import resident_id
from certbroker.v1 import broker_pb2, broker_pb2_grpc, citizen_pb2, citizen_pb2_grpc

TRANSFER, PENSION = "BDC-ZY-001", "SB-YL-001"
HOME_PACKAGE = "YJS-ESF-001"  # 二手房交易一件事: the transfer, the utilities, the 户口
OFFICE = "gz-haizhu-24h-01"  # the Haizhu 24-hour hall: the demo works at any hour


def _title(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m")


def _start(state_dir: Path) -> tuple[subprocess.Popen[str], int]:
    cmd = [
        sys.executable,
        "-m",
        "certbroker",
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--state-dir",
        str(state_dir),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY "):
            fields = dict(part.split("=") for part in line.split()[1:])
            return proc, int(fields["port"])
        print(f"  {line.rstrip()}")
    raise SystemExit(f"broker exited with {proc.wait()} before it was ready")


def run(state_dir: Path) -> int:
    """Run the demo; returns the process exit code (0 when every step behaved as shown)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*state_dir.glob("audit.sqlite*"), *state_dir.glob("quotas.sqlite*")]:
        stale.unlink()  # each demo tells its own story from an empty log (and fresh quotas)
    _title("Starting certbroker (SQLite audit, in-process department adapters, shipped policies)")
    proc, port = _start(state_dir)
    try:
        surprises = _session(state_dir, f"127.0.0.1:{port}")
        surprises += _citizen_scene(state_dir, f"127.0.0.1:{port}")
    finally:
        # Stopping the broker also writes its last summary of unauthenticated calls.
        proc.terminate()
        proc.wait(10)
    return _audit_story(state_dir, surprises)


def _session(state_dir: Path, target: str) -> list[str]:
    """The counter session; returns what did not behave as shown."""
    idp = DevIdentityProvider(state_dir)
    clerk = idp.issue("clerk-0417", ["window_clerk"], OFFICE, name="李敏")
    datasets = config.load(None, state_dir=state_dir).datasets
    seller, spouse = synthetic.sample_couple(datasets)
    buyer = next(c for c in synthetic.sample_citizens(datasets, 3) if c not in (seller, spouse))
    case = f"GZ{dt.date.today():%Y%m%d}-000123"
    channel, stub = client.stub(target)
    surprises: list[str] = []

    def show(label: str, token: str, request: broker_pb2.LookupRequest, expect: str = "OK") -> None:
        print(f"\n-> {label}")
        try:
            response = stub.Lookup(request, metadata=client.bearer(token), timeout=10)
        except grpc.RpcError as exc:
            err = client.call_error(exc)
            print(f"  refused: {err}")
            extra = {k: v for k, v in err.metadata.items() if k != "audit_entry_id"}
            if extra:
                print(f"  details: {extra}")
            if "audit_entry_id" in err.metadata:
                print(f"  (audited as entry {err.metadata['audit_entry_id']})")
            elif err.code == "UNAUTHENTICATED":
                # No caller is known, so no entry of its own (anyone could fill the log):
                # counted in this address's summary, written every interval and at shutdown.
                print("  (not an entry of its own: counted in this address's summary of")
                print("   unauthenticated calls, one audit entry per address per interval)")
            got = err.code
        else:
            print("\n".join(client.record_lines(response)))
            got = "OK"
        if got != expect:
            surprises.append(f"{label}: expected {expect}, got {got}")

    def req(
        record_type: str,
        subject: str,
        matter: str = TRANSFER,
        case_number: str = case,
        fields: Sequence[str] = (),
    ) -> broker_pb2.LookupRequest:
        return client.lookup_request(
            record_type,
            subject,
            matter,
            case_number,
            consent_reference="READER-07/0417",
            fields=fields,
        )

    _title(f"Clerk clerk-0417 (李敏, window_clerk) at {OFFICE}: what may I handle?")
    matters = stub.ListMatters(broker_pb2.ListMattersRequest(), metadata=client.bearer(clerk))
    for m in matters.matters:
        needs = ", ".join(n.record_type for n in m.needs)
        print(f"  {m.code}  {m.name}  needs: {needs}")
    for p in matters.packages:
        print(f"  {p.code} {p.name} (一件事, a package): {' + '.join(p.matter_codes)}")

    _title(
        f"Property transfer (不动产转移登记), case {case}: the seller {seller} "
        "handed over an ID card; the buyer will not come back twice"
    )
    for record_type in ("household", "marriage", "property"):
        show(f"{record_type} record of the seller", clerk, req(record_type, seller))
    show(
        "the spouse's property record (joint owner), only certificate and ownership",
        clerk,
        req("property", spouse, fields=["holdings.certificate_number", "holdings.ownership"]),
    )

    _title(
        "The same property transfer as one matter bundle (LookupMatter): the seller and the "
        "spouse as co-owner, every record the matter needs, fetched in parallel"
    )
    bundle = _bundle(
        stub, clerk, case, [(seller, "seller"), (spouse, "co_owner")], surprises.append
    )
    _evidence_scene(state_dir, bundle, surprises.append)

    _title(
        f"二手房交易一件事 ({HOME_PACKAGE}): the transfer, the utilities (水电气过户) and the 户口 "
        "(购房入户) as one call for the seller and the buyer"
    )
    _package(stub, clerk, case, [(seller, "seller"), (buyer, "buyer")], surprises.append)

    _title("What policy refuses")
    show(
        "social security is not needed for a property transfer",
        clerk,
        req("social_security", seller),
        expect="PERMISSION_DENIED",
    )
    ss_clerk = idp.issue("clerk-0722", ["social_security_clerk"], "gz-yuexiu-hall-02")
    show(
        "a social-security clerk tries the property record for a pension claim",
        ss_clerk,
        req("property", seller, matter=PENSION),
        expect="PERMISSION_DENIED",
    )
    show(
        "no case number (办件号)",
        clerk,
        req("household", seller, case_number=""),
        expect="PERMISSION_DENIED",
    )

    _title("What the broker rejects before policy")
    bad_id = seller[:17] + ("0" if seller[17] != "0" else "1")
    show(
        f"a mistyped resident ID {bad_id} (check digit)",
        clerk,
        req("household", bad_id),
        expect="INVALID_ARGUMENT",
    )
    stranger = resident_id.make("440105", dt.date(1985, 6, 1), 997)
    show(
        f"a valid ID no department knows ({stranger})",
        clerk,
        req("household", stranger),
        expect="NOT_FOUND",
    )
    show(
        "a forged token",
        clerk[:-8] + "AAAAAAAA",
        req("household", seller),
        expect="UNAUTHENTICATED",
    )
    channel.close()
    return surprises


def _citizen_scene(state_dir: Path, target: str) -> list[str]:
    """The property transfer from the co-owner's phone: who accessed my records (the Citizen
    service, with a citizen token of the dev IdP's citizen issuer) and the notice of one access,
    kept in the outbox since the embedded broker has no message broker configured."""
    surprises: list[str] = []
    seller, spouse = synthetic.sample_couple(config.load(None, state_dir=state_dir).datasets)
    _title(
        f"The co-owner {spouse} opens the provincial app: who looked at my records? "
        "(certbroker citizen accesses)"
    )
    token = DevIdentityProvider(state_dir).issue_citizen(spouse)
    channel = grpc.insecure_channel(target)
    try:
        reply = citizen_pb2_grpc.CitizenStub(channel).MyAccesses(
            citizen_pb2.MyAccessesRequest(), metadata=client.bearer(token), timeout=10
        )
    except grpc.RpcError as exc:
        surprises.append(f"MyAccesses refused: {client.call_error(exc)}")
        return surprises
    finally:
        channel.close()
    for a in reply.accesses:
        when = a.time.ToDatetime().strftime("%H:%M:%S")
        fields = ", ".join(a.fields) or "-"
        print(
            f"  {when} {a.decision:<5} {a.record_label} by {a.office} (clerk {a.clerk or '-'}) "
            f"for {a.matter_name} {a.case_number}: {fields}"
        )
    print(
        f"  ({len(reply.accesses)} accesses; this view is itself audit entry "
        f"#{reply.receipt.sequence})"
    )
    if not reply.accesses:
        surprises.append("the co-owner sees no access")
    if seller in str(reply):
        surprises.append("the co-owner's view names the seller")
    notices = list(read_notices(backend_for(state_dir / "audit.sqlite"), spouse))
    marriage = [n for n in notices if n["record_type"] == "marriage"]
    if len(notices) != len(reply.accesses) or not marriage:
        surprises.append(f"{len(notices)} notices for {len(reply.accesses)} accesses")
        return surprises
    _title("The notice on the co-owner's phone (one per access, written with its audit entry)")
    print(f"  {render(marriage[-1])}")
    print(
        "  (kept in the outbox: no message broker is configured. With [notify] nats_url the "
        "relay\n   publishes every notice to NATS JetStream; `certbroker notify tail` shows them.)"
    )
    return surprises


def _audit_story(state_dir: Path, surprises: list[str]) -> int:
    """The audit log after the session: the table, its verification and a tampered copy."""
    db = state_dir / "audit.sqlite"
    _title(
        f"The audit log ({db}): every lookup above by a known clerk, allowed or not, and "
        "the summary of the unauthenticated calls from this address"
    )
    entries = audit.query(db, audit.QueryFilter())
    print(format_table(entries))
    if not any(e.event.kind == "unauthenticated" for e in entries):
        surprises.append("the forged-token call is in no summary entry")
    report = audit.verify_chain(db)
    print(
        f"\n  certbroker audit verify: {'ok' if report.ok else 'TAMPERED'}, "
        f"{report.entries} entries"
    )
    if not report.ok:
        surprises.append(f"audit verify failed: {report.problem}")
    _tamper_demo(db, surprises.append)

    if surprises:
        print("\nUNEXPECTED:\n  " + "\n  ".join(surprises))
        return 1
    print(
        "\nDemo complete. Try it yourself: `make serve`, then `certbroker token issue` and "
        "`certbroker lookup` (see README)."
    )
    return 0


def _lookup_matter(
    stub: broker_pb2_grpc.CertificateBrokerStub,
    token: str,
    request: broker_pb2.LookupMatterRequest,
    code: str,
    citizens: int,
    surprise: Callable[[str], None],
) -> broker_pb2.LookupMatterResponse | None:
    """One LookupMatter call (a matter's bundle or a package), its items printed; ``None``
    (and a surprise) when the broker refuses it."""
    print(f"\n-> {code} for {citizens} citizens")
    try:
        response = stub.LookupMatter(request, metadata=client.bearer(token), timeout=10)
    except grpc.RpcError as exc:
        print(f"  refused: {client.call_error(exc)}")
        surprise(f"{code} refused: {client.call_error(exc)}")
        return None
    print("\n".join(client.bundle_lines(response)))
    return response


def _bundle(
    stub: broker_pb2_grpc.CertificateBrokerStub,
    token: str,
    case: str,
    subjects: Sequence[tuple[str, str]],
    surprise: Callable[[str], None],
) -> broker_pb2.LookupMatterResponse | None:
    """One LookupMatter call, one compact line per (subject, record type), with its signed
    evidence document (调取凭证) for the case file."""
    request = client.lookup_matter_request(
        TRANSFER, case, subjects, consent_reference="READER-07/0417"
    )
    request.evidence = True
    response = _lookup_matter(stub, token, request, TRANSFER, len(subjects), surprise)
    if response is None:
        return None
    failed = [i for i in response.items if i.WhichOneof("result") != "response"]
    if failed or len(response.items) != 3 * len(subjects):
        surprise(f"bundle: {len(failed)} of {len(response.items)} items failed")
    return response


def _package(
    stub: broker_pb2_grpc.CertificateBrokerStub,
    token: str,
    case: str,
    subjects: Sequence[tuple[str, str]],
    surprise: Callable[[str], None],
) -> None:
    """One LookupMatter call for the second-hand home package: the items grouped by matter,
    then what was fetched once and audited per matter."""
    request = client.lookup_package_request(
        HOME_PACKAGE, case, subjects, consent_reference="READER-07/0417"
    )
    response = _lookup_matter(stub, token, request, HOME_PACKAGE, len(subjects), surprise)
    if response is None:
        return
    by_record: dict[tuple[str, str], list[tuple[str, broker_pb2.BundleItem]]] = {}
    for group in response.matters:
        for item in group.items:
            key = (item.relation, item.record_type)
            by_record.setdefault(key, []).append((group.matter_code, item))
    print("\n  Fetched once, audited per matter (each matter saw only its own fields):")
    for (relation, record_type), uses in by_record.items():
        if len(uses) < 2:
            continue
        audited = ", ".join(
            f"#{i.response.receipt.sequence} {code} ({len(_fields(i))} fields)"
            for code, i in uses
            if i.WhichOneof("result") == "response"
        )
        lead = uses[0][1]
        once = "from the cache" if lead.response.from_cache else "1 department call"
        print(f"  {relation:<6} {record_type:<9} {once} -> {audited}")
    items = client.all_items(response)
    failed = [i for i in items if i.WhichOneof("result") != "response"]
    if failed or len(items) != 7 * len(subjects):  # 3 + 2 + 2 items per citizen
        surprise(f"package: {len(failed)} of {len(items)} items failed")
    # Only the first matter's item of a record may have called the department (an earlier
    # lookup's cache entry may have served even that one).
    if any(i.response.from_cache is False for uses in by_record.values() for _, i in uses[1:]):
        surprise("package: a record several matters need was fetched more than once")


def _fields(item: broker_pb2.BundleItem) -> set[str]:
    """The field paths an item's record holds (``holdings.address``: in any holding)."""
    record = getattr(item.response.record, item.record_type)
    paths: set[str] = set()
    for field, value in record.ListFields():
        if field.message_type is not None and field.is_repeated:
            for element in value:
                paths.update(f"{field.name}.{f.name}" for f, _ in element.ListFields())
        else:
            paths.add(field.name)
    return paths


def _tamper_demo(db: Path, surprise: Callable[[str], None]) -> None:
    """Edit a copy of the log as a dishonest operator would; verification names the entry."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "audit.sqlite"
        with sqlite3.connect(db) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)
        with sqlite3.connect(copy) as conn:
            conn.execute(
                "UPDATE audit_log SET body = replace(body, '\"deny\"', '\"allow\"') "
                "WHERE seq = (SELECT min(seq) FROM audit_log WHERE decision = 'deny')"
            )
            # A compact (format 2) log keeps the decision as a term id: point it at "allow".
            conn.execute(
                "UPDATE audit_entries SET decision = "
                "(SELECT id FROM audit_terms WHERE term = 'allow') WHERE seq = (SELECT min(seq) "
                "FROM audit_entries WHERE decision = (SELECT id FROM audit_terms "
                "WHERE term = 'deny'))"
            )
        report = audit.verify_chain(copy)
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"  after turning a 'deny' into 'allow' in a copy: "
        f"{'ok' if report.ok else 'TAMPERED'} — first bad entry #{report.first_bad}"
    )
    if report.ok:
        surprise("tampering went unnoticed")


def _evidence_scene(
    state_dir: Path,
    bundle: broker_pb2.LookupMatterResponse | None,
    surprise: Callable[[str], None],
) -> None:
    """The bundle's signed evidence for the paper case file: written, printed as the A4 page,
    verified offline as an archive clerk would (no broker, no database), then a copy with one
    field changed, which fails naming the field (certbroker.evidence, docs/evidence.md)."""
    if bundle is None or not bundle.evidence:
        surprise("the bundle came back without its evidence document")
        return
    from certbroker.evidence import jws

    folder = state_dir / "case-file"
    folder.mkdir(exist_ok=True)
    evidence, page = folder / "evidence.jws", folder / "调取凭证.pdf"
    evidence.write_text(bundle.evidence + "\n")
    payload = jws.parse(bundle.evidence).payload
    print(
        f"\n-> evidence {payload['evidence_id']}: {len(payload['items'])} records, signed by "
        f"key {jws.parse(bundle.evidence).kid} ({len(bundle.evidence)} bytes) -> {evidence}"
    )
    item = next((i for i in payload["items"] if i["record_type"] == "property"), None)
    if item is None or not item["content"]:
        surprise("the evidence holds no property record")
        return
    name = sorted(item["content"])[0]
    item["content"][name] = "已篡改"  # a copy in which one released field was changed
    head, _, signature = bundle.evidence.split(".")
    edited = folder / "evidence-edited.jws"
    edited.write_text(f"{head}.{jws.b64url(jws.canonical_json(payload))}.{signature}\n")
    steps: list[tuple[str, list[str], int]] = [
        ("print the A4 page", ["pdf", str(evidence), "-o", str(page)], 0),
        ("verify offline", ["verify", str(evidence), "--state-dir", str(state_dir)], 0),
        (
            "verify the copy with one field changed",
            ["verify", str(edited), "--state-dir", str(state_dir)],
            10,
        ),
    ]
    for label, argv, expect in steps:
        print(f"\n-> {label}: certbroker evidence {' '.join(argv[:2])} ...")
        done = subprocess.run(
            [sys.executable, "-m", "certbroker", "evidence", *argv],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = (done.stdout + done.stderr).splitlines()
        for line in lines[:4] + lines[-1:] if len(lines) > 5 else lines:  # what it says, verdict
            print(f"  {line}")
        print(f"  (exit {done.returncode})")
        if done.returncode != expect:
            surprise(f"evidence {label}: exit {done.returncode}, expected {expect}")
