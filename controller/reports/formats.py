"""`llmgate usage`'s text formats: an aligned table, CSV and JSON (the HTML page is in html.py)."""

from __future__ import annotations

import csv
import io

import orjson

from controller.reports.aggregate import UsageReport

COLUMNS = ("requests", "ok", "rate_limited", "quota_exceeded", "unauthorized", "forbidden", "client_errors",
           "server_errors", "prompt_tokens", "completion_tokens", "total_tokens", "estimated_tokens",
           "cost_usd", "p50_ms", "p95_ms", "ttft_p50_ms")


def cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.6f}".rstrip("0").rstrip(".") if abs(v) < 1 else f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_table(report: UsageReport) -> str:
    header = [*report.by, *COLUMNS]
    rows = [[cell(r.get(c)) if c in COLUMNS else ("(no key)" if r[c] is None and c in ("team", "key") else cell(r[c]))
             for c in header] for r in report.rows()]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i < len(report.by) else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for row in rows:
        lines.append("  ".join(v.ljust(w) if i < len(report.by) else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    lines.append(f"{len(rows)} groups from {report.lines:,} lines; {report.skipped.total} skipped "
                 f"({report.skipped.partial} partial, {report.skipped.malformed} malformed)")
    return "\n".join(lines) + "\n"


def format_csv(report: UsageReport) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*report.by, *COLUMNS])
    for r in report.rows():
        w.writerow(["" if r[c] is None else r[c] for c in (*report.by, *COLUMNS)])
    return buf.getvalue()


def format_json(report: UsageReport) -> str:
    return orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode() + "\n"


