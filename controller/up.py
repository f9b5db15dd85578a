"""`llmgate up`: the whole gateway as one supervised tree, with demo backends when no vLLM answers."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from controller.config import ConfigError, ProxyConfig, load_proxy_config
from controller.supervisor import ChildSpec, Supervisor

LLMGATE = [sys.executable, "-m", "controller.cli"]
GENERATED_SECRETS = ("LLMGATE_MASTER_KEY", "LLMGATE_INTERNAL_KEY")


def ensure_secrets(run_dir: Path) -> dict[str, str]:
    """Keys the gateway needs but the operator did not set: generated once, kept in run/secrets.env (0600)."""
    path = run_dir / "secrets.env"
    saved: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            if value:
                saved[name.strip()] = value.strip()
    changed = False
    for name in GENERATED_SECRETS:
        if name not in os.environ and name not in saved:
            saved[name] = "sk-" + secrets.token_urlsafe(32)
            changed = True
    if changed:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in saved.items())
    for name, value in saved.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in GENERATED_SECRETS}


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def demo_backends(config: ProxyConfig) -> dict[int, list[str]]:
    """Loopback ports in config.yaml where nothing listens: port -> upstream model ids to serve there."""
    wanted: dict[int, list[str]] = {}
    for d in config.deployments:
        url = urlsplit(d.api_base)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        if url.scheme != "http" or not _is_loopback(host) or _answers(host, port):
            continue
        models = wanted.setdefault(port, [])
        if d.upstream_model not in models:
            models.append(d.upstream_model)
    return wanted


async def _run(args: argparse.Namespace, config: ProxyConfig, keys: dict[str, str]) -> int:
    sup = Supervisor()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: sup.signal_all(signal.SIGUSR1))
    try:
        demo = demo_backends(config) if args.demo != "never" else {}
        for port, models in sorted(demo.items()):
            argv = [*LLMGATE, "fake-vllm", "--port", str(port), "--chunk-delay-ms", "20"]
            for m in models:
                argv += ["--model", m]
            await sup.add(ChildSpec(f"fake-vllm:{port}", argv, ready=r"listening on"))
        proxy = [*LLMGATE, "proxy", "--config", args.config, "--host", args.host, "--port", str(args.port),
                 "--workers", str(args.workers)]
        if args.usage_log:
            proxy += ["--usage-log", args.usage_log]
        await sup.add(ChildSpec("proxy", proxy, ready=r"listening on"))
    except RuntimeError as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        await sup.stop()
        return 1
    _banner(config, args, keys, sorted(demo))
    await stop.wait()
    print("llmgate: stopping", flush=True)
    await sup.stop()
    return 0


def _banner(config: ProxyConfig, args: argparse.Namespace, keys: dict[str, str], demo_ports: list[int]) -> None:
    base = f"http://{args.host}:{args.port}"
    model = config.model_names()[0]
    key = config.master_key or "none"
    lines = [f"llmgate is up on {base} (models: {', '.join(config.model_names())})"]
    if demo_ports:
        lines.append(f"no vLLM answered on port(s) {', '.join(map(str, demo_ports))}: serving the built-in demo backend there")
    lines += [
        "try:",
        f"  curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {key}' \\",
        f"       -H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


def run_up(args: argparse.Namespace) -> int:
    keys = ensure_secrets(Path(args.run_dir))
    try:
        config = load_proxy_config(args.config)
    except ConfigError as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        return 2
    import uvloop

    return uvloop.run(_run(args, config, keys))
