"""The options of `llmgate auth` (`python -m authsvc`): defined here, read by both entry points."""

from __future__ import annotations

import argparse

HELP = "serve authsvc: nginx's auth_request endpoint for keys (and, in DB mode, the admin API and /ui)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teams", default="teams.yaml")
    p.add_argument("--config", default=None, help="config.yaml: the master key, and database_url (DB mode)")
    p.add_argument("--host", default=None, help="default: gateway.auth_listen of teams.yaml, else 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: gateway.auth_listen of teams.yaml, else 4002")
    p.add_argument("--unix", default=None, metavar="PATH", help="listen on this unix socket instead")
