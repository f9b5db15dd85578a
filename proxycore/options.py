"""The options of `llmgate proxy` (`python -m proxycore`): defined here, read by both entry points."""

from __future__ import annotations

import argparse

HELP = "serve proxycore alone, like `litellm --config`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="LiteLLM-compatible config.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4000)
    p.add_argument("--unix", default=None, metavar="PATH", help="listen on this unix socket instead of --host/--port")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port or socket")
    p.add_argument("--usage-log", default=None, help="append one JSON line per request to this file")
    p.add_argument("--usage-spool-lines", type=int, default=100_000, metavar="N",
                   help="usage lines kept in memory while the log cannot be written (a full disk); default 100000")
    p.add_argument("--teams", default=None, help="teams.yaml: per-team model allow-lists (reloaded on change)")
    p.add_argument("--only-team", default=None, help="a dedicated instance: serve this team alone, with its own key")
