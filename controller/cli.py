"""The `llmgate` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys

from authsvc import options as authsvc_options
from proxycore import options as proxycore_options


def _add_fake_vllm(sub: argparse._SubParsersAction) -> None:
    # The fake is a program of its own (python -m fakevllm): its options are its own, and no product code imports it.
    p = sub.add_parser("fake-vllm", add_help=False, prefix_chars="\0",
                       help="run a fake vLLM OpenAI-compatible server (tests, demo, benchmarks); --help for its options")
    p.add_argument("program_args", nargs=argparse.REMAINDER)


def _add_proxy(sub: argparse._SubParsersAction) -> None:
    proxycore_options.add_arguments(sub.add_parser("proxy", help=proxycore_options.HELP))


def _add_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="config.yaml", help="LiteLLM-compatible config.yaml")
    p.add_argument("--teams", default="teams.yaml", help="teams, keys and gateway settings")
    p.add_argument("--run-dir", default="run", help="runtime files: generated secrets, rendered nginx config")


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run the whole gateway, supervised")
    _add_files(p)
    p.add_argument("--demo", action="store_true",
                   help="start the demo backend (fake-vllm) on loopback api_base ports where nothing listens")


def _add_operate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate both files and run `nginx -t` on the rendered result")
    _add_files(p)
    p = sub.add_parser("render", help="write the nginx config for a prefix directory")
    _add_files(p)
    p.add_argument("--out", required=True, help="the nginx prefix directory to write into")
    p = sub.add_parser("reload", help="apply changed files to a running `llmgate up`, verified")
    _add_files(p)


def _add_auth(sub: argparse._SubParsersAction) -> None:
    authsvc_options.add_arguments(sub.add_parser("auth", help=authsvc_options.HELP))


def _add_key(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("key", help="create or revoke team keys (only their sha256 is written)")
    ksub = p.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    new = ksub.add_parser("new", help="create a key for a team; prints it once")
    new.add_argument("--team", required=True)
    new.add_argument("--teams", default="teams.yaml")
    new.add_argument("--name", default=None, help="a label shown as key_id in logs")
    revoke = ksub.add_parser("revoke", help="remove a key from teams.yaml")
    revoke.add_argument("--teams", default="teams.yaml")
    revoke.add_argument("--team", default=None, help="only look in this team")
    revoke.add_argument("which", help="the key itself, its sha256, a hash prefix of 12+ hex digits, or its name")


def _add_usage(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("usage", help="usage per team, model, day and key, from the logs")
    p.add_argument("--logs", action="append", metavar="DIR_OR_FILE",
                   help="log directory or file (repeatable); default: log_dir of --teams, else ./logs")
    p.add_argument("--teams", default="teams.yaml", help="for the default log directory and --budget")
    p.add_argument("--since", help="first day (YYYY-MM-DD) or timestamp, inclusive")
    p.add_argument("--until", help="last day (YYYY-MM-DD, inclusive) or timestamp (exclusive)")
    p.add_argument("--team", help="only this team")
    p.add_argument("--by", default="team,model,day", help="group by any of team,model,day,key")
    p.add_argument("--format", choices=("table", "csv", "json", "html"), default="table")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--budget", action="store_true", help="each team's month-to-date use against its budget")


def _add_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="make certificates for development (a local CA and certificates it signs)")
    p.add_argument("--self-signed", nargs="+", metavar="DOMAIN", required=True,
                   help="domains to put in the certificate")
    p.add_argument("--out", default="certs", help="directory for ca.pem, <domain>.pem and <domain>.key")
    p.add_argument("--days", type=int, default=825)


def _add_sidecar(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sidecar", help="render, watch and reload an nginx that runs elsewhere (docker compose)")
    _add_files(p)
    p.add_argument("--nginx-prefix", required=True, help="the rendered-config directory nginx reads (a shared volume)")
    p.add_argument("--nginx-pid-file", required=True, help="nginx's pid file (a shared PID namespace)")
    p.add_argument("--js-module", default=None, help="ngx_http_js_module.so as nginx sees it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_fake_vllm(sub)
    _add_proxy(sub)
    _add_up(sub)
    _add_operate(sub)
    _add_usage(sub)
    _add_certs(sub)
    _add_sidecar(sub)
    _add_auth(sub)
    _add_key(sub)
    return parser


PROGRAMS = {"proxy": "proxycore", "auth": "authsvc", "fake-vllm": "fakevllm"}  # processes of their own


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(raw)
    if args.command in PROGRAMS:
        # proxycore, authsvc and the fake run as programs of their own: the same process, now theirs
        rest = raw[raw.index(args.command) + 1:]
        os.execv(sys.executable, [sys.executable, "-m", PROGRAMS[args.command], *rest])
    # The controller's own commands are imported when used: `llmgate key new` need not load aiohttp.
    if args.command == "up":
        from controller.ops.up import run_up

        return run_up(args)
    if args.command in ("check", "render", "reload"):
        from controller.ops import commands

        return getattr(commands, f"run_{args.command}")(args)
    if args.command == "usage":
        from controller.reports.command import run_usage

        return run_usage(args)
    if args.command == "certs":
        from controller.ops.certs import run_certs

        return run_certs(args)
    if args.command == "sidecar":
        from controller.ops.sidecar import run_sidecar

        return run_sidecar(args)
    if args.command == "key":
        from controller.ops.keys import run_key

        return run_key(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
