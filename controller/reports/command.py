"""`llmgate usage`: the report, in the format asked for, from the logs of a gateway; or each team's
month-to-date use against its budget."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from controller.model.teams import load_teams
from controller.model.usage_record import Clock, month_start, next_month
from controller.model.yamlpath import ConfigError
from controller.reports.aggregate import (
    GROUP_FIELDS,
    PROGRESS_MIN_BYTES,
    Filters,
    Progress,
    UsageReport,
    log_files,
    parse_day,
    read_logs,
)
from controller.reports.formats import format_csv, format_json, format_table
from controller.reports.html import format_html


def run_usage(args: argparse.Namespace) -> int:
    by = tuple(f.strip() for f in args.by.split(",") if f.strip())
    bad = [f for f in by if f not in GROUP_FIELDS]
    if bad or not by or len(set(by)) != len(by):
        print(f"llmgate: --by: expected a comma-separated list of {', '.join(GROUP_FIELDS)}, got {args.by!r}",
              file=sys.stderr)
        return 2
    try:
        filters = Filters(parse_day(args.since) if args.since else None,
                          parse_day(args.until, end=True) if args.until else None, args.team)
    except ValueError as exc:
        print(f"llmgate: --since/--until: {exc}", file=sys.stderr)
        return 2
    try:
        files = log_files(args.logs or [_default_log_dir(args)])
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        return 2
    if not files:
        print(f"llmgate: no usage.jsonl or access.jsonl logs in {', '.join(args.logs or [_default_log_dir(args)])}",
              file=sys.stderr)
        return 2
    report = UsageReport(by, filters)
    total = sum(p.stat().st_size for p, _ in files)
    progress = Progress(files) if sys.stderr.isatty() and total > PROGRESS_MIN_BYTES else None
    read_logs(report, files, progress)
    if args.budget:
        try:
            text = budget_report(args.teams, files)
        except ConfigError as exc:
            print(f"llmgate: {exc}", file=sys.stderr)
            return 2
    elif args.format == "table":
        text = format_table(report)
    elif args.format == "csv":
        text = format_csv(report)
    elif args.format == "json":
        text = format_json(report)
    else:
        text = format_html(report)
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    else:
        sys.stdout.write(text)
    if report.skipped.total and args.format != "json":
        print(f"llmgate: skipped {report.skipped.total} line(s): {', '.join(report.skipped.examples[:5])}"
              + (" ..." if report.skipped.total > 5 else ""), file=sys.stderr)
    return 0


def budget_report(teams_path: str, files: list[tuple[Path, str]]) -> str:
    """Each team's month-to-date use against its budget (the same sums proxycore enforces)."""
    teams = load_teams(teams_path)
    now = Clock().now()
    start = month_start(now)
    report = UsageReport(("team",), Filters(since=start, until=next_month(now)))
    read_logs(report, [(p, k) for p, k in files if k == "usage"])
    used = {k[0]: g for k, g in report.groups.items()}
    header = ("team", "tokens used", "token budget", "tokens %", "USD used", "USD budget", "USD %")
    rows = []
    for t in teams.teams:
        g = used.get(t.name)
        tokens = g.prompt_tokens + g.completion_tokens if g else 0
        usd = g.cost_usd if g else 0.0
        b = t.budget
        tb = b.tokens_per_month if b else None
        ub = b.usd_per_month if b else None
        rows.append((t.name, f"{tokens:,}", f"{tb:,}" if tb else "-", f"{100 * tokens / tb:.1f}" if tb else "-",
                     f"{usd:,.4f}", f"{ub:,.2f}" if ub else "-", f"{100 * usd / ub:.1f}" if ub else "-"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"month to date: {start:%Y-%m-%d} to {now:%Y-%m-%d %H:%M} UTC; budgets reset on {next_month(now):%Y-%m-%d}")
    return "\n".join(lines) + "\n"


def _default_log_dir(args: argparse.Namespace) -> str:
    teams = getattr(args, "teams", None)
    if teams and os.path.exists(teams):
        try:
            return load_teams(teams).gateway.log_dir
        except ConfigError:  # the report can still run on ./logs
            pass
    return "logs"


