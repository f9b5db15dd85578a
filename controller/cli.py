"""The `llmgate` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys


def _add_fake_vllm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fake-vllm", help="run a fake vLLM OpenAI-compatible server (tests, demo, benchmarks)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help="served model name (repeatable); default: llama-3.1-8b-instruct")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before the response starts")
    p.add_argument("--stream-chunks", type=int, default=8, help="content chunks per streamed response")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between streamed chunks")
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction of requests answered with a 500")
    p.add_argument("--seed", type=int, default=None, help="seed for --fail-rate decisions")
    p.add_argument("--api-key", default=None, help="require this bearer key, like `vllm serve --api-key`")


def _add_proxy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proxy", help="serve proxycore alone, like `litellm --config`")
    p.add_argument("--config", required=True, help="LiteLLM-compatible config.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4000)
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--usage-log", default=None, help="append one JSON line per request to this file")
    p.add_argument("--teams", default=None, help="teams.yaml: per-team model allow-lists (reloaded on change)")
    p.add_argument("--only-team", default=None, help="a dedicated instance: serve this team alone, with its own key")


def _add_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="config.yaml", help="LiteLLM-compatible config.yaml")
    p.add_argument("--teams", default="teams.yaml", help="teams, keys and gateway settings")
    p.add_argument("--run-dir", default="run", help="runtime files: generated secrets, rendered nginx config")


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run the whole gateway, supervised (demo backends when no vLLM answers)")
    _add_files(p)
    p.add_argument("--demo", choices=("auto", "never"), default="auto",
                   help="auto: start fake-vllm on loopback api_base ports where nothing listens")


def _add_operate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate both files and run `nginx -t` on the rendered result")
    _add_files(p)
    p = sub.add_parser("render", help="write the nginx config for a prefix directory")
    _add_files(p)
    p.add_argument("--out", required=True, help="the nginx prefix directory to write into")
    p = sub.add_parser("reload", help="apply changed files to a running `llmgate up`, verified")
    _add_files(p)


def _add_auth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("auth", help="serve authsvc: nginx's auth_request endpoint for team keys")
    p.add_argument("--teams", default="teams.yaml")
    p.add_argument("--config", default=None, help="config.yaml, for general_settings.database_url (DB mode)")
    p.add_argument("--host", default=None, help="default: gateway.auth_listen of teams.yaml")
    p.add_argument("--port", type=int, default=None)


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "fake-vllm":
        from controller.fake_vllm import run_fake_vllm

        return run_fake_vllm(args)
    if args.command == "proxy":
        from proxycore.serve import run_proxy

        return run_proxy(args)
    if args.command == "up":
        from controller.up import run_up

        return run_up(args)
    if args.command in ("check", "render", "reload"):
        from controller import operate

        return getattr(operate, f"run_{args.command}")(args)
    if args.command == "usage":
        from controller.usage import run_usage

        return run_usage(args)
    if args.command == "certs":
        from controller.certs import run_certs

        return run_certs(args)
    if args.command == "sidecar":
        from controller.sidecar import run_sidecar

        return run_sidecar(args)
    if args.command == "auth":
        from authsvc.server import run_authsvc

        return run_authsvc(args)
    if args.command == "key":
        from controller.keys import run_key

        return run_key(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
