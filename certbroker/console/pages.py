"""The console's pages. Each one fetches its data from the broker with the user's own token
(so each view is authorized by the broker and is itself an audit entry) and renders a template.

Which roles see which page is :data:`NAV`; the broker refuses the rest anyway (its refusal is
shown as the same refusal page).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from google.protobuf import timestamp_pb2
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from certbroker.audit.export import verify_export
from certbroker.audit.integrity import checkpoint
from certbroker.audit.verify import receipts
from certbroker.audit.verify.report import NAMES, IntegrityReport
from certbroker.console import labels
from certbroker.console.broker import BrokerRefusal
from certbroker.console.sessions import Session
from certbroker.console.web import NAV, Console, Refused
from certbroker.v1 import admin_pb2, audit_pb2

#: Rows per page of the access log (``?page_size=`` up to MAX_PAGE_SIZE).
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
#: The CSV export's limit: more than this is an `audit export`, not a spreadsheet.
CSV_MAX_ROWS = 50_000
#: The largest export file the verify page takes.
MAX_UPLOAD = 64 * 1024 * 1024

VERDICTS = {
    "OK": "完好",
    "MALFORMED": "格式错误",
    "EDITED": "条目被篡改",
    "DELETED": "条目被删除",
    "INSERTED": "条目被插入",
    "REORDERED": "条目顺序被改动",
    "TRUNCATED": "日志被截断",
    "REWRITTEN": "日志被重写",
    "WRONG_KEY": "检查点签名密钥不符",
    "BAD_CHECKPOINT": "检查点无效",
    "UNVERIFIED_CHECKPOINTS": "检查点未验证",
    "BAD_TREE": "默克尔树不符",
}


_ROLES = {item.path: item.roles for item in NAV}
_TITLES = {item.path: item.title for item in NAV}


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _page(request: Request, path: str) -> tuple[Console, Session]:
    console = _console(request)
    return console, console.require(request, _TITLES[path], _ROLES[path])


async def home(request: Request) -> Response:
    """The first page the user may see."""
    console = _console(request)
    session = console.session(request)
    if session is None:
        return RedirectResponse("/signin", status_code=303)
    for item in NAV:
        if set(item.roles) & set(session.user.roles):
            return RedirectResponse(item.path, status_code=303)
    raise Refused("审计控制台")


def _stamp(moment: Any) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _range(since: str, until: str) -> audit_pb2.TimeRange | None:
    """A TimeRange from a form's dates (China time); None when both are empty."""
    try:
        start = labels.local_time(since)
        end = labels.local_time(until, end_of_day=True)
    except ValueError:
        raise BrokerRefusal(
            "INVALID_ARGUMENT", "BAD_TIME_RANGE", "日期格式应为 YYYY-MM-DD"
        ) from None
    if start is None and end is None:
        return None
    span = audit_pb2.TimeRange()
    if start is not None:
        span.since.CopyFrom(_stamp(start))
    if end is not None:
        span.until.CopyFrom(_stamp(end))
    return span


# --- overview ---------------------------------------------------------------------------------


async def overview(request: Request) -> Response:
    """Lookups, denials and failures per hour, by office and department; the departments; the
    last checkpoint; the policy version; the open anomalies."""
    console, session = _page(request, "/overview")
    office = request.query_params.get("office", "")
    reply = await console.broker.overview(audit_pb2.OverviewRequest(office=office), session.token)
    totals = [sum(getattr(h, k) for h in reply.hours) for k in ("allowed", "denied", "failed")]
    return console.render(
        request,
        "overview.html",
        {
            "reply": reply,
            "office": office,
            "totals": totals,
            "chart": json.dumps(labels.chart_data(reply), ensure_ascii=False),
            "has_checkpoint": reply.HasField("last_checkpoint"),
        },
        session=session,
    )


# --- access log -------------------------------------------------------------------------------

_FILTERS = ("clerk", "office", "subject_id", "matter_code", "record_type", "decision")


def _query(request: Request, page_size: int) -> tuple[audit_pb2.QueryRequest, dict[str, str]]:
    """The Query a page's filters ask for (``page_size`` unless the URL gives 1..200), and the
    filters as given, to keep in the paging links."""
    params = request.query_params
    values = {
        name: params.get(name, "").strip() for name in (*_FILTERS, "since", "until", "page_size")
    }
    if values["page_size"].isdigit() and 0 < int(values["page_size"]) <= MAX_PAGE_SIZE:
        page_size = int(values["page_size"])
    else:
        values["page_size"] = ""
    query = audit_pb2.QueryRequest(page_size=page_size, page_token=params.get("page_token", ""))
    for name in _FILTERS:
        setattr(query, name, values[name])
    span = _range(values["since"], values["until"])
    if span is not None:
        query.time.CopyFrom(span)
    return query, values


async def access_log(request: Request) -> Response:
    """The audit log, filtered like ``audit query``, a page at a time (newer pages follow)."""
    console, session = _page(request, "/log")
    query, values = _query(request, PAGE_SIZE)
    entries = await console.broker.query(query, session.token)
    next_token = entries[-1].next_page_token if entries else ""
    filters = {k: v for k, v in values.items() if v}
    return console.render(
        request,
        "log.html",
        {
            "entries": entries,
            "values": values,
            "filters": filters,
            "next_token": next_token,
            "page_token": query.page_token,
            "decisions": labels.DECISIONS,
        },
        session=session,
    )


def _cell(value: object) -> str:
    """A CSV cell a spreadsheet will not run as a formula."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


_CSV_COLUMNS = (
    "sequence", "entry_id", "time", "kind", "clerk", "office", "subject_id", "matter_code",
    "case_number", "record_type", "decision", "rule_id", "outcome", "status", "department",
    "entry_hash",
)  # fmt: skip


async def access_log_csv(request: Request) -> Response:
    """The filtered log as CSV (UTF-8 with BOM, as Excel expects for Chinese text)."""
    console, session = _page(request, "/log")
    query, _values = _query(request, 1000)
    query.page_size = 1000  # whatever the page showed: the CSV holds every match
    # The first page before the response starts: a refusal is a page, not a broken download.
    first = await console.broker.query(query, session.token)

    async def rows() -> AsyncIterator[str]:
        out = io.StringIO()
        writer = csv.writer(out)
        out.write("\ufeff")
        writer.writerow(_CSV_COLUMNS)
        page, written = first, 0
        while page:
            for e in page:
                row = [
                    labels.when_seconds(e.time) if c == "time" else getattr(e, c)
                    for c in _CSV_COLUMNS
                ]
                writer.writerow([_cell(v) for v in row])
            written += len(page)
            yield out.getvalue()
            out.seek(0)
            out.truncate()
            token = page[-1].next_page_token
            if not token or written >= CSV_MAX_ROWS:
                break
            query.page_token = token
            page = await console.broker.query(query, session.token)

    return StreamingResponse(
        rows(),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": 'attachment; filename="certbroker-audit.csv"'},
    )


async def _entry(console: Console, session: Session, sequence: int) -> audit_pb2.AuditEntry:
    page = await console.broker.query(
        audit_pb2.QueryRequest(page_token=str(sequence - 1) if sequence > 1 else "", page_size=1),
        session.token,
    )
    if not page or page[0].sequence != sequence:
        raise BrokerRefusal("NOT_FOUND", "NO_SUCH_ENTRY", f"没有序号为 {sequence} 的条目")
    return page[0]


def _sequence(request: Request) -> int:
    try:
        value = int(request.path_params["sequence"])
    except ValueError:
        value = 0
    if value < 1:
        raise BrokerRefusal("INVALID_ARGUMENT", "BAD_SEQUENCE", "序号应为正整数")
    return value


async def entry(request: Request) -> Response:
    """One entry, its inclusion proof in the latest checkpoint, and a verify button."""
    console, session = _page(request, "/log")
    sequence = _sequence(request)
    found = await _entry(console, session, sequence)
    proof: audit_pb2.InclusionProof | None = None
    proof_problem = ""
    try:
        proof = await console.broker.unary(
            console.broker.audit.GetInclusionProof,
            audit_pb2.InclusionProofRequest(sequence=sequence),
            session.token,
        )
    except BrokerRefusal as exc:
        if exc.code == "PERMISSION_DENIED":
            raise
        proof_problem = exc.reason  # NO_CHECKPOINT, NOT_IN_CHECKPOINT: not signed yet
    return console.render(
        request,
        "entry.html",
        {
            "e": found,
            "proof": proof,
            "proof_problem": proof_problem,
            "hashes": [h.hex() for h in proof.hashes] if proof else [],
        },
        session=session,
    )


def _public_key(console: Console) -> Any:
    try:
        return checkpoint.load_public_key(console.settings.public_key)
    except (OSError, ValueError) as exc:
        raise BrokerRefusal(
            "FAILED_PRECONDITION", "NO_PUBLIC_KEY", f"无法读取检查点公钥：{exc}"
        ) from None


async def _prove(
    console: Console,
    session: Session,
    *,
    sequence: int = 0,
    entry_id: str = "",
    receipt_hash: str = "",
) -> dict[str, Any]:
    """The receipt check of ``audit prove``: fresh checkpoint, proof, one-entry export. The
    proof is asked for ``sequence`` if given, else ``entry_id``; the entry must have both."""
    key = _public_key(console)
    broker, token = console.broker, session.token
    head = await broker.unary(
        broker.audit.GetCheckpoint, audit_pb2.GetCheckpointRequest(fresh=True), token
    )
    proof = await broker.unary(
        broker.audit.GetInclusionProof,
        audit_pb2.InclusionProofRequest(
            entry_id="" if sequence else entry_id, sequence=sequence, tree_size=head.size
        ),
        token,
    )
    seq = proof.leaf_index + 1
    data = await broker.export(seq, seq, token)
    try:
        proven = receipts.prove(
            head, proof, data, key, entry_id=entry_id, receipt_hash=receipt_hash
        )
    except receipts.ProofError as exc:
        return {
            "ok": False,
            "code": NAMES.get(exc.code, str(exc.code)),
            "text": str(exc),
            "first_bad": seq,
            "location": "",
        }
    return {
        "ok": True,
        "code": "OK",
        "sequence": proven.sequence,
        "entry_hash": proven.entry_hash,
        "size": proven.checkpoint.size,
        "time": labels.when(proven.checkpoint.time),
        "root": proven.checkpoint.root_hash.hex(),
    }


async def entry_verify(request: Request) -> Response:
    """The verify button: the entry checked against a freshly signed checkpoint, here."""
    console, session = _page(request, "/log")
    await console.form(request, session)
    sequence = _sequence(request)
    found = await _entry(console, session, sequence)
    verdict = await _prove(console, session, sequence=sequence, entry_id=found.entry_id)
    return console.render(
        request,
        "verdict.html",
        {"verdict": verdict, "kind": "entry", "e": found},
        session=session,
    )


# --- citizen report ---------------------------------------------------------------------------


async def report(request: Request) -> Response:
    """Every access to one citizen's records, printable."""
    console, session = _page(request, "/report")
    params = request.query_params
    subject = params.get("subject_id", "").strip()
    reply = None
    if subject:
        query = audit_pb2.CitizenReportRequest(subject_id=subject)
        span = _range(params.get("since", ""), params.get("until", ""))
        if span is not None:
            query.time.CopyFrom(span)
        reply = await console.broker.unary(console.broker.audit.CitizenReport, query, session.token)
    return console.render(
        request,
        "report.html",
        {
            "subject": subject,
            "since": params.get("since", ""),
            "until": params.get("until", ""),
            "reply": reply,
        },
        session=session,
    )


# --- anomalies --------------------------------------------------------------------------------


async def _findings(console: Console, session: Session) -> list[audit_pb2.Finding]:
    reply = await console.broker.unary(
        console.broker.audit.Anomalies, audit_pb2.AnomaliesRequest(), session.token
    )
    return list(reply.findings)


async def anomalies(request: Request) -> Response:
    """The anomaly queue, grouped by rule; open findings first."""
    console, session = _page(request, "/anomalies")
    findings = await _findings(console, session)
    groups: dict[str, list[audit_pb2.Finding]] = {}
    for f in sorted(findings, key=lambda f: f.HasField("review")):
        groups.setdefault(f.rule, []).append(f)
    open_count = sum(not f.HasField("review") for f in findings)
    return console.render(
        request,
        "anomalies.html",
        {"groups": groups, "open_count": open_count, "total": len(findings)},
        session=session,
    )


async def finding(request: Request) -> Response:
    """One finding: the entries behind it, its review or the form to review it."""
    console, session = _page(request, "/anomalies")
    wanted = request.path_params["finding_id"]
    found = next((f for f in await _findings(console, session) if f.finding_id == wanted), None)
    if found is None:
        raise BrokerRefusal("NOT_FOUND", "NO_SUCH_FINDING", "没有这项异常（可能已不在统计范围内）")
    sequences = set(found.sequences)
    first, last = min(sequences), max(sequences)
    entries: list[audit_pb2.AuditEntry] = []
    token = str(first - 1) if first > 1 else ""
    while len(entries) < len(sequences):  # the clerk's entries over the finding's span
        page = await console.broker.query(
            audit_pb2.QueryRequest(clerk=found.clerk, page_token=token, page_size=1000),
            session.token,
        )
        entries += [e for e in page if e.sequence in sequences]
        token = page[-1].next_page_token if page else ""
        if not token or int(token) >= last:
            break
    return console.render(
        request,
        "finding.html",
        {"f": found, "entries": entries, "partial": request.headers.get("hx-request") == "true"},
        session=session,
    )


async def review(request: Request) -> Response:
    """Mark a finding reviewed, with a note: the broker audits the review as its own entry."""
    console, session = _page(request, "/anomalies")
    form = await console.form(request, session)
    finding_id = request.path_params["finding_id"]
    await console.broker.unary(
        console.broker.audit.ReviewFinding,
        audit_pb2.ReviewFindingRequest(
            finding_id=finding_id, rule=str(form.get("rule", "")), note=str(form.get("note", ""))
        ),
        session.token,
    )
    return RedirectResponse(f"/anomalies/{finding_id}", status_code=303)


# --- verify -----------------------------------------------------------------------------------


async def verify(request: Request) -> Response:
    """Upload an export or give a receipt; see the verdict."""
    console, session = _page(request, "/verify")
    return console.render(request, "verify.html", {}, session=session)


def _report(report: IntegrityReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "code": report.name,
        "entries": report.entries,
        "first_bad": report.first_bad,
        "location": report.location,
        "text": report.problem,
        "checkpoints": report.checkpoints,
    }


async def verify_upload(request: Request) -> Response:
    """Verify an uploaded export file offline, with the checkpoint public key only."""
    console, session = _page(request, "/verify")
    if int(request.headers.get("content-length") or 0) > MAX_UPLOAD:
        raise BrokerRefusal("INVALID_ARGUMENT", "FILE_TOO_LARGE", "文件超过 64 MiB")
    form = await console.form(request, session)
    upload = form.get("export")
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise BrokerRefusal("INVALID_ARGUMENT", "MISSING_FILE", "请选择导出文件")
    key = _public_key(console)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.jsonl"
        path.write_bytes(await upload.read())
        result = await asyncio.to_thread(verify_export, path, key)
    verdict = _report(result)
    return console.render(
        request,
        "verdict.html",
        {"verdict": verdict, "kind": "export", "name": upload.filename},
        session=session,
    )


async def verify_receipt(request: Request) -> Response:
    """Verify a receipt (entry id and hash as printed, or its JSON) against the broker."""
    console, session = _page(request, "/verify")
    form = await console.form(request, session)
    entry_id = str(form.get("entry_id", "")).strip()
    entry_hash = str(form.get("entry_hash", "")).strip()
    upload = form.get("receipt")
    if isinstance(upload, UploadFile) and upload.filename:
        try:
            data = json.loads(await upload.read(65536))
            data = data.get("receipt", data)
            entry_id, entry_hash = str(data["entry_id"]), str(data.get("entry_hash", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BrokerRefusal(
                "INVALID_ARGUMENT", "BAD_RECEIPT", "回执文件应为含 entry_id 的 JSON"
            ) from None
    cleaned = entry_hash.lower().removeprefix("sha256:").rstrip("…")
    if cleaned and (
        not 8 <= len(cleaned) <= 64 or any(c not in "0123456789abcdef" for c in cleaned)
    ):
        raise BrokerRefusal("INVALID_ARGUMENT", "BAD_ENTRY_HASH", "回执哈希应为 8 至 64 位十六进制")
    if not entry_id:
        raise BrokerRefusal("INVALID_ARGUMENT", "MISSING_ARGUMENT", "请填写回执的条目编号")
    verdict = await _prove(console, session, entry_id=entry_id, receipt_hash=cleaned)
    return console.render(
        request,
        "verdict.html",
        {"verdict": verdict, "kind": "receipt", "entry_id": entry_id},
        session=session,
    )


# --- controls ---------------------------------------------------------------------------------

#: action -> (Admin method, the form field naming the target, the request's target field)
_ACTIONS = {
    "disable-clerk": ("DisableClerk", admin_pb2.DisableClerkRequest, "sub"),
    "enable-clerk": ("EnableClerk", admin_pb2.EnableClerkRequest, "sub"),
    "revoke-token": ("RevokeToken", admin_pb2.RevokeTokenRequest, "jti"),
    "revoke-before": ("RevokeTokensBefore", admin_pb2.RevokeTokensBeforeRequest, "sub"),
    "disable-office": ("DisableOffice", admin_pb2.DisableOfficeRequest, "office"),
    "enable-office": ("EnableOffice", admin_pb2.EnableOfficeRequest, "office"),
    "freeze": ("FreezeSubject", admin_pb2.FreezeSubjectRequest, "subject_id"),
    "unfreeze": ("UnfreezeSubject", admin_pb2.UnfreezeSubjectRequest, "subject_id"),
}


async def controls(request: Request) -> Response:
    """The controls in force, and the forms that change them (reason and ticket required)."""
    console, session = _page(request, "/controls")
    reply = await console.broker.controls(session.token)
    return console.render(
        request,
        "controls.html",
        {"reply": reply, "done": request.query_params.get("done", "")},
        session=session,
    )


async def control_change(request: Request) -> Response:
    """One Admin call from a form; the broker validates and audits it."""
    console, session = _page(request, "/controls")
    form = await console.form(request, session)
    action = request.path_params["action"]
    if action not in _ACTIONS:
        raise BrokerRefusal("INVALID_ARGUMENT", "UNKNOWN_ACTION", "未知操作")
    method, message, target = _ACTIONS[action]
    call = message()
    setattr(call, target, str(form.get("target", "")).strip())
    call.why.reason = str(form.get("reason", "")).strip()
    call.why.ticket = str(form.get("ticket", "")).strip()
    if isinstance(call, admin_pb2.FreezeSubjectRequest):
        roles = str(form.get("except_roles", ""))
        call.except_roles.extend(r.strip() for r in roles.split(",") if r.strip())
    if isinstance(call, admin_pb2.DisableClerkRequest):
        span = _range("", str(form.get("until", "")))  # a bad date: INVALID_ARGUMENT
        if span is not None:
            call.until.CopyFrom(span.until)
    reply = await console.broker.unary(getattr(console.broker.admin, method), call, session.token)
    return RedirectResponse(
        f"/controls?done={action}&seq={reply.receipt.sequence}", status_code=303
    )


def routes() -> list[Route]:
    """The pages' routes."""
    return [
        Route("/", home),
        Route("/overview", overview),
        Route("/log", access_log),
        Route("/log.csv", access_log_csv),
        Route("/entry/{sequence}", entry),
        Route("/entry/{sequence}/verify", entry_verify, methods=["POST"]),
        Route("/report", report),
        Route("/anomalies", anomalies),
        Route("/anomalies/{finding_id}", finding),
        Route("/anomalies/{finding_id}/review", review, methods=["POST"]),
        Route("/verify", verify),
        Route("/verify/export", verify_upload, methods=["POST"]),
        Route("/verify/receipt", verify_receipt, methods=["POST"]),
        Route("/controls", controls),
        Route("/controls/{action}", control_change, methods=["POST"]),
    ]
