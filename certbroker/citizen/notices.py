"""What a citizen is told about one access to their records, and how a phone shows it.

:func:`notice_fields` builds the notice of an audit entry for the outbox
(:class:`certbroker.audit.outbox.NoticeOutbox`), inside the entry's transaction: identifiers,
names and the decision only, never a record's contents. Its keys::

    entry_id, subject_id, time     the audit entry, the citizen, when (UTC, ms)
    office, clerk                  where; clerk "" unless the policy shows clerk numbers
    matter_code, matter_name       what the clerk was handling
    record_type, record_label      which record (户籍信息, 婚姻登记信息 ...)
    decision                       "allow" | "deny"

A covert matter's notice is due only after its disclosure delay (the relay holds it back
until then). :func:`render` is the Chinese line a phone shows (``certbroker notify tail``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone

from certbroker.audit.events import iso_time
from certbroker.policy.model import PolicySet

__all__ = ["RECORD_LABELS", "notice_fields", "notices_of", "record_label", "render", "visible_at"]

#: How a citizen calls the contract's record types (a declared type has its own ``label``).
RECORD_LABELS: Mapping[str, str] = {
    "household": "户籍信息",
    "marriage": "婚姻登记信息",
    "property": "不动产登记信息",
    "social_security": "社会保险信息",
}
_CHINA = timezone(timedelta(hours=8))


def record_label(policy: PolicySet, record_type: str) -> str:
    """The record type as a citizen reads it: its label, else the name."""
    declared = policy.record_types.get(record_type)
    if declared is not None and declared.label:
        label = declared.label
        return label if label.endswith("信息") else f"{label}信息"
    return RECORD_LABELS.get(record_type, record_type)


def visible_at(policy: PolicySet, matter_code: str, time: str) -> str:
    """When an access at ``time`` under ``matter_code`` may be shown to the citizen: at once,
    or after a covert matter's disclosure delay (same ISO format, so times compare as text)."""
    matter = policy.matters.get(matter_code)
    if matter is None or not matter.covert:
        return time
    moment = datetime.fromisoformat(time) + timedelta(seconds=matter.disclosure_delay_s)
    return iso_time(moment)


def notice_fields(policy: PolicySet, fields: Mapping[str, object]) -> tuple[dict[str, object], str]:
    """The notice of the access entry ``fields`` (its body) and when it is due."""
    matter_code = str(fields["matter_code"])
    matter = policy.matters.get(matter_code)
    record_type = str(fields["record_type"])
    time = str(fields["time"])
    notice: dict[str, object] = {
        "entry_id": str(fields["entry_id"]),
        "subject_id": str(fields["subject_id"]),
        "time": time,
        "office": str(fields["office"]),
        "clerk": str(fields["clerk"]) if policy.citizen.show_clerk == "number" else "",
        "matter_code": matter_code,
        "matter_name": matter.name if matter else "",
        "record_type": record_type,
        "record_label": record_label(policy, record_type),
        "decision": str(fields["decision"]),
    }
    return notice, visible_at(policy, matter_code, time)


def notices_of(
    current: Callable[[], PolicySet],
) -> Callable[[Mapping[str, object]], tuple[Mapping[str, object], str] | None]:
    """The outbox's notice function under the policy in force at each append."""

    def notice(fields: Mapping[str, object]) -> tuple[Mapping[str, object], str] | None:
        return notice_fields(current(), fields)

    return notice


def render(notice: Mapping[str, object]) -> str:
    """The notice as the phone shows it, e.g. ``您的婚姻登记信息于 2026年03月02日 14:05 被
    gz-haizhu-24h-01 窗口为办理 不动产转移登记 调取``."""
    moment = datetime.fromisoformat(str(notice["time"])).astimezone(_CHINA)
    when = f"{moment:%Y年%m月%d日 %H:%M}"
    office = str(notice.get("office") or "某")
    clerk = f"（工号 {notice['clerk']}）" if notice.get("clerk") else ""
    matter = str(notice.get("matter_name") or notice.get("matter_code") or "某事项")
    label = str(notice.get("record_label") or notice.get("record_type"))
    if notice.get("decision") == "deny":
        return f"您的{label}于 {when} 被 {office} 窗口{clerk}为办理 {matter} 申请调取，未获准许"
    return f"您的{label}于 {when} 被 {office} 窗口{clerk}为办理 {matter} 调取"


def now_iso() -> str:
    """Now, as audit times are written."""
    return iso_time(datetime.now(UTC))
