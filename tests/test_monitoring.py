"""Monitoring under compose: Prometheus config, alert rules and the Grafana dashboard stay true to the metrics
llmgate really exports (scraped from a running `llmgate up`) and to vLLM's metric names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import yaml

from support import ROOT, http, sha256_hex, start_fake_vllm, start_gateway, wait_until

MONITORING = ROOT / "compose" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "llmgate.json"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts.test.yml"
PROMETHEUS = MONITORING / "prometheus.yml"
PROMTOOL = shutil.which("promtool")
def needs_promtool(test):
    """promtool checks are part of the suite: `make test` installs it (Debian package `prometheus`)."""
    import functools

    @functools.wraps(test)
    def run(*args, **kwargs):
        assert PROMTOOL is not None, "promtool is missing: run `make test` (it installs Debian's prometheus package)"
        return test(*args, **kwargs)

    return run

# vLLM's names, from vllm-project/vllm vllm/v1/metrics/loggers.py (PrometheusStatLogger): the scheduler gauges,
# and the KV-cache gauge under its name before vLLM 0.9 (gpu_cache_usage_perc, kept as deprecated) and after.
VLLM_METRICS = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                "vllm:kv_cache_usage_perc"}
PROMETHEUS_SERIES = {"up"}  # written by Prometheus itself for every scrape target
# What the dashboard must show (the panels asked for): every one of these appears in some panel.
DASHBOARD_METRICS = {
    "llmgate_requests_total", "llmgate_request_duration_seconds_bucket", "llmgate_ttft_seconds_bucket",
    "llmgate_input_tokens_total", "llmgate_output_tokens_total", "llmgate_cost_usd_total",
    "llmgate_rate_limit_hits_total", "llmgate_budget_used_ratio", "llmgate_deployment_up",
    "llmgate_requests_in_flight", "llmgate_backend_errors_total", "llmgate_config_reloads_total",
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"}
TEAM_LABELLED = {"llmgate_requests_total", "llmgate_request_duration_seconds_bucket", "llmgate_ttft_seconds_bucket",
                 "llmgate_input_tokens_total", "llmgate_output_tokens_total", "llmgate_cost_usd_total",
                 "llmgate_rate_limit_hits_total", "llmgate_budget_used_ratio"}
MODEL_LABELLED = TEAM_LABELLED - {"llmgate_rate_limit_hits_total", "llmgate_budget_used_ratio"}
CORE_PANELS = {"row", "timeseries", "stat", "bargauge", "gauge", "table", "state-timeline"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$team": ".*", "$model": ".*"}

MODEL = "llama-3.1-8b-instruct"
BLUE = "sk-monitoring-blue-0123456789"
METERED = "sk-monitoring-metered-0123456"
LIMITED = "sk-monitoring-limited-0123456"

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def graph_panels(board: dict) -> list[dict]:
    """Every panel that queries, including those nested in collapsed rows."""
    out = []
    for p in board["panels"]:
        out.extend(p.get("panels", []))
        if p["type"] != "row":
            out.append(p)
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    board = dashboard()
    queries = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in graph_panels(board) for t in p["targets"]]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            queries.append((f"variable {var['name']}", q["query"] if isinstance(q, dict) else q))
    return queries


def all_queries() -> list[tuple[str, str]]:
    return dashboard_queries() + [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (functions, keywords, labels and durations left out)."""
    e = _STRING.sub('""', expr)
    e = re.sub(r"label_values\(\s*([^,()]*?)\s*,\s*\w+\s*\)", r"\1", e)  # Grafana's: the label is not a series
    e = re.sub(r"\{[^{}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?", e):
        if m.group(2) is None and m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names


def balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in _STRING.sub('""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def exposition_names(text: str) -> set[str]:
    return {m.group(1) for line in text.splitlines() if (m := re.match(r"^([A-Za-z_:][\w:]*)[{ ]", line))}


def test_metric_name_extraction_sees_series_not_functions_or_labels():
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(llmgate_request_duration_seconds_bucket'
            '{team=~"$team", status!~"5.."}[$__rate_interval]))) / on() group_left vector(1e3) or up'
            ' + (vllm:kv_cache_usage_perc or label_values(llmgate_requests_total{team=~"x"}, model))')
    assert metric_names(expr) == {"llmgate_request_duration_seconds_bucket", "up", "vllm:kv_cache_usage_perc",
                                  "llmgate_requests_total"}
    assert balanced('sum(rate(x{a="(("}[5m]))') and not balanced("sum(rate(x[5m])") and not balanced("a{b)")


def _exercise_gateway(spawn, tmp_path) -> str:
    """A real `llmgate up`: successes, a stream, tpm and rpm refusals, a backend failure; then its /metrics."""
    _, api_base = start_fake_vllm(spawn)
    teams = f"""  blue:
    keys: [sha256:{sha256_hex(BLUE)}]
    budget: {{tokens_per_month: 1000000}}
  metered:
    keys: [sha256:{sha256_hex(METERED)}]
    tpm: 10
  limited:
    keys: [sha256:{sha256_hex(LIMITED)}]
    rpm: 1
    burst: 0
"""
    gw = start_gateway(spawn, tmp_path, teams, deployments=[{
        "model_name": MODEL, "api_base": api_base,
        "model_info": {"id": "dep-a", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}}])

    def chat(key: str, **extra):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
        return http("POST", gw.base + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"})

    assert chat(BLUE).status == 200
    assert chat(BLUE, stream=True).status == 200
    # tpm, refused by proxycore (a request alone in its minute passes; three straddle at most one minute's end)
    assert 429 in [chat(METERED, max_tokens=50).status for _ in range(3)]
    assert [chat(LIMITED).status for _ in range(3)] == [200, 429, 429]  # rpm, refused by nginx
    http("POST", api_base.removesuffix("/v1") + "/fake/config", {"mode": "error-500"})
    assert chat(BLUE).status >= 500

    def scrape() -> str:
        return http("GET", f"http://127.0.0.1:{gw.proxy_port}/metrics").text

    # the controller counts nginx's rpm refusals from the access log a moment later
    assert wait_until(lambda: 'kind="rpm"' in scrape(), timeout=10), scrape()
    return scrape()


def test_every_metric_in_dashboard_and_alerts_is_exported(spawn, tmp_path):
    text = _exercise_gateway(spawn, tmp_path)
    exported = exposition_names(text)
    assert {"llmgate_requests_total", "llmgate_config_reloads_total", "llmgate_config_hash"} <= exported
    assert 'team="blue"' in text  # teams come from nginx's X-Team, with the internal key
    # The 429-ratio alert adds proxycore's 429s to nginx's rpm refusals: proxycore counts a tpm refusal as a
    # request answered 429, and never sees the rpm ones.
    assert re.search(r'llmgate_requests_total\{[^}]*status="429"[^}]*team="metered"', text)
    assert not re.search(r'llmgate_requests_total\{[^}]*status="429"[^}]*team="limited"', text)

    unknown = {f"{where}: {name}" for where, expr in all_queries() for name in metric_names(expr)
               if name not in exported | VLLM_METRICS | PROMETHEUS_SERIES}
    assert not unknown, f"not exported by llmgate nor a known vLLM metric: {sorted(unknown)}"


def test_dashboard_json_panels_and_variables():
    board = dashboard()
    assert board["uid"] == "llmgate" and 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("team", "model"):
        assert variables[name]["type"] == "query" and variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"  # the empty team/model label must match "All" too

    ids = [p["id"] for p in board["panels"]] + [q["id"] for p in board["panels"] for q in p.get("panels", [])]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in board["panels"]:
        assert p["type"] in CORE_PANELS, f"{p['title']}: {p['type']} is not a core panel"
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]

    used: set[str] = set()
    for p in graph_panels(board):
        assert p["datasource"]["type"] == "prometheus" and p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], f"{p['title']} has no targets"
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
            names = metric_names(t["expr"])
            used |= names
            if names & TEAM_LABELLED:
                assert '$team' in t["expr"], f"{p['title']}: not filtered by the team variable"
            if names & MODEL_LABELLED:
                assert '$model' in t["expr"], f"{p['title']}: not filtered by the model variable"
    assert DASHBOARD_METRICS <= used, f"no panel for {sorted(DASHBOARD_METRICS - used)}"


def test_promql_brackets_balance():
    bad = [where for where, expr in all_queries() if not balanced(expr)]
    assert not bad


def test_alert_rules_structure():
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    names = []
    for group in doc["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "for" in rule:
                assert re.fullmatch(r"\d+[smhdw]", rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert set(rule["annotations"]) == {"summary", "description"}
            assert "Runbook:" in rule["annotations"]["description"], rule["alert"]
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    exprs = {r["alert"]: r for r in alert_rules()}
    # the thresholds asked for
    assert "< 0.98" in exprs["LlmgateSuccessRateLow"]["expr"] and "[5m]" in exprs["LlmgateSuccessRateLow"]["expr"]
    latency = exprs["LlmgateLatencyP95High"]
    assert "histogram_quantile(0.95" in latency["expr"]
    assert latency["expr"].rstrip().endswith("> 2") and latency["for"] == "10m"
    assert exprs["LlmgateRateLimitedRatioHigh"]["expr"].rstrip().endswith("> 0.05")
    assert exprs["VllmQueueLong"]["expr"] == "vllm:num_requests_waiting > 100" and exprs["VllmQueueLong"]["for"] == "5m"
    assert metric_names(exprs["VllmKvCacheFull"]["expr"]) == {"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"}
    assert exprs["VllmKvCacheFull"]["for"] == "10m"


@needs_promtool
def test_promtool_checks_alert_rules_and_dashboard_queries(tmp_path):
    check = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # Each dashboard query, with Grafana's variables filled in, as a recording rule: promtool parses it.
    rules = []
    for i, (where, expr) in enumerate(dashboard_queries()):
        if where.startswith("variable"):
            continue
        for var in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
            expr = expr.replace(var, GRAFANA_VARIABLES[var])
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@needs_promtool
def test_alerts_fire_on_synthetic_series():
    result = subprocess.run([PROMTOOL, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # every alert has a unit test in which it fires
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fired = {case["alertname"] for t in tests["tests"] for case in t.get("alert_rule_test", []) if case["exp_alerts"]}
    assert fired == {r["alert"] for r in alert_rules()}


def test_prometheus_config_scrapes_llmgate_and_vllm(tmp_path):
    doc = yaml.safe_load(PROMETHEUS.read_text())
    assert doc["global"]["scrape_interval"] == "15s" and doc["global"]["evaluation_interval"] == "15s"
    assert doc["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    assert set(jobs) == {"llmgate", "vllm"}  # LlmgateTargetDown names these jobs
    for name, target in (("llmgate", "proxycore:4001"), ("vllm", "vllm:8000")):
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
        assert [t for sc in jobs[name]["static_configs"] for t in sc["targets"]] == [target]
    if PROMTOOL:  # promtool reads the rule file too, so point it at the one in the repo
        doc["rule_files"] = [str(ALERTS)]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(doc))
        check = subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    sources = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    providers = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/llmgate.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert [p.name for p in (MONITORING / "grafana/dashboards").iterdir()] == ["llmgate.json"]
