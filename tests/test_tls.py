"""TLS: `llmgate certs`, per-domain certificates at the nginx edge, and proxycore's `ssl_verify` towards backends.

Names resolve to 127.0.0.1 without /etc/hosts: the OpenAI SDK gets an httpx2 transport that dials loopback while
the URL, the Host header, SNI and the certificate check keep the real name; the tests of the setups docs/tls.md
shows patch name resolution in this process instead; curl gets `--resolve`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import httpx2
import openai
import pytest
import yaml
from aiohttp import web

from support import LLMGATE, MASTER_KEY, ROOT, free_port, http, sha256_hex, start_gateway, start_proxy, write_config

DOMAIN = "team-a.llm.test"
SHARED = "llm.test"
KEY_A = "sk-tls-team-a-0123456789"
KEY_B = "sk-tls-team-b-0123456789"
TEAMS = f"""  team-a:
    keys: [sha256:{sha256_hex(KEY_A)}]
    domains: [{DOMAIN}]
  team-b:
    keys: [sha256:{sha256_hex(KEY_B)}]
"""
CHAT = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def certs(out: Path, *domains: str, days: str | None = None) -> subprocess.CompletedProcess:
    """The real `llmgate certs --self-signed` CLI."""
    args = [*LLMGATE, "certs", "--self-signed", *domains, "--out", str(out)] + (["--days", days] if days else [])
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=60)


class LoopbackTransport(httpx2.HTTPTransport):
    """Dials 127.0.0.1 for every URL; TLS still sends and verifies the URL's host name (httpcore's sni_hostname)."""

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        request.extensions["sni_hostname"] = request.url.host  # the Host header was set from the URL already
        request.url = request.url.copy_with(host="127.0.0.1")
        return super().handle_request(request)


def sdk(port: int, key: str, ca: Path | None, host: str = DOMAIN) -> openai.OpenAI:
    """The official SDK on https://HOST:PORT/v1, trusting `ca` (or only the system's CAs when None)."""
    verify = ssl.create_default_context(cafile=str(ca)) if ca else True
    client = openai.DefaultHttpxClient(transport=LoopbackTransport(verify=verify))
    return openai.OpenAI(base_url=f"https://{host}:{port}/v1", api_key=key, max_retries=0, http_client=client)


def handshake(port: int, server_name: str | None, ca: Path) -> str:
    """A bare TLS handshake to 127.0.0.1:PORT; returns the name in the certificate nginx chose."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False  # what nginx sends is the question here, not whether it matches
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            cert = tls.getpeercert()
            return dict(x[0] for x in cert["subject"])["commonName"]


@pytest.fixture(autouse=True)
def _no_ca_or_proxy_from_env(monkeypatch):
    """Trust comes only from what a test passes: SSL_CERT_FILE/DIR change Python's and the SDK's defaults."""
    for var in ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------- llmgate certs

def test_certs_makes_a_ca_and_a_certificate_it_signs(tmp_path):
    out = tmp_path / "certs"
    r = certs(out, DOMAIN, "127.0.0.1", "localhost")
    assert r.returncode == 0, r.stderr
    for name in ("ca.pem", "ca.key", f"{DOMAIN}.pem", f"{DOMAIN}.key"):
        assert (out / name).is_file(), r.stdout
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / f"{DOMAIN}.key").stat().st_mode) == 0o600

    from cryptography import x509

    leaf = x509.load_pem_x509_certificate((out / f"{DOMAIN}.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DOMAIN, "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert leaf.issuer == ca.subject and leaf.issuer != leaf.subject
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days in (825, 826)

    # what it prints: the files, a teams.yaml snippet that loads, and how to trust the CA
    assert str((out / f"{DOMAIN}.pem").resolve()) in r.stdout and "mode 0600" in r.stdout
    snippet = r.stdout[r.stdout.index("gateway:"):r.stdout.index("\n\n", r.stdout.index("gateway:"))]
    tls = yaml.safe_load(snippet)["gateway"]["tls"]
    assert tls["certificates"] == [{"domains": [DOMAIN], "cert": str((out / f"{DOMAIN}.pem").resolve()),
                                    "key": str((out / f"{DOMAIN}.key").resolve())}]
    assert f"SSL_CERT_FILE={(out / 'ca.pem').resolve()}" in r.stdout
    assert "openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=" in r.stdout


def test_certs_reuses_the_ca(tmp_path):
    out = tmp_path / "certs"
    assert certs(out, DOMAIN).returncode == 0
    ca_before, ca_key_before = (out / "ca.pem").read_bytes(), (out / "ca.key").read_bytes()
    leaf_before = (out / f"{DOMAIN}.pem").read_bytes()
    r = certs(out, DOMAIN, "team-b.llm.test", days="30")
    assert r.returncode == 0, r.stderr
    assert "kept" in r.stdout and "reused" in r.stdout
    assert (out / "ca.pem").read_bytes() == ca_before and (out / "ca.key").read_bytes() == ca_key_before
    assert (out / f"{DOMAIN}.pem").read_bytes() != leaf_before  # a fresh certificate, signed by the same CA

    from cryptography import x509

    leaf = x509.load_pem_x509_certificate((out / f"{DOMAIN}.pem").read_bytes())
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_before))
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days in (30, 31)


@pytest.mark.parametrize("bad", ["a;b.llm.test", "nodots", "a..llm.test", "x-.llm.test", "a b.llm.test",
                                 "x.llm.test;\n}", "*.llm.test", "a" * 64 + ".llm.test"])
def test_certs_refuses_bad_names(tmp_path, bad):
    r = certs(tmp_path / "certs", DOMAIN, bad)
    assert r.returncode == 2
    assert "expected a domain name" in r.stderr and repr(bad) in r.stderr
    assert not (tmp_path / "certs").exists()


def test_certs_refuses_a_half_ca_and_bad_days(tmp_path):
    out = tmp_path / "certs"
    assert certs(out, DOMAIN).returncode == 0
    (out / "ca.key").unlink()
    r = certs(out, DOMAIN)
    assert r.returncode == 2 and "ca.key does not" in r.stderr
    r = certs(tmp_path / "other", DOMAIN, days="0")
    assert r.returncode == 2 and "--days 0" in r.stderr


# ---------------------------------------------------------------- the edge: TLS per domain

@pytest.fixture
def tls_gw(spawn, tmp_path):
    r = certs(tmp_path / "certs", DOMAIN)
    assert r.returncode == 0, r.stderr
    tls_port = free_port()
    extra = (f"  server_names: [{SHARED}]\n"
             f"  tls:\n    listen: 127.0.0.1:{tls_port}\n    certificates:\n"
             f"      - {{domains: [{DOMAIN}], cert: certs/{DOMAIN}.pem, key: certs/{DOMAIN}.key}}\n")
    gw = start_gateway(spawn, tmp_path, TEAMS, extra=extra)
    gw.tls_port = tls_port
    gw.ca = tmp_path / "certs" / "ca.pem"
    return gw


def test_sdk_over_https_on_the_team_domain(tls_gw):
    client = sdk(tls_gw.tls_port, KEY_A, tls_gw.ca)
    reply = client.chat.completions.create(**CHAT)
    assert reply.choices[0].message.content and reply.usage.total_tokens > 0
    assert [m.id for m in client.models.list()] == ["llama-3.1-8b-instruct"]
    # nginx saw the request on the TLS server of that domain
    lines = [json.loads(x) for x in (tls_gw.log_dir / "access.jsonl").read_text().splitlines()]
    assert any(x["host"] == DOMAIN and x["team"] == "team-a" and x["status"] == 200 for x in lines)


def test_sdk_without_the_ca_gets_a_connection_error(tls_gw):
    with pytest.raises(openai.APIConnectionError) as info:
        sdk(tls_gw.tls_port, KEY_A, None).chat.completions.create(**CHAT)
    chain, e = [], info.value
    while e is not None:
        chain.append(repr(e))
        e = e.__cause__ or e.__context__
    assert "CERTIFICATE_VERIFY_FAILED" in " ".join(chain)


@pytest.fixture
def llm_test_is_loopback(monkeypatch):
    """*.llm.test resolves to 127.0.0.1 in this process, so a client can be built exactly as docs/tls.md shows."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        return real("127.0.0.1" if str(host).endswith(".llm.test") else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("how", ["SSL_CERT_FILE", "http_client"])
def test_documented_ways_to_trust_the_ca(tls_gw, llm_test_is_loopback, monkeypatch, how):
    """The two SDK setups of docs/tls.md, as written there."""
    url = f"https://{DOMAIN}:{tls_gw.tls_port}/v1"
    if how == "SSL_CERT_FILE":
        monkeypatch.setenv("SSL_CERT_FILE", str(tls_gw.ca))
        client = openai.OpenAI(base_url=url, api_key=KEY_A, max_retries=0)
    else:
        client = openai.OpenAI(base_url=url, api_key=KEY_A, max_retries=0, http_client=openai.DefaultHttpxClient(
            verify=ssl.create_default_context(cafile=str(tls_gw.ca))))
    assert client.chat.completions.create(**CHAT).choices[0].message.content
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(openai.APIConnectionError):  # without the CA: the certificate is not trusted
        openai.OpenAI(base_url=url, api_key=KEY_A, max_retries=0).chat.completions.create(**CHAT)


def test_unknown_server_name_is_refused_at_the_handshake(tls_gw):
    assert handshake(tls_gw.tls_port, DOMAIN, tls_gw.ca) == DOMAIN
    for name in ("other.llm.test", SHARED, None):  # no certificate for them; no SNI at all
        with pytest.raises(ssl.SSLError) as info:
            handshake(tls_gw.tls_port, name, tls_gw.ca)
        assert "UNRECOGNIZED_NAME" in str(info.value), info.value
    with pytest.raises(openai.APIConnectionError):
        sdk(tls_gw.tls_port, KEY_A, tls_gw.ca, host="other.llm.test").chat.completions.create(**CHAT)


def test_domain_rules_hold_over_tls(tls_gw):
    with pytest.raises(openai.AuthenticationError):  # team-b has no domains: its key is not valid on team-a's host
        sdk(tls_gw.tls_port, KEY_B, tls_gw.ca).chat.completions.create(**CHAT)
    with pytest.raises(openai.AuthenticationError):
        sdk(tls_gw.tls_port, "sk-not-a-key-0123456789", tls_gw.ca).chat.completions.create(**CHAT)


def test_plain_http_still_serves_teams_without_domains(tls_gw):
    r = http("POST", tls_gw.base + "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {KEY_B}", "Host": SHARED})
    assert r.status == 200, r.text
    client = openai.OpenAI(base_url=tls_gw.base + "/v1", api_key=KEY_B, max_retries=0,
                           default_headers={"Host": SHARED})
    assert client.chat.completions.create(**CHAT).choices[0].message.content
    r = http("POST", tls_gw.base + "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {KEY_A}", "Host": SHARED})
    assert r.status == 401  # team-a's key works on its own domain only


def _get_over_tls(port: int, server_name: str, host: str, ca: Path) -> tuple[int, str, str]:
    """GET /v1/models with SNI `server_name` but `Host: host`; returns status, content type and body."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY_B}\r\n"
                        "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, body = data.decode("utf-8", "replace").partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in header_lines))
    return int(status_line.split()[1]), headers.get("content-type", ""), body


def test_host_other_than_the_server_name_is_421_json(tls_gw):
    status, ctype, body = _get_over_tls(tls_gw.tls_port, DOMAIN, SHARED, tls_gw.ca)
    assert (status, ctype) == (421, "application/json"), body
    assert json.loads(body)["error"]["code"] == "unknown_host"


def _served_serial(gw) -> int:
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=DOMAIN) as tls:
            return int(tls.getpeercert()["serialNumber"], 16)


def test_reload_serves_a_reissued_certificate(tls_gw):
    from cryptography import x509

    before = _served_serial(tls_gw)
    assert certs(tls_gw.dir / "certs", DOMAIN).returncode == 0
    issued = x509.load_pem_x509_certificate((tls_gw.dir / "certs" / f"{DOMAIN}.pem").read_bytes()).serial_number
    assert issued != before
    r = subprocess.run([*LLMGATE, "reload", "--config", str(tls_gw.config), "--teams", str(tls_gw.teams),
                        "--run-dir", str(tls_gw.run_dir)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _served_serial(tls_gw) == issued, r.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_with_cacert_and_resolve(tls_gw):
    """The curl command of docs/tls.md."""
    url = f"https://{DOMAIN}:{tls_gw.tls_port}/v1/models"
    base = ["curl", "-sS", "--resolve", f"{DOMAIN}:{tls_gw.tls_port}:127.0.0.1", url,
            "-H", f"Authorization: Bearer {KEY_A}"]
    ok = subprocess.run([*base[:2], "--cacert", str(tls_gw.ca), *base[2:]], capture_output=True, text=True, timeout=20)
    assert ok.returncode == 0, ok.stderr
    assert [m["id"] for m in json.loads(ok.stdout)["data"]] == ["llama-3.1-8b-instruct"]
    untrusted = subprocess.run(base, capture_output=True, text=True, timeout=20, env={"PATH": "/usr/bin:/bin"})
    assert untrusted.returncode == 60, untrusted.stderr  # CURLE_PEER_FAILED_VERIFICATION: only system CAs


# ---------------------------------------------------------------- proxycore -> an HTTPS backend

class HttpsBackend:
    """A minimal OpenAI-compatible backend over TLS, in a thread of the test process."""

    def __init__(self, cert: Path, key: Path):
        self.port = free_port()
        self.requests = 0
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=ctx).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tls-model", "object": "model"}]})

    async def chat(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.json()
        return web.json_response({
            "id": "chatcmpl-tls", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "over tls"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def https_backend(tmp_path):
    r = certs(tmp_path / "certs", "localhost", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    backend = HttpsBackend(tmp_path / "certs" / "localhost.pem", tmp_path / "certs" / "localhost.key")
    backend.ca = tmp_path / "certs" / "ca.pem"
    yield backend
    backend.stop()


def _proxy_config(tmp_path: Path, backend: HttpsBackend, ssl_verify) -> Path:
    path = write_config(tmp_path / "config.yaml", [{"model_name": "tls-model", "model": "hosted_vllm/tls-model",
                                                     "api_base": f"https://127.0.0.1:{backend.port}/v1"}])
    if ssl_verify is not None:
        doc = yaml.safe_load(path.read_text())
        doc["litellm_settings"] = {"ssl_verify": ssl_verify}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("ssl_verify, status", [(None, 503), (True, 503), (False, 200), ("CA", 200)],
                         ids=["default", "true", "false", "ca-bundle"])
def test_proxy_reaches_an_https_backend_per_ssl_verify(spawn, tmp_path, https_backend, ssl_verify, status):
    setting = str(https_backend.ca) if ssl_verify == "CA" else ssl_verify
    _, base = start_proxy(spawn, _proxy_config(tmp_path, https_backend, setting))
    body = {"model": "tls-model", "messages": [{"role": "user", "content": "x"}]}
    r = http("POST", base + "/v1/chat/completions", body, {"Authorization": f"Bearer {MASTER_KEY}"})
    assert r.status == status, r.text
    if status == 200:
        assert r.json()["choices"][0]["message"]["content"] == "over tls"
        assert https_backend.requests == 1
    else:
        assert r.json()["error"]["code"] == "backend_unreachable"
        assert https_backend.requests == 0  # refused at the handshake: no request reached the backend


def test_ssl_verify_path_must_exist(tmp_path, https_backend):
    config = _proxy_config(tmp_path, https_backend, str(tmp_path / "missing-ca.pem"))
    r = subprocess.run([*LLMGATE, "proxy", "--config", str(config), "--port", str(free_port())],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2
    assert "litellm_settings.ssl_verify" in r.stderr and "missing-ca.pem" in r.stderr
