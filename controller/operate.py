"""`llmgate check`, `llmgate render` and `llmgate reload`: the edge pipeline on demand."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from controller.edge import CheckError, EdgeReloader, RunLayout, write_rendered
from controller.render import RenderError
from controller.up import ensure_secrets, record_reload
from controller.yamlpath import ConfigError


def _reloader(args: argparse.Namespace, nginx_pid=None) -> EdgeReloader:
    layout = RunLayout(Path(args.run_dir).resolve())
    ensure_secrets(layout.run_dir)
    return EdgeReloader(layout, args.config, args.teams, _internal_key(args), nginx_pid=nginx_pid)


def _internal_key(args: argparse.Namespace) -> str:
    from controller.teams import load_teams

    try:
        configured = load_teams(args.teams).gateway.internal_key
    except ConfigError:
        configured = None  # the caller's own load reports the problem
    return configured or os.environ["LLMGATE_INTERNAL_KEY"]


def run_check(args: argparse.Namespace) -> int:
    try:
        cfg, _ = _reloader(args).check()
    except (ConfigError, RenderError, CheckError) as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        return 2
    teams = cfg.teams
    print(f"ok: {args.config} ({len(cfg.proxy.deployments)} deployments, models: {', '.join(cfg.proxy.model_names())}); "
          f"{args.teams} ({len(teams.teams)} teams, {sum(len(t.keys) for t in teams.teams)} keys, "
          f"key_lookup: {teams.gateway.key_lookup}); nginx -t passed")
    for warning in cfg.proxy.warnings:
        print(f"warning: {warning}")
    return 0


def run_render(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    reloader = _reloader(args)
    try:
        cfg, rendered = reloader.load_and_render(out)
    except (ConfigError, RenderError) as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        return 2
    reloader.layout.prepare(out, cfg.teams.gateway.log_dir)
    write_rendered(rendered, out)
    print(f"wrote {', '.join(sorted(rendered.files))} to {out} (checksum {rendered.checksum[:12]})")
    return 0


def live_checksum_of(args: argparse.Namespace) -> str | None:
    """What the running nginx serves, as far as its files say (a separate process has no memory of it)."""
    from controller.edge import live_checksum
    from controller.teams import load_teams

    try:
        return live_checksum(load_teams(args.teams).gateway.listen)
    except ConfigError:
        return None


def run_reload(args: argparse.Namespace) -> int:
    layout = RunLayout(Path(args.run_dir).resolve())
    pid_file = layout.nginx_prefix / "nginx.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        print(f"llmgate: no running gateway: {pid_file} is missing; start one with `llmgate up`", file=sys.stderr)
        return 1
    metrics = layout.metrics_dir
    if metrics.is_dir():
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(metrics))
    reloader = _reloader(args, nginx_pid=pid)
    reloader.applied_checksum = live_checksum_of(args)
    result = reloader.apply()
    if metrics.is_dir():
        record_reload(result)
    print(f"llmgate: reload: {result.status}: {result.message}", file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1
