"""Keys that clients put in query strings (LiteLLM's documented /key/info?key= and /spend/logs?api_key=, or any
?api_key= a client adds) reach no file of the gateway: the access log keeps the path only."""

from __future__ import annotations

from support import MASTER_KEY, database, gateway_with_db, http

MODEL = "llama-3.1-8b-instruct"


def files_holding(directories, secrets: list[str]) -> list[str]:
    found = []
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {s[:12]}..." for s in secrets if s.encode() in data]
    return found


def test_keys_in_query_strings_never_reach_a_file(spawn, tmp_path):
    with database("sqlite", tmp_path) as url:
        gw = gateway_with_db(spawn, tmp_path, url)
        auth = {"Authorization": f"Bearer {MASTER_KEY}"}
        key = http("POST", gw.base + "/key/generate", {"models": [MODEL]}, auth).json()["key"]
        stray = "sk-client-put-this-in-a-url-0123456789"
        assert http("GET", gw.base + f"/key/info?key={key}", None, auth).status == 200
        assert http("GET", gw.base + f"/spend/logs?api_key={key}", None, auth).status == 200
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        assert http("POST", gw.base + f"/v1/chat/completions?api_key={stray}&key={key}", body,
                    {"Authorization": f"Bearer {key}"}).status == 200
        assert http("GET", gw.base + f"/v1/models?api_key={MASTER_KEY}", None, {"Authorization": f"Bearer {key}"}).status == 200
        assert http("GET", gw.base + f"/nowhere?key={stray}").status == 401
        # the documented way that keeps keys out of URLs altogether
        v2 = http("POST", gw.base + "/v2/key/info", {"keys": [key]}, auth)
        assert v2.status == 200 and v2.json()["info"][0]["models"] == [MODEL]
        access = (gw.log_dir / "access.jsonl").read_text()
        assert '"uri":"/key/info"' in access and '"uri":"/spend/logs"' in access  # logged, without the query
        gw.svc.stop()  # every process has flushed and closed its files
        assert files_holding([gw.run_dir, gw.log_dir], [key, stray, MASTER_KEY]) == []


def test_v2_key_info_names_a_missing_key(spawn, tmp_path):
    with database("sqlite", tmp_path) as url:
        gw = gateway_with_db(spawn, tmp_path, url)
        auth = {"Authorization": f"Bearer {MASTER_KEY}"}
        r = http("POST", gw.base + "/v2/key/info", {"keys": ["sk-not-a-key-0123456789"]}, auth)
        assert r.status == 404 and r.json()["error"]["param"] == "keys"
        assert http("POST", gw.base + "/v2/key/info", {"keys": []}, auth).status == 400
