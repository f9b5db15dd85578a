"""DB mode through the full gateway: LiteLLM's /key/generate flow, enforced at the edge, on SQLite and Postgres."""

from __future__ import annotations

import glob
import subprocess
import threading
import time

import openai
import pytest

from support import DB_GATEWAY_STATIC_KEY as STATIC
from support import MASTER_KEY, database, gateway_with_db, http, sha256_hex, wait_until

MODEL = "llama-3.1-8b-instruct"


def admin(gw, method: str, path: str, body=None, key: str = MASTER_KEY):
    return http(method, gw.base + path, body, {"Authorization": f"Bearer {key}"})


def chat(gw, key: str, model: str = MODEL):
    return http("POST", gw.base + "/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                {"Authorization": f"Bearer {key}"})


@pytest.fixture(params=["sqlite", "postgresql"])
def gw(request, spawn, tmp_path):
    with database(request.param, tmp_path) as url:
        yield gateway_with_db(spawn, tmp_path, url)


def test_litellm_seed_scenario(gw):
    r = admin(gw, "POST", "/key/generate", {"rpm_limit": 1, "models": [MODEL]})
    assert r.status == 200, r.text
    key = r.json()["key"]
    assert key.startswith("sk-") and r.json()["token"] == sha256_hex(key)
    first = chat(gw, key)
    assert first.status == 200, first.text
    second = chat(gw, key)
    assert second.status == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
    assert second.headers.get("retry-after")
    assert chat(gw, key, "other").status in (403, 429)  # outside `models` (or over rpm first)
    listed = http("GET", gw.base + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert [m["id"] for m in listed["data"]] == [MODEL]
    assert chat(gw, STATIC).status == 200  # static keys keep working beside virtual ones
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.base + "/v1", api_key="sk-never-issued", max_retries=0).models.list()


def test_model_outside_key_models_is_403(gw):
    key = admin(gw, "POST", "/key/generate", {"models": [MODEL]}).json()["key"]
    r = chat(gw, key, "other")
    assert r.status == 403 and r.json()["error"]["code"] == "model_not_allowed"


def test_admin_api_needs_the_master_key(gw):
    assert admin(gw, "POST", "/key/generate", {}, key="sk-wrong").status == 401
    assert admin(gw, "GET", "/key/list", key=STATIC).status == 401
    assert admin(gw, "POST", "/key/generate", b"{not json").status == 400


def test_block_unblock_and_delete_take_effect_within_5s(gw):
    key = admin(gw, "POST", "/key/generate", {}).json()["key"]
    assert chat(gw, key).status == 200
    assert admin(gw, "POST", "/key/block", {"key": key}).status == 200
    assert wait_until(lambda: chat(gw, key).status == 401, timeout=5)
    assert admin(gw, "POST", "/key/unblock", {"key": key}).status == 200
    assert wait_until(lambda: chat(gw, key).status == 200, timeout=5)
    assert admin(gw, "POST", "/key/delete", {"keys": [key]}).status == 200
    assert wait_until(lambda: chat(gw, key).status == 401, timeout=5)
    assert admin(gw, "GET", f"/key/info?key={key}").status == 404


def test_budget_and_expiry(gw):
    key = admin(gw, "POST", "/key/generate", {"max_budget": 0.05}).json()["key"]  # 0.01 per token: a few tokens
    assert chat(gw, key).status == 200
    refused = []
    assert wait_until(lambda: refused.append(chat(gw, key)) or refused[-1].status == 429, timeout=10)
    assert refused[-1].json()["error"]["code"] == "insufficient_quota"
    spend = admin(gw, "GET", f"/key/info?key={key}").json()["info"]["spend"]
    assert spend >= 0.05
    logs = admin(gw, "GET", f"/spend/logs?api_key={key}").json()
    assert len(logs) >= 1
    short = admin(gw, "POST", "/key/generate", {"duration": "2s"}).json()["key"]
    assert chat(gw, short).status == 200
    assert wait_until(lambda: chat(gw, short).status == 401, timeout=8)


def test_two_gateways_share_one_postgres(spawn, tmp_path):
    with database("postgresql", tmp_path) as url:
        one = gateway_with_db(spawn, tmp_path, url, "one")
        two = gateway_with_db(spawn, tmp_path, url, "two")
        key = admin(one, "POST", "/key/generate", {"key_alias": "shared"}).json()["key"]
        assert chat(two, key).status == 200
        assert admin(two, "POST", "/key/block", {"key": key}).status == 200
        assert wait_until(lambda: chat(one, key).status == 401, timeout=5)


def _pg_cluster() -> tuple[str, str]:
    version = sorted(glob.glob("/etc/postgresql/*"))[-1].rsplit("/", 1)[1]
    return version, "main"


def test_postgres_restart_in_the_middle_of_traffic(spawn, tmp_path):
    with database("postgresql", tmp_path) as url:
        gw = gateway_with_db(spawn, tmp_path, url)
        key = admin(gw, "POST", "/key/generate", {}).json()["key"]
        assert chat(gw, key).status == 200
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            for _ in range(5000):  # bounded; `stop` ends it first
                if stop.is_set():
                    return
                statuses.append(chat(gw, key).status)
                time.sleep(0.02)

        t = threading.Thread(target=load)
        t.start()
        version, cluster = _pg_cluster()
        try:
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "restart"],
                           check=True, capture_output=True, timeout=60)
            time.sleep(1)
        finally:
            stop.set()
            t.join()
        assert statuses and set(statuses) == {200}  # the key was known: it kept working while the DB was away
        fresh = None
        for _ in range(50):  # the gateway reconnects by itself
            r = admin(gw, "POST", "/key/generate", {})
            if r.status == 200:
                fresh = r.json()["key"]
                break
            time.sleep(0.2)
        assert fresh is not None
        assert chat(gw, fresh).status == 200
