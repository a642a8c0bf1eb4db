"""How the console shows values to Chinese users: dates, labels, the overview's chart data.

Times are shown in China Standard Time (UTC+8, no daylight saving) as ``2026年03月02日 10:00``;
the broker's values stay as they are everywhere else (codes, ids), escaped by the templates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from google.protobuf import timestamp_pb2

from certbroker.v1 import audit_pb2

#: China Standard Time: what the halls' clocks say.
CST = timezone(timedelta(hours=8), "CST")

ROLE_NAMES = {
    "auditor": "审计员",
    "hall_supervisor": "大厅主管",
    "security_officer": "安全管理员",
    "window_clerk": "综合受理窗口",
    "property_clerk": "不动产登记窗口",
    "social_security_clerk": "社保窗口",
}
DECISIONS = {"allow": "允许", "deny": "拒绝", "": "—"}
BREAKERS = {"closed": "正常", "half_open": "试探恢复", "open": "熔断"}
RULES = {
    "NO_CASE_NUMBER": "无办件号查询",
    "OUTSIDE_HOURS": "非工作时间查询",
    "MANY_SUBJECTS": "查询人数过多",
    "REPEATED_SUBJECT": "同一公民多案查询",
    "DENIAL_BURST": "短时多次被拒",
}
CONTROL_KINDS = {
    "clerk": "停用人员",
    "token": "吊销令牌",
    "tokens_before": "吊销此前令牌",
    "office": "停用办事点",
    "subject": "冻结公民记录",
}


def when(stamp: timestamp_pb2.Timestamp | datetime | None) -> str:
    """``2026年03月02日 10:00`` in China Standard Time; ``—`` when unset."""
    if stamp is None:
        return "—"
    if isinstance(stamp, timestamp_pb2.Timestamp):
        if not stamp.seconds and not stamp.nanos:
            return "—"
        stamp = stamp.ToDatetime(tzinfo=UTC)
    return stamp.astimezone(CST).strftime("%Y年%m月%d日 %H:%M")


def when_seconds(stamp: timestamp_pb2.Timestamp) -> str:
    """Like :func:`when`, to the second (the access log's entries)."""
    return stamp.ToDatetime(tzinfo=UTC).astimezone(CST).strftime("%Y年%m月%d日 %H:%M:%S")


def age(stamp: timestamp_pb2.Timestamp, now: datetime | None = None) -> str:
    """How long ago, in words: ``5分钟前``, ``2小时前``, ``3天前``."""
    then = stamp.ToDatetime(tzinfo=UTC)
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    if seconds < 60:
        return f"{seconds}秒前"
    if seconds < 3600:
        return f"{seconds // 60}分钟前"
    if seconds < 86400:
        return f"{seconds // 3600}小时{seconds % 3600 // 60}分钟前"
    return f"{seconds // 86400}天前"


def number(value: int) -> str:
    """Grouped digits (``12,345``), as Chinese financial and statistical tables write them."""
    return f"{value:,}"


def local_time(text: str, *, end_of_day: bool = False) -> datetime | None:
    """A form's date (``2026-03-02``) or date-time (``2026-03-02T10:00``), in China time;
    ``None`` for empty. A bare date as an upper bound means the end of that day."""
    text = text.strip()
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=CST)
    if end_of_day and len(text) == 10:
        moment += timedelta(days=1)
    return moment


def _series(
    items: Iterable[tuple[str, audit_pb2.HourCount]], order: list[str] | None = None
) -> dict[str, Any]:
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for key, h in items:
        counts = sums[key]
        counts[0] += h.allowed
        counts[1] += h.denied
        counts[2] += h.failed
    labels = order if order is not None else sorted(sums)
    return {
        "labels": labels,
        "allowed": [sums[k][0] for k in labels],
        "denied": [sums[k][1] for k in labels],
        "failed": [sums[k][2] for k in labels],
    }


def chart_data(reply: audit_pb2.OverviewResponse) -> dict[str, Any]:
    """The overview charts' data (read by ``static/console.js`` from a ``data-chart``
    attribute): per hour over the whole range, per office, per department."""
    since = reply.time.since.ToDatetime(tzinfo=UTC)
    until = reply.time.until.ToDatetime(tzinfo=UTC)
    hour = since.replace(minute=0, second=0, microsecond=0)
    hours: list[datetime] = []
    while hour < until:
        hours.append(hour)
        hour += timedelta(hours=1)
    label = {h: h.astimezone(CST).strftime("%m月%d日 %H时") for h in hours}
    by_hour = _series(
        ((label.get(h.hour.ToDatetime(tzinfo=UTC), ""), h) for h in reply.hours),
        [label[h] for h in hours],
    )
    return {
        "hours": by_hour,
        "offices": _series((h.office or "—", h) for h in reply.hours),
        "departments": _series((h.department or "—", h) for h in reply.hours),
    }
