"""The web console as its users use it: Chromium (Playwright) against a real ``certbroker
console`` process and a real broker holding seeded lookups (see conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from certbroker.v1 import audit_pb2
from tests.console.conftest import (
    EXTRA_LOOKUPS,
    HOSTILE_CASE,
    OFFICE,
    OIDC_USER,
    OTHER_OFFICE,
    Hall,
)
from tests.console.oidc_provider import MiniOidcProvider

SignIn = Callable[[str], Any]

CHART = "echarts.getInstanceByDom(document.getElementById(%r)).getOption()"


def chart(page: Any, element: str) -> dict[str, Any]:
    """What an ECharts instance on the page holds: category labels and each series' data."""
    option = page.evaluate(
        f"""() => {{
            const o = {CHART % element};
            const axis = o.yAxis[0].type === 'category' ? o.yAxis[0] : o.xAxis[0];
            const series = Object.fromEntries(o.series.map(s => [s.id, s.data]));
            return {{labels: axis.data, series}};
        }}"""
    )
    return dict(option)


def test_a_clerk_is_refused_the_console(sign_in: SignIn) -> None:
    page = sign_in("clerk")
    assert page.locator("#refused").is_visible()
    assert "审计控制台仅供审计员、大厅主管和安全管理员使用" in page.inner_text("#refused")
    assert not [c for c in page.context.cookies() if c["name"] == "cb_session"]
    page.goto("/overview")  # no session was opened
    assert page.url.split("?")[0].endswith("/dev-idp/authorize")


def test_the_overview_charts_show_what_the_broker_holds(sign_in: SignIn, hall: Hall) -> None:
    page = sign_in("auditor")
    assert page.url.endswith("/overview")
    page.wait_for_selector("body[data-charts-ready=true]")
    assert page.errors == []  # no script error, no CSP violation
    held = hall.audit.Overview(audit_pb2.OverviewRequest(), metadata=hall.auditor_md())
    totals = {
        key: sum(getattr(h, key) for h in held.hours) for key in ("allowed", "denied", "failed")
    }
    assert totals == {"allowed": 2 + EXTRA_LOOKUPS, "denied": 3, "failed": 1}
    hours = chart(page, "chart-hours")
    assert {k: sum(v) for k, v in hours["series"].items()} == totals
    assert len(hours["labels"]) in (24, 25)  # every hour of the last day, empty ones too
    offices = chart(page, "chart-offices")
    by_office = dict(
        zip(offices["labels"], zip(*offices["series"].values(), strict=True), strict=True)
    )
    assert by_office == {OFFICE: (2 + EXTRA_LOOKUPS, 2, 1), OTHER_OFFICE: (0, 1, 0)}
    departments = chart(page, "chart-departments")
    failed = dict(zip(departments["labels"], departments["series"]["failed"], strict=True))
    assert failed["human_resources_social_security"] == 1
    assert page.inner_text("#total-allowed") == str(totals["allowed"])
    assert page.inner_text("#policy-version") == held.policy_version[:12]
    rows = page.locator("#departments tbody tr").all_inner_texts()
    assert any(r.startswith("human_resources_social_security") for r in rows)
    # The view itself is an audit entry of the signed-in auditor.
    views = hall.entries(clerk="aud-01")
    assert any(e.rule_id == "audit.overview" and e.outcome == "OK" for e in views)


def test_a_hall_supervisor_sees_their_hall_only(sign_in: SignIn, hall: Hall) -> None:
    page = sign_in("supervisor")
    assert page.url.endswith("/overview")
    page.wait_for_selector("body[data-charts-ready=true]")
    assert chart(page, "chart-offices")["labels"] == [OFFICE]
    assert [a.inner_text() for a in page.locator(".top nav a").all()] == ["总览"]
    page.goto("/log")
    assert "无权访问：访问日志" in page.inner_text("#refused")
    response = page.goto(f"/overview?office={OTHER_OFFICE}")  # the broker refuses this one
    assert response is not None
    assert response.status == 403
    assert "OFFICE_NOT_ALLOWED" in page.inner_text("#refused")
    refused = [e for e in hall.entries(clerk="sup-01") if e.outcome == "OFFICE_NOT_ALLOWED"]
    assert len(refused) == 1


def test_filter_and_page_the_access_log_and_export_csv(sign_in: SignIn, hall: Hall) -> None:
    page = sign_in("auditor")
    page.goto("/log")
    page.fill("input[name=clerk]", "clerk-0417")
    page.select_option("select[name=decision]", "allow")
    page.click(".filters button[type=submit]")
    expected = [e.sequence for e in hall.entries(clerk="clerk-0417", decision="allow")]
    assert len(expected) == 3 + EXTRA_LOOKUPS  # the failed one was allowed too
    shown = [int(t) for t in page.locator("#log-table tbody tr td:first-child").all_inner_texts()]
    assert shown == expected
    # Three rows a page: follow 下一页 (an HTMX swap of the page's table) to the end.
    page.goto("/log?clerk=clerk-0417&decision=allow&page_size=3")
    seen: list[int] = []
    while True:
        rows = page.locator("#log-table tbody tr td:first-child").all_inner_texts()
        seen += [int(t) for t in rows]
        more = page.locator("#next-page")
        if more.count() == 0:
            break
        more.click()
        page.wait_for_function(
            "n => !document.querySelector('#log-table tbody tr td') ||"
            " Number(document.querySelector('#log-table tbody tr td').innerText) > n",
            arg=seen[-1],
        )
    assert seen == expected
    assert "page_token=" in page.url  # the swap pushed the page's own URL
    csv_text = page.request.get("/log.csv?clerk=clerk-0417&decision=allow").text()
    lines = csv_text.lstrip("\ufeff").splitlines()
    assert lines[0].startswith("sequence,entry_id,time")
    assert [int(line.split(",")[0]) for line in lines[1:]] == expected


def test_html_in_an_entry_renders_as_text(sign_in: SignIn, hall: Hall) -> None:
    (hostile,) = hall.entries(case_number=HOSTILE_CASE)
    page = sign_in("auditor")
    page.goto(f"/log?case_number={HOSTILE_CASE}&clerk=clerk-0417&decision=deny")
    page.goto(f"/entry/{hostile.sequence}")
    assert page.inner_text("#case-number") == HOSTILE_CASE
    assert page.locator("#case-number script").count() == 0
    assert page.evaluate("window.pwned") is None
    page.goto("/log?decision=deny")
    assert HOSTILE_CASE in page.inner_text("#log-table")
    assert page.locator("#log-table script").count() == 0
    assert page.evaluate("window.pwned") is None


def test_an_entry_verifies_against_a_signed_checkpoint(sign_in: SignIn, hall: Hall) -> None:
    first = hall.entries(clerk="clerk-0417")[0]
    page = sign_in("auditor")
    page.goto(f"/entry/{first.sequence}")
    page.click("#verify-entry")
    assert page.get_attribute("#verdict", "data-code") == "OK"
    assert f"条目 #{first.sequence}" in page.inner_text("#verdict")
    page.goto(f"/entry/{first.sequence}")  # now covered by the checkpoint the check signed
    assert page.locator("ol.hashes li").count() >= 1


def test_a_citizen_report_lists_every_access(sign_in: SignIn, hall: Hall) -> None:
    page = sign_in("auditor")
    page.goto("/report")
    page.fill("input[name=subject_id]", hall.subject)
    page.click(".filters button[type=submit]")
    held = hall.audit.CitizenReport(
        audit_pb2.CitizenReportRequest(subject_id=hall.subject), metadata=hall.auditor_md()
    )
    rows = page.locator("#report-table tbody tr").all_inner_texts()
    assert len(rows) == len(held.accesses) == 4  # household, marriage, social security, refused
    assert "不动产转移登记" in rows[0]
    assert page.locator("#print").is_visible()


def test_mark_an_anomaly_reviewed_and_find_it_in_the_audit_log(sign_in: SignIn, hall: Hall) -> None:
    page = sign_in("auditor")
    page.goto("/anomalies")
    group = page.locator("section.rule[data-rule=NO_CASE_NUMBER]")
    row = group.locator("tbody tr", has_text="clerk-0417").first
    row.locator("a.drill").click()  # HTMX drill-down: the entries behind it, in place
    detail = group.locator("td[id^=detail-]").first
    detail.locator("#finding table").wait_for()
    (no_case,) = [e for e in hall.entries(clerk="clerk-0417") if not e.case_number]
    assert str(no_case.sequence) in detail.inner_text()
    detail.locator("textarea[name=note]").fill("已核实：<b>补录</b>办件号")
    detail.locator("#review-form button").click()
    page.wait_for_selector("#review")
    assert "已核实：<b>补录</b>办件号" in page.inner_text("#review")
    reviews = [e for e in hall.entries(clerk="aud-01") if e.rule_id == "audit.review_finding"]
    assert len(reviews) == 1
    assert reviews[0].decision_id.endswith("note=已核实：<b>补录</b>办件号")
    assert reviews[0].outcome == "OK"
    page.goto("/anomalies")
    assert "已审阅" in page.locator("section.rule[data-rule=NO_CASE_NUMBER]").inner_text()


def test_a_form_without_its_csrf_token_is_refused(sign_in: SignIn, hall: Hall) -> None:
    page = sign_in("auditor")
    page.goto("/anomalies")
    finding_id = page.locator("section.rule tbody tr[id^=finding-]").first.get_attribute("id")
    assert finding_id is not None
    target = f"/anomalies/{finding_id.removeprefix('finding-')}/review"
    before = len(hall.entries(clerk="aud-01"))
    for form in ({"rule": "NO_CASE_NUMBER", "note": "x"}, {"csrf": "forged", "note": "x"}):
        response = page.request.post(target, form=form)
        assert response.status == 403
        assert "表单已失效" in response.text()
    # The broker was never called: no review, no entry at all.
    assert len(hall.entries(clerk="aud-01")) == before
    assert page.request.post("/signout", form={}).status == 403  # nor sign the user out
    page.goto("/anomalies")
    assert page.locator(".who").count() == 1


def test_verify_an_uploaded_export_names_the_first_bad_entry(
    sign_in: SignIn, hall: Hall, tmp_path: Path
) -> None:
    md = hall.auditor_md()
    hall.audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(fresh=True), metadata=md)
    data = b"".join(c.data for c in hall.audit.Export(audit_pb2.ExportRequest(), metadata=md))
    good = tmp_path / "segment.jsonl"
    good.write_bytes(data)
    lines = data.split(b"\n")
    third = json.loads(lines[3])
    lines[3] = lines[3].replace(third["body"]["clerk"].encode(), b"clerk-9999", 1)
    bad = tmp_path / "edited.jsonl"
    bad.write_bytes(b"\n".join(lines))
    page = sign_in("auditor")
    for path, code in ((good, "OK"), (bad, "EDITED")):
        page.goto("/verify")
        page.set_input_files("#verify-export input[type=file]", str(path))
        page.click("#verify-export button")
        assert page.get_attribute("#verdict", "data-code") == code
    assert "第一个问题条目：#3" in page.inner_text("#first-bad")


def test_a_security_officer_disables_a_clerk_with_reason_and_ticket(
    sign_in: SignIn, hall: Hall
) -> None:
    page = sign_in("security")
    assert page.url.endswith("/controls")
    form = page.locator("#form-disable-clerk")
    form.locator("input[name=target]").fill("clerk-0042")
    form.locator("input[name=reason]").fill("查询邻居信息")
    form.locator("input[name=ticket]").fill("SEC-2026-0042")
    form.locator("button").click()
    assert page.locator("#done").is_visible()
    assert "clerk-0042" in page.inner_text("#controls")
    assert "SEC-2026-0042" in page.inner_text("#controls")
    admin = [e for e in hall.entries(clerk="sec-01") if e.kind == "admin"]
    assert any(e.outcome == "OK" and "clerk-0042" in e.decision_id for e in admin)
    page.goto("/overview")
    assert "无权访问：总览" in page.inner_text("#refused")


def test_sign_in_with_an_openid_connect_provider(
    browser: Any, oidc_console: str, oidc_idp: MiniOidcProvider, hall: Hall
) -> None:
    context = browser.new_context(base_url=oidc_console, locale="zh-CN")
    try:
        page = context.new_page()
        page.goto("/overview")  # -> /signin -> the IdP -> /auth/callback -> / -> /overview
        page.wait_for_url("**/overview")
        assert OIDC_USER["name"] in page.inner_text(".who")
        page.wait_for_selector("body[data-charts-ready=true]")
        (asked,) = oidc_idp.token_requests
        assert asked["grant_type"] == "authorization_code"
        assert asked["code_verifier"]  # PKCE: the provider checked it against the challenge
        session = [c for c in context.cookies() if c["name"] == "cb_session"]
        assert [(c["httpOnly"], c["sameSite"]) for c in session] == [(True, "Strict")]
        # The broker accepted the provider's token: the view is that user's audit entry.
        views = hall.entries(clerk=OIDC_USER["sub"])
        assert [e.rule_id for e in views] == ["audit.overview"]
        # A callback that is not this browser's sign-in is refused.
        response = page.goto("/auth/callback?code=stolen&state=forged")
        assert response is not None
        assert response.status == 400
        assert "登录失败" in page.inner_text("main")
    finally:
        context.close()


def test_verify_a_receipt(sign_in: SignIn, hall: Hall) -> None:
    answered = next(e for e in hall.entries(clerk="clerk-0417") if e.outcome == "OK")
    page = sign_in("auditor")
    for entry_hash, code in ((answered.entry_hash, "OK"), ("0" * 16, "REWRITTEN")):
        page.goto("/verify")
        page.fill("#verify-receipt input[name=entry_id]", answered.entry_id)
        page.fill("#verify-receipt input[name=entry_hash]", f"sha256:{entry_hash[:16]}…")
        page.click("#verify-receipt button")
        assert page.get_attribute("#verdict", "data-code") == code
    assert "hash is not the receipt's" in page.inner_text("#verdict")
    assert f"第一个问题条目：#{answered.sequence}" in page.inner_text("#first-bad")
