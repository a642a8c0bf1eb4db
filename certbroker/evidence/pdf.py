"""The printable evidence page (调取凭证) for the paper case file: A4, in Chinese, with a QR code.

What it shows: the hall (office) and clerk, the matter and case number, the consent, every
released record (citizen ID masked but for its last 4 digits, relation, department, as-of time,
the released fields as a table) with its audit entry, the call's audit receipt, and a QR code.
The QR code carries the whole compact evidence when it fits in one code (then a scan alone
verifies offline: ``certbroker evidence verify``), else :func:`qr_summary`: the evidence id,
the call's audit entry hash, the key id and the signature, which an archive clerk compares with
the evidence file (``certbroker evidence verify FILE --qr TEXT``).

Font: reportlab cannot embed Debian's Noto CJK fonts (OpenType with CFF outlines; reportlab
reads TrueType outlines only), so the page uses reportlab's built-in Adobe CID font
``STSong-Light`` (Adobe-GB1, not embedded: every PDF reader ships or substitutes it, and the
text stays extractable). Needs reportlab and segno (runtime dependencies).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final
from xml.sax.saxutils import escape

import segno
from reportlab.graphics.shapes import Drawing, Rect
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from certbroker.evidence import jws
from certbroker.evidence.verify import mask_id

FONT: Final = "STSong-Light"
QR_PREFIX: Final = "CBEV1"
RECORD_TYPES: Final = {
    "household": "户籍",
    "social_security": "社会保险",
    "property": "不动产",
    "marriage": "婚姻",
}
RELATIONS: Final = {
    "applicant": "申请人",
    "spouse": "配偶",
    "co_owner": "共有人",
    "seller": "卖方",
    "buyer": "买方",
    "guardian": "监护人",
    "child": "子女",
    "agent": "代理人",
}
CONSENT: Final = {
    "id_card_read": "现场读取身份证",
    "signed_form": "签署授权书",
    "delegated_agent": "委托代理（授权委托书）",
}
KINDS: Final = {"lookup": "单项调取", "bundle": "事项整体调取", "package": "一件事整体调取"}


def qr_summary(compact: str) -> str:
    """``CBEV1:<evidence id>:<call entry hash>:<kid>:<signature>`` of a compact evidence."""
    envelope = jws.parse(compact)
    sig = compact.rsplit(".", 1)[1]
    p = envelope.payload
    return f"{QR_PREFIX}:{p['evidence_id']}:{p['entry']['entry_hash']}:{envelope.kid}:{sig}"


def qr_payload(compact: str) -> str:
    """What the QR code carries: the whole evidence when one code holds it, else the summary."""
    try:
        segno.make(compact, error="l", micro=False, boost_error=False)
    except segno.DataOverflowError:
        return qr_summary(compact)
    return compact


def qr_matches(qr_text: str, compact: str) -> bool:
    """Whether a scanned QR text is this evidence's (the whole of it, or its summary)."""
    qr_text = qr_text.strip()
    return qr_text == compact.strip() or qr_text == qr_summary(compact)


def _styles() -> dict[str, ParagraphStyle]:
    if FONT not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(UnicodeCIDFont(FONT))
    base = ParagraphStyle("body", fontName=FONT, fontSize=9.5, leading=13, wordWrap="CJK")
    return {
        "title": ParagraphStyle("title", parent=base, fontSize=18, leading=24, alignment=1),
        "h2": ParagraphStyle("h2", parent=base, fontSize=12, leading=17, spaceBefore=6),
        "body": base,
        "small": ParagraphStyle("small", parent=base, fontSize=7.5, leading=10),
    }


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "是" if value else "否"
    if isinstance(value, dict):
        return "；".join(f"{k}：{_text(v)}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "、".join(value)
    return json.dumps(value, ensure_ascii=False)


def _lines(value: Any) -> list[str]:
    """A value as the lines of its table cell: one per item of a list of groups."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [f"{n}. {_text(v)}" for n, v in enumerate(value, 1)]
    return [_text(value)]


def _table(rows: Sequence[list[Any]], widths: Sequence[float], header: bool = False) -> Table:
    table = Table(list(rows), colWidths=list(widths), repeatRows=1 if header else 0)
    style: list[Any] = [
        ("GRID", (0, 0), (-1, -1), 0.5, colors.grey),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("BACKGROUND", (0, 0), (0, -1), colors.whitesmoke),
    ]
    if header:
        style.append(("BACKGROUND", (0, 0), (-1, 0), colors.lightgrey))
    table.setStyle(TableStyle(style))
    return table


def _qr_drawing(payload: str, size_mm: float) -> Drawing:
    """The QR code as vector squares (crisp at any print or render resolution)."""
    code = segno.make(payload, error="l", micro=False, boost_error=False)
    matrix = list(code.matrix)
    quiet = 4
    modules = len(matrix) + 2 * quiet
    unit = size_mm * mm / modules
    drawing = Drawing(size_mm * mm, size_mm * mm)
    for r, row in enumerate(matrix):
        for c, dark in enumerate(row):
            if dark:
                x, y = (c + quiet) * unit, (modules - quiet - r - 1) * unit
                square = Rect(x, y, unit, unit)
                square.fillColor, square.strokeColor = colors.black, None
                drawing.add(square)
    return drawing


def render(compact: str, out: Path) -> str:
    """Write the A4 page(s) of ``compact`` evidence to ``out``; returns the QR payload.

    :class:`jws.MalformedError` if ``compact`` is not evidence (verify it first)."""
    payload = jws.parse(compact).payload
    s = _styles()

    def p(text: str) -> Paragraph:
        return Paragraph(escape(text), s["body"])

    story: list[Any] = [Paragraph("数据调取凭证", s["title"]), Spacer(1, 4 * mm)]
    clerk, matter, consent = payload["clerk"], payload["matter"], payload["consent"]
    method = consent.get("method", "")
    story.append(
        _table(
            [
                [p("办理大厅"), p(clerk.get("office", ""))],
                [p("经办人"), p(f"{clerk.get('name') or ''}（{clerk.get('sub', '')}）")],
                [p("办理事项"), p(f"{matter.get('name', '')}（{matter.get('code', '')}）")],
                [p("调取方式"), p(KINDS.get(payload["kind"], payload["kind"]))],
                [p("办件号"), p(payload["case_number"] or "（无）")],
                [
                    p("授权方式"),
                    p(f"{CONSENT.get(method, method)} {consent.get('reference', '')}".strip()),
                ],
                [p("签发时间"), p(payload["issued_at"])],
                [p("凭证编号"), p(payload["evidence_id"])],
                [p("策略版本"), p(payload["policy_version"][:16])],
            ],
            [32 * mm, 138 * mm],
        )
    )
    for index, item in enumerate(payload["items"], 1):
        rtype = RECORD_TYPES.get(item["record_type"], item["record_type"])
        relation = RELATIONS.get(item["relation"], item["relation"])
        who = mask_id(item["subject_id"]) + (f"（{relation}）" if relation else "")
        story.append(Paragraph(escape(f"记录 {index}：{rtype} — 公民身份号码 {who}"), s["h2"]))
        story.append(
            p(
                f"来源部门：{item['department']}　数据截至：{item['as_of']}　"
                f"规则：{item['rule_id']}　审计条目：第 {item['entry']['sequence']} 条"
            )
        )
        rows: list[list[Any]] = [[p("字段"), p("内容")]]
        rows += [
            [p(name), Paragraph("<br/>".join(map(escape, _lines(value))), s["body"])]
            for name, value in item["content"].items()
        ]
        if item["masked_fields"]:
            rows.append([p("已脱敏字段"), p("、".join(item["masked_fields"]))])
        if item["withheld_fields"]:
            rows.append([p("未提供字段"), p("、".join(item["withheld_fields"]))])
        story.append(_table(rows, [50 * mm, 120 * mm], header=True))
    entry = payload["entry"]
    story.append(Paragraph("审计回执", s["h2"]))
    story.append(
        _table(
            [
                [p("条目序号"), p(str(entry["sequence"]))],
                [p("条目编号"), p(entry["entry_id"])],
                [p("条目哈希"), Paragraph(entry["entry_hash"], s["small"])],
            ],
            [32 * mm, 138 * mm],
        )
    )
    qr = qr_payload(compact)
    whole = qr == compact
    story.append(Spacer(1, 4 * mm))
    story.append(
        _table(
            [
                [
                    _qr_drawing(qr, 75 if whole else 45),
                    p(
                        "扫码核验："
                        + (
                            "二维码内含完整凭证，可离线核验签名与内容。"
                            if whole
                            else "二维码内含凭证编号、审计条目哈希、密钥编号与签名，"
                            "请与电子凭证核对。"
                        )
                        + "　核验命令：certbroker evidence verify"
                    ),
                ]
            ],
            [80 * mm if whole else 50 * mm, 90 * mm if whole else 120 * mm],
        )
    )
    doc = SimpleDocTemplate(
        str(out),
        pagesize=A4,
        leftMargin=20 * mm,
        rightMargin=20 * mm,
        topMargin=18 * mm,
        bottomMargin=18 * mm,
        title="数据调取凭证",
        author="certbroker",
    )
    doc.build(story)
    return qr
