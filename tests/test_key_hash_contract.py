"""The one contract written twice: nginx hashes the bearer token in njs (nginx/llmgate.js), Python in
controller/model/wire.py. A real nginx with the project's njs module says what it computes; both must
agree on every header, or keys would work in one lookup mode and not the other."""

from __future__ import annotations

import http.client
import subprocess

import pytest

from controller.edge.nginx import find_js_module, nginx_binary
from controller.edge.render import STATIC
from controller.model.wire import bearer_token, key_hash
from support import free_port, wait_until

HEADERS = [
    "Bearer sk-team-a-0123456789",
    "bearer sk-team-a-0123456789",
    "BEARER   sk-team-a-0123456789   ",
    "Bearer \tsk-tab",
    "Bearer sk-" + "x" * 590,  # 600 characters: the longest accepted
    "Bearer sk-" + "x" * 591,  # one more: no key
    "Bearer ",
    "Basic sk-team-a-0123456789",
    "Bearersk-no-space",
    "Bearer sk-ünïcode-key",
]


@pytest.fixture(scope="module")
def njs_hash(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("njs")
    port = free_port()
    (prefix / "nginx.conf").write_text(f"""
load_module {find_js_module()};
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
    access_log off;
    js_path {STATIC};
    js_import llmgate from llmgate.js;
    js_set $gw_key_hash llmgate.key_hash;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "[$gw_key_hash]"; }}
    }}
}}
""")
    proc = subprocess.Popen([nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ask(header: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.putrequest("GET", "/")
        conn.putheader("Authorization", header.encode("utf-8"))
        conn.endheaders()
        body = conn.getresponse().read().decode()
        conn.close()
        return body[1:-1]

    def up() -> bool:
        try:
            ask("Bearer x")
            return True
        except OSError:
            return False

    try:
        assert wait_until(up, timeout=10), (prefix / "error.log").read_text()
        yield ask
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("header", HEADERS)
def test_njs_and_python_hash_the_same_key(njs_hash, header):
    token = bearer_token(header.encode("utf-8").decode("utf-8", "surrogateescape"))
    expected = key_hash(token) if token is not None else ""
    assert njs_hash(header) == expected
