"""`llmgate check`, `llmgate render` and `llmgate reload`: the edge pipeline on demand."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from controller.edge.nginx import CheckError, EdgeReloader, RunLayout, live_checksum, write_rendered
from controller.edge.render import RenderError
from controller.model.gateway import internal_key
from controller.model.teams import load_teams
from controller.model.yamlpath import ConfigError
from controller.ops.secrets import ensure_secrets
from controller.ops.up import record_reload


def _reloader(args: argparse.Namespace, nginx_pid: int | None = None) -> EdgeReloader:
    layout = RunLayout(Path(args.run_dir).resolve())
    ensure_secrets(layout.run_dir)
    try:
        key = internal_key(load_teams(args.teams))
    except ConfigError:
        key = internal_key(None)  # the caller's own load reports the file's problem
    assert key is not None  # ensure_secrets put one in the environment
    return EdgeReloader(layout, args.config, args.teams, key, nginx_pid=nginx_pid)


def run_check(args: argparse.Namespace) -> int:
    reloader = _reloader(args)
    try:
        cfg = reloader.load()
        reloader.check(cfg)
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
        cfg = reloader.load()
        rendered = reloader.render(cfg, out)
    except (ConfigError, RenderError) as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        return 2
    reloader.layout.prepare(out, cfg.teams.gateway.log_dir)
    write_rendered(rendered, out)
    print(f"wrote {', '.join(sorted(rendered.files))} to {out} (checksum {rendered.checksum[:12]})")
    return 0


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
    try:  # what the running nginx serves, as far as its files say (this process has no memory of it)
        reloader.applied_checksum = live_checksum(load_teams(args.teams).gateway.listen)
    except ConfigError:
        pass
    result = reloader.load_and_apply()
    if metrics.is_dir():
        record_reload(result)
    print(f"llmgate: reload: {result.status}: {result.message}", file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1
