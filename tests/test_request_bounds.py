"""One request's work is bounded: at most `max_n` choices (16 unless a team says otherwise) and at most the
team's `max_tokens`, refused with a 400 that names the setting before any backend is asked."""

from __future__ import annotations

import base64
import json

import pytest

from support import MASTER_KEY, http, sha256_hex, start_fake_vllm, start_proxy, write_config

MODEL = "llama-3.1-8b-instruct"
INTERNAL = "sk-internal-bounds-0123456789"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture
def setup(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base}])
    (tmp_path / "teams.yaml").write_text(
        f"teams:\n  plain:\n    keys: [sha256:{sha256_hex('a')}]\n"
        f"  small:\n    keys: [sha256:{sha256_hex('b')}]\n    max_n: 2\n    max_tokens: 10\n")
    _, base = start_proxy(spawn, cfg, "--teams", str(tmp_path / "teams.yaml"), env={"LLMGATE_INTERNAL_KEY": INTERNAL})
    return base, api_base.removesuffix("/v1")


def as_team(team: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {INTERNAL}", "X-Team": team}


def backend_calls(root: str, path: str) -> int:
    return http("GET", root + "/fake/stats").json()["by_path"].get(path, 0)


def last_body(root: str) -> dict:
    sent = [r for r in http("GET", root + "/fake/last").json() if r["path"] != "/v1/models"][-1]
    return json.loads(base64.b64decode(sent["raw_b64"]))


def test_a_billion_choices_is_refused_before_any_backend(setup):
    base, root = setup
    r = http("POST", base + "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "n": 1_000_000_000},
             as_team("plain"))
    assert r.status == 400
    error = r.json()["error"]
    assert error["code"] == "max_n_exceeded" and error["param"] == "n" and "max_n" in error["message"]
    assert backend_calls(root, "/v1/chat/completions") == 0
    ok = http("POST", base + "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "n": 16, "max_tokens": 1},
              as_team("plain"))
    assert ok.status == 200 and len(ok.json()["choices"]) == 16


def test_the_default_holds_without_a_team_and_a_teams_own_bound_too(setup):
    base, _ = setup
    master = {"Authorization": f"Bearer {MASTER_KEY}"}
    r = http("POST", base + "/v1/completions", {"model": MODEL, "prompt": "x", "n": "17"}, master)
    assert r.status == 400 and r.json()["error"]["param"] == "n"
    r = http("POST", base + "/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3}, as_team("small"))
    assert r.status == 400 and r.json()["error"]["param"] == "best_of"


def test_a_token_cap_refuses_more_and_is_added_where_the_request_sets_none(setup):
    base, root = setup
    r = http("POST", base + "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 11},
             as_team("small"))
    assert r.status == 400 and r.json()["error"]["code"] == "max_tokens_exceeded"
    r = http("POST", base + "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, as_team("small"))
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] <= 10
    assert last_body(root)["max_tokens"] == 10
    r = http("POST", base + "/v1/responses", {"model": MODEL, "input": "a long story"}, as_team("small"))
    assert r.status == 200 and last_body(root)["max_output_tokens"] == 10
    r = http("POST", base + "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4},
             as_team("small"))
    assert r.status == 200 and last_body(root)["max_tokens"] == 4  # the client's own, lower limit stays
