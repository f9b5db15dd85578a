"""What the tests share: real processes on loopback started through the real `llmgate` CLI and stopped by PID,
plain HTTP, config files, gateways, databases, and an admin app served in a thread."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiohttp import web

from authsvc.admin import register_admin_routes
from authsvc.keydb.store import Store
from authsvc.ui import register_ui_routes

ROOT = Path(__file__).resolve().parent.parent
LLMGATE = [sys.executable, "-m", "controller.cli"]
MASTER_KEY = "sk-test-master-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A child process whose output is collected; ready once a line matches `ready`."""

    def __init__(self, args: list[str], ready: str, env: dict[str, str] | None = None, timeout: float = 15.0,
                 cwd: Path = ROOT):
        self.args = args
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._pattern = re.compile(ready)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, cwd=cwd, bufsize=1)
        self.pid = self.proc.pid
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"{args} did not become ready in {timeout}s; output:\n{self.output}")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self._pattern.search(line):
                self._ready.set()
        self._ready.set()  # exited: let the waiter see the output

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            return self.proc.wait()


def start_fake_vllm(spawn, *extra: str, model: str = "llama-3.1-8b-instruct", port: int | None = None) -> tuple[Service, str]:
    """A fake vLLM server; returns it and its base URL (with /v1)."""
    port = port or free_port()
    svc = spawn([*LLMGATE, "fake-vllm", "--port", str(port), "--model", model, *extra], r"listening on")
    return svc, f"http://127.0.0.1:{port}/v1"


def write_config(path: Path, deployments: list[dict], router: dict | None = None, general: dict | None = None) -> Path:
    """A LiteLLM-style config.yaml from deployment dicts {model_name, api_base, model?, ...params}."""
    import yaml

    model_list = []
    for d in deployments:
        d = dict(d)
        entry = {"model_name": d.pop("model_name")}
        info = d.pop("model_info", None)
        params = {"model": d.pop("model", "hosted_vllm/llama-3.1-8b-instruct"), "api_key": d.pop("api_key", "")}
        params.update(d)
        entry["litellm_params"] = params
        if info:
            entry["model_info"] = info
        model_list.append(entry)
    doc: dict = {"model_list": model_list, "general_settings": {"master_key": MASTER_KEY, **(general or {})}}
    if router:
        doc["router_settings"] = router
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_proxy(spawn, config: Path, *extra: str, env: dict[str, str] | None = None,
                port: int | None = None) -> tuple[Service, str]:
    """`llmgate proxy`; returns it and its base URL (without /v1)."""
    port = port or free_port()
    svc = spawn([*LLMGATE, "proxy", "--config", str(config), "--port", str(port), *extra], r"listening on", env=env)
    if svc.proc.poll() is not None:
        raise RuntimeError(f"proxy exited: {svc.output}")
    return svc, f"http://127.0.0.1:{port}"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class HttpResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        import json

        return json.loads(self.body)


def http(method: str, url: str, body: bytes | dict | list | None = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> HttpResponse:
    """One plain HTTP request over loopback (urllib), any status returned rather than raised."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return HttpResponse(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return HttpResponse(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def read_then_hang_up(base: str, path: str, body: dict, headers: dict[str, str], events: int) -> None:
    """A client that POSTs a streamed request, reads `events` SSE data events and closes the connection."""
    import json

    payload = json.dumps(body).encode()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
                  f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        seen = b""
        while seen.count(b"data: ") < events:
            piece = s.recv(65536)
            if not piece:
                raise AssertionError(f"the stream ended after {seen.count(b'data: ')} events: {seen[-500:]!r}")
            seen += piece


class Gateway:
    """A running `llmgate up` in a temporary directory, with its files and addresses."""

    def __init__(self, svc: Service, dir: Path, port: int, proxy_port: int, auth_port: int):
        self.svc, self.dir, self.port, self.proxy_port, self.auth_port = svc, dir, port, proxy_port, auth_port
        self.base = f"http://127.0.0.1:{port}"
        self.config = dir / "config.yaml"
        self.teams = dir / "teams.yaml"
        self.run_dir = dir / "run"
        self.log_dir = dir / "logs"

    def write_teams(self, text: str) -> None:
        """Replace teams.yaml the way editors do: write a temp file, then rename over it."""
        tmp = self.dir / ".teams.yaml.swp"
        tmp.write_text(text)
        tmp.replace(self.teams)

    def checksum(self) -> str:
        return http("GET", self.base + "/-/config-hash").text.strip()

    def reloads(self) -> list[str]:
        return [line for line in self.svc.lines if "llmgate: reload" in line]


def teams_yaml(port: int, proxy_port: int, auth_port: int, lookup: str, teams: str, extra: str = "",
               log_dir: str = "logs") -> str:
    return (f"gateway:\n  listen: 127.0.0.1:{port}\n  proxy_listen: 127.0.0.1:{proxy_port}\n"
            f"  auth_listen: 127.0.0.1:{auth_port}\n  key_lookup: {lookup}\n  log_dir: {log_dir}\n  nginx_workers: 2\n{extra}"
            f"teams:\n{teams}")


def start_gateway(spawn, tmp_path: Path, teams: str, lookup: str = "map", deployments: list[dict] | None = None,
                  extra: str = "", env: dict[str, str] | None = None) -> Gateway:
    """`llmgate up` on its own ports; `teams` is the YAML under `teams:` (indented two spaces)."""
    port, proxy_port, auth_port = free_port(), free_port(), free_port()
    if deployments is None:
        _, api_base = start_fake_vllm(spawn)
        deployments = [{"model_name": "llama-3.1-8b-instruct", "api_base": api_base}]
    write_config(tmp_path / "config.yaml", deployments)
    (tmp_path / "teams.yaml").write_text(teams_yaml(port, proxy_port, auth_port, lookup, teams, extra))
    return Gateway(launch_gateway(spawn, tmp_path, env), tmp_path, port, proxy_port, auth_port)


def launch_gateway(spawn, directory: Path, env: dict[str, str] | None = None) -> Service:
    """`llmgate up` on the config.yaml and teams.yaml in `directory` (also to restart a stopped one)."""
    svc = spawn([*LLMGATE, "up", "--config", str(directory / "config.yaml"), "--teams", str(directory / "teams.yaml"),
                 "--run-dir", str(directory / "run")],
                r"^llmgate is up|^llmgate: ", env=env, timeout=30)
    if not any("llmgate is up" in line for line in svc.lines):
        raise RuntimeError(f"llmgate up failed:\n{svc.output}")
    return svc


DB_GATEWAY_STATIC_KEY = "sk-db-mode-static-team-key-0123"


def gateway_with_db(spawn, tmp_path: Path, url: str, name: str = "gw") -> Gateway:
    """`llmgate up` in DB mode (`database_url`), with models llama-3.1-8b-instruct (priced) and other, and one
    static team key, DB_GATEWAY_STATIC_KEY."""
    _, llama = start_fake_vllm(spawn)
    _, other = start_fake_vllm(spawn, model="other")
    directory = tmp_path / name
    directory.mkdir()
    teams = f"  static-team:\n    keys: [sha256:{sha256_hex(DB_GATEWAY_STATIC_KEY)}]\n"
    deployments = [
        {"model_name": "llama-3.1-8b-instruct", "api_base": llama,
         "model_info": {"input_cost_per_token": 0.01, "output_cost_per_token": 0.01}},
        {"model_name": "other", "api_base": other, "model": "hosted_vllm/other"}]
    gw = start_gateway(spawn, directory, teams, deployments=deployments)
    # the same gateway, now with the key database: restart it on the new config
    write_config(gw.config, deployments, general={"database_url": url})
    gw.svc.stop()
    gw.svc = launch_gateway(spawn, directory)
    return gw


def sha256_hex(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def screenshot(html_path: Path, png_path: Path, width: int = 1200, height: int = 900) -> Path:
    """A headless Chromium screenshot of a local page (Debian's chromium; no network, no sandbox as root)."""
    profile = png_path.parent / f".chromium-{png_path.stem}"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png_path}",
           html_path.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    if not png_path.exists():
        raise RuntimeError(f"chromium made no screenshot: {' '.join(cmd)}")
    return png_path


def colour_share(png_path: Path, rgb: tuple[int, int, int], tolerance: int = 12) -> float:
    """The share of pixels within `tolerance` of a colour."""
    from PIL import Image

    img = Image.open(png_path).convert("RGB")
    data = img.tobytes()
    hits = sum(1 for i in range(0, len(data), 3)
               if abs(data[i] - rgb[0]) <= tolerance and abs(data[i + 1] - rgb[1]) <= tolerance
               and abs(data[i + 2] - rgb[2]) <= tolerance)
    return hits / (len(data) // 3)


# ---------------------------------------------------------------- databases

PG_URL = os.environ.get("LLMGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _with_params(url: str, **params: str) -> str:
    from urllib.parse import quote

    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    return url + ("&" if "?" in url else "?") + query


@contextmanager
def postgres_schema() -> Iterator[tuple[str, str]]:
    """(URL, schema): a fresh schema on the test server, selected by search_path; dropped at the end."""
    import psycopg

    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL}: {str(exc).strip()}\n"
                    "These tests need it: start PostgreSQL (CI provides one) or set LLMGATE_TEST_POSTGRES_URL.")
    schema = f"llmgate_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield _with_params(PG_URL, options=f"-csearch_path={schema}", application_name=schema), schema
    finally:
        # a fresh connection: the server may have restarted during the test
        with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                          "AND pid <> pg_backend_pid()", (schema,))
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database of the given kind."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'llmgate.db'}"
    else:
        with postgres_schema() as (url, _schema):
            yield url


# ---------------------------------------------------------------- the admin API in a thread

MASTER = "sk-master-5f0c2e9a7b41d3"


@contextmanager
def serve(app: web.Application) -> Iterator[str]:
    """Run an aiohttp app on a loopback port in a thread of its own; yields its base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def admin_app(store: Store | None, master: str | None = MASTER) -> web.Application:
    """The admin API and /ui over `store` (None: no database), as authsvc mounts them."""
    app = web.Application()
    register_admin_routes(app, lambda: store, lambda: master)
    register_ui_routes(app)
    return app
