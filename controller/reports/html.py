"""The HTML usage report: one self-contained page (inline SVG chart, no scripts, no network)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from html import escape

from controller.reports.aggregate import UsageReport
from controller.reports.formats import COLUMNS, cell

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569", "#ea580c")
CHART_W, CHART_H, PAD_L, PAD_B, PAD_T = 900, 320, 70, 60, 20


def tokens_per_day_per_team(report: UsageReport) -> dict[str, dict[str, int]]:
    """day -> team -> total tokens, summed over whatever else the report groups by."""
    if "day" not in report.by:
        return {}
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in report.rows():
        team = row.get("team") or "(no key)"
        out[row["day"]][team if "team" in report.by else "all teams"] += row["total_tokens"]
    return out


def chart_svg(per_day: dict[str, dict[str, int]]) -> str:
    days = sorted(per_day)
    if not days:
        return '<p class="empty">No tokens per day to chart (group by day to see one).</p>'
    teams = sorted({t for d in days for t in per_day[d]})
    colour = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(teams)}
    peak = max(sum(per_day[d].values()) for d in days) or 1
    plot_w, plot_h = CHART_W - PAD_L - 20, CHART_H - PAD_B - PAD_T
    slot = plot_w / len(days)
    bar_w = min(80.0, max(4.0, slot * 0.7))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
             f'viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="tokens per day per team">',
             f'<line x1="{PAD_L}" y1="{PAD_T + plot_h}" x2="{PAD_L + plot_w}" y2="{PAD_T + plot_h}" stroke="#333"/>',
             f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + plot_h}" stroke="#333"/>']
    for i in range(5):
        value = peak * i / 4
        y = PAD_T + plot_h - plot_h * i / 4
        parts.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{value:,.0f}</text>')
        parts.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{PAD_L + plot_w}" y2="{y:.1f}" stroke="#ddd"/>')
    for i, day in enumerate(days):
        x = PAD_L + slot * i + (slot - bar_w) / 2
        y = PAD_T + plot_h
        for team in teams:
            tokens = per_day[day].get(team, 0)
            h = plot_h * tokens / peak
            if h <= 0:
                continue
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{colour[team]}">'
                         f'<title>{escape(day)} {escape(team)}: {tokens:,} tokens</title></rect>')
        parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{PAD_T + plot_h + 16}" text-anchor="middle" font-size="11">'
                     f'{escape(day[5:])}</text>')
    for i, team in enumerate(teams):
        lx = PAD_L + (i % 6) * 140
        ly = CHART_H - 22 + (i // 6) * 14
        parts.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{colour[team]}"/>'
                     f'<text x="{lx + 14}" y="{ly}" font-size="11">{escape(team)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def format_html(report: UsageReport) -> str:
    header = [*report.by, *COLUMNS]
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in report.rows():
        cells = []
        for c in header:
            v = row.get(c)
            text = "(no key)" if v is None and c in ("team", "key") else cell(v)
            cells.append(f'<td class="{"n" if c in COLUMNS else "k"}">{escape(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    total_tokens = sum(r["total_tokens"] for r in report.rows())
    total_cost = sum(r["cost_usd"] for r in report.rows())
    total_requests = sum(r["requests"] for r in report.rows())
    f = report.filters
    period = f"{f.since.date() if f.since else 'start of logs'} to {f.until.date() if f.until else 'end of logs'}"
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llmgate usage report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #111; }}
h1 {{ font-size: 1.4rem; }} .meta {{ color: #555; }}
.totals span {{ display: inline-block; margin-right: 2rem; font-size: 1.1rem; }}
table {{ border-collapse: collapse; margin-top: 1rem; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; }} th {{ background: #f3f4f6; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
</style></head><body>
<h1>llmgate usage report</h1>
<p class="meta">Period: {escape(period)}{f" &middot; team {escape(f.team)}" if f.team else ""} &middot; grouped by {escape(", ".join(report.by))} &middot; generated {generated} &middot; {report.lines:,} log lines, {report.skipped.total} skipped</p>
<p class="totals"><span>Requests: <b>{total_requests:,}</b></span><span>Tokens: <b>{total_tokens:,}</b></span><span>Cost: <b>${total_cost:,.2f}</b></span></p>
<h2>Tokens per day per team</h2>
{chart_svg(tokens_per_day_per_team(report))}
<h2>Usage</h2>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
</body></html>
"""
