"""The docker compose deployment: the files checked statically (no Docker engine needed), and the
controller sidecar run for real beside an nginx it did not start, the way the two containers run."""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from controller.cli import build_parser
from controller.edge.nginx import find_js_module, nginx_binary
from controller.edge.render import render_nginx_conf
from controller.model.gateway import load_gateway_config
from fakevllm.__main__ import build_parser as fake_vllm_parser
from support import LLMGATE, ROOT, free_port, http, sha256_hex, start_fake_vllm, teams_yaml, wait_until, write_config

COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
MOUNT = "/etc/llmgate"  # where the llmgate services see compose/
CORE = {"nginx", "controller", "proxycore", "authsvc"}
REQUIRED_SECRETS = {"LLMGATE_MASTER_KEY": "sk-compose-master-0123456789", "LLMGATE_INTERNAL_KEY": "sk-compose-internal-0123456789",
                    "LLMGATE_DEMO_KEY": "sk-compose-demo-0123456789"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# ---------------------------------------------------------------- reading the files


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, with `$$` for a literal `$`."""
    env = env or {}

    def sub(m: re.Match) -> str:
        name, op, arg = m.groups()
        value = env.get(name, "")
        if op in (":-", "-"):
            return value or arg
        if op in (":?", "?"):
            return value or f"<{name}>"
        return value

    return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def variables_used() -> set[str]:
    return {m.group(1) for m in _VAR.finditer(COMPOSE_FILE.read_text().replace("$$", ""))}


def env_example() -> list[tuple[str, str]]:
    pairs = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not NAME="
            pairs.append((name.strip(), value))
    return pairs


def command(service: dict, env: dict[str, str] | None = None) -> list[str]:
    cmd = service.get("command", [])
    return [interpolate(str(word), env) for word in (shlex.split(cmd) if isinstance(cmd, str) else cmd)]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def llmgate_services() -> dict[str, dict]:
    return {name: s for name, s in services().items() if str(s.get("image", "")).startswith("llmgate:")}


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each mount, short or long syntax."""
    mounts = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, _, rest = v.partition(":")
            mounts.append((source, rest.split(":")[0]))
        else:
            mounts.append((v.get("source", ""), v["target"]))
    return mounts


def mount_target(service: dict, source: str) -> str:
    return next(target for src, target in volume_mounts(service) if src == source)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def compose_copies(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The compose deployment's two files, copied with log_dir moved from /var/log/llmgate (a container's path)."""
    config = tmp_path / "config.compose.yaml"
    shutil.copy(COMPOSE_DIR / "config.compose.yaml", config)
    logs = tmp_path / "logs"
    text = (COMPOSE_DIR / "teams.compose.yaml").read_text()
    moved = re.sub(r"(?m)^(\s*log_dir:\s*)/var/log/llmgate\b", rf"\g<1>{logs}", text)
    assert moved != text, "teams.compose.yaml: expected log_dir: /var/log/llmgate (the logs volume)"
    teams = tmp_path / "teams.compose.yaml"
    teams.write_text(moved)
    return config, teams, logs


# ---------------------------------------------------------------- the compose file


def test_compose_file_is_compose_spec_and_every_service_has_an_image():
    doc = compose()
    assert "version" not in doc, "the compose spec has no `version:`"
    assert CORE <= set(doc["services"])
    for name, s in doc["services"].items():
        assert "image" in s or "build" in s, f"service {name} has neither image nor build"
    declared = set(doc.get("volumes") or {})
    for name, s in doc["services"].items():
        for source, _ in volume_mounts(s):
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"service {name} mounts volume {source!r}, not declared under volumes:"


def test_every_llmgate_command_is_a_real_subcommand_the_parser_accepts():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    found = llmgate_services()
    assert {"controller", "proxycore", "authsvc", "fake-vllm-1", "fake-vllm-2"} <= set(found)
    for name, s in found.items():
        argv = command(s)
        assert argv and argv[0] in choices, f"{name}: {argv[:1]} is not an llmgate subcommand ({', '.join(choices)})"
        try:
            parser.parse_args(argv)
            if argv[0] == "fake-vllm":  # a program of its own: its options are checked by its parser
                fake_vllm_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{name}: `llmgate {' '.join(argv)}` is refused by the CLI parser")


def test_the_parser_check_can_fail():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["proxy", "--port", "4001", "--no-such-option"])


def test_bind_mounted_paths_exist_in_the_repo():
    for name, s in services().items():
        for source, _target in volume_mounts(s):
            if source.startswith((".", "/", "~")):
                path = (COMPOSE_DIR / source).resolve()
                assert path.exists(), f"service {name} mounts {source} (-> {path}), which is not in the repo"


def test_variables_come_from_env_example_and_it_holds_no_values():
    pairs = env_example()
    names = [n for n, _ in pairs]
    assert len(names) == len(set(names)), "a name appears twice in .env.example"
    filled = [n for n, v in pairs if v.strip()]
    assert not filled, f".env.example must hold no values: {filled}"
    used = variables_used()
    assert used - set(names) == set(), f"used in docker-compose.yml, missing from .env.example: {sorted(used - set(names))}"
    assert set(names) - used == set(), f"in .env.example, used nowhere: {sorted(set(names) - used)}"
    assert {"LLMGATE_MASTER_KEY", "LLMGATE_INTERNAL_KEY", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "HF_TOKEN"} <= used


def test_secrets_are_never_written_into_the_compose_file():
    secret = re.compile(r"KEY|PASSWORD|TOKEN|SECRET")
    for name, s in services().items():
        env = s.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
        for var, value in items:
            if secret.search(var) and "USER" not in var:
                assert "${" in str(value), f"{name}: {var} must come from compose/.env, not the compose file"
    # Required everywhere, so `docker compose up` stops at once without them; profile secrets must not be
    # required (compose interpolates every service, even those of profiles not asked for).
    text = COMPOSE_FILE.read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert required == set(REQUIRED_SECRETS)


def test_core_services_run_without_a_profile_and_each_profile_is_there():
    s = services()
    for name in CORE:
        assert "profiles" not in s[name], f"{name} must run in every profile"
    by_profile: dict[str, set[str]] = {}
    for name, svc in s.items():
        for p in svc.get("profiles", []):
            by_profile.setdefault(p, set()).add(name)
    assert by_profile == {"demo": {"fake-vllm-1", "fake-vllm-2"}, "vllm": {"vllm"}, "db": {"postgres"},
                          "monitoring": {"prometheus", "grafana"}}
    assert all(command(s[n])[0] == "fake-vllm" for n in by_profile["demo"])


def test_vllm_profile_reserves_a_gpu_and_keeps_models_and_hf_cache():
    vllm = services()["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count", 0) for d in devices)
    argv = command(vllm)
    assert "${VLLM_MODEL" in str(vllm["command"][vllm["command"].index("--model") + 1])
    targets = {t for _, t in volume_mounts(vllm)}
    assert option(argv, "--download-dir") in targets
    assert "/root/.cache/huggingface" in targets
    assert "HF_TOKEN" in vllm["environment"]


def test_db_profile_is_postgres_16_with_a_volume_and_a_healthcheck():
    pg = services()["postgres"]
    assert pg["image"] == "postgres:16"
    assert "/var/lib/postgresql/data" in {t for _, t in volume_mounts(pg)}
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    for name in ("proxycore", "authsvc"):
        dep = services()[name]["depends_on"]["postgres"]
        assert dep == {"condition": "service_healthy", "required": False}, f"{name} must not need --profile db"
    url = interpolate(llmgate_services()["proxycore"]["environment"]["DATABASE_URL"], {"POSTGRES_PASSWORD": "pw"})
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("postgresql", "postgres", 5432, "/" + pg["environment"]["POSTGRES_DB"])
    assert parts.username == pg["environment"]["POSTGRES_USER"]


def test_monitoring_profile_mounts_the_prometheus_and_grafana_files():
    s = services()
    prom = dict(volume_mounts(s["prometheus"]))
    assert prom["./monitoring/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert prom["./monitoring/alerts.yml"] == "/etc/prometheus/alerts.yml"
    graf = dict(volume_mounts(s["grafana"]))
    assert graf["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert graf["./monitoring/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    scrape = yaml.safe_load((COMPOSE_DIR / "monitoring" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert f"proxycore:{option(command(s['proxycore']), '--port')}" in targets


def test_controller_is_a_sidecar_of_nginx_sharing_pid_network_and_the_rendered_config():
    s = services()
    nginx, ctl = s["nginx"], s["controller"]
    assert nginx["image"].startswith("nginx:1.27")
    assert ctl["pid"] == "service:nginx" and ctl["network_mode"] == "service:nginx"
    assert "networks" not in ctl and "ports" not in ctl  # both come with nginx's network namespace
    argv = command(ctl)
    prefix = option(argv, "--nginx-prefix")
    shared = [src for src, target in volume_mounts(ctl) if prefix.startswith(target + "/")]
    assert shared, f"the controller's --nginx-prefix {prefix} is on none of its volumes"
    assert mount_target(nginx, shared[0]) == mount_target(ctl, shared[0]), "nginx must see the prefix at the same path"
    assert option(argv, "--nginx-pid-file") == prefix + "/nginx.pid"  # the rendered `pid` directive
    assert option(argv, "--js-module") == "/etc/nginx/modules/ngx_http_js_module.so"  # njs in the official image
    script = " ".join(nginx["entrypoint"]) + " " + " ".join(command(nginx))
    assert f"exec nginx -p {prefix} -c {prefix}/nginx.conf -e {prefix}/error.log" in script
    published = {str(p).rsplit(":", 1)[-1] for p in nginx["ports"]}
    assert {"8080", "8443"} <= published
    assert str(nginx["user"]).split(":")[0] == "10001"  # the llmgate image's user: the sidecar may signal nginx
    assert ctl["depends_on"]["nginx"].get("restart") is True


def test_addresses_and_paths_agree_between_compose_and_the_compose_configs():
    s = services()
    teams = yaml.safe_load((COMPOSE_DIR / "teams.compose.yaml").read_text())["gateway"]
    config = yaml.safe_load((COMPOSE_DIR / "config.compose.yaml").read_text())
    subnet = ipaddress.ip_network(compose()["networks"]["default"]["ipam"]["config"][0]["subnet"])
    for name, key in (("proxycore", "proxy_listen"), ("authsvc", "auth_listen")):
        argv = command(s[name])
        address = s[name]["networks"]["default"]["ipv4_address"]
        assert ipaddress.ip_address(address) in subnet
        assert teams[key] == f"{address}:{option(argv, '--port')}", f"gateway.{key} must be where {name} listens"
        assert option(argv, "--host") == "0.0.0.0"
    # nginx listens where compose publishes it.
    listen_port = teams["listen"].rsplit(":", 1)[1]
    assert any(str(p).endswith(":" + listen_port) for p in s["nginx"]["ports"])
    # One log directory for nginx's access log and proxycore's usage log, on the same volume everywhere.
    log_dir = teams["log_dir"]
    assert os.path.dirname(option(command(s["proxycore"]), "--usage-log")) == log_dir
    for name in ("nginx", "controller", "proxycore"):
        assert mount_target(s[name], "logs") == log_dir, f"{name} must mount the logs volume at {log_dir}"
    # Every llmgate service reads the two files from the compose directory.
    for name in ("controller", "proxycore", "authsvc"):
        assert mount_target(s[name], "./") == MOUNT
        argv = command(s[name])
        assert option(argv, "--teams") == f"{MOUNT}/teams.compose.yaml"
        if "--config" in argv:
            assert option(argv, "--config") == f"{MOUNT}/config.compose.yaml"
    # The demo backends are the api_base entries of config.compose.yaml, serving its upstream model ids.
    demo = {(name, option(command(svc), "--port")): command(svc) for name, svc in s.items() if "demo" in svc.get("profiles", [])}
    for entry in config["model_list"]:
        url = urlsplit(entry["litellm_params"]["api_base"])
        argv = demo.get((url.hostname, str(url.port)))
        assert argv is not None, f"config.compose.yaml: {url.hostname}:{url.port} is no demo service"
        assert option(argv, "--model") == entry["litellm_params"]["model"].split("/", 1)[1]


def run_check(tmp_path: Path, config: Path, teams: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LLMGATE, "check", "--config", str(config), "--teams", str(teams), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env={**os.environ, **REQUIRED_SECRETS, **env}, cwd=ROOT, timeout=60)


def test_compose_configs_pass_llmgate_check(tmp_path, monkeypatch):
    config, teams, _ = compose_copies(tmp_path)
    run = run_check(tmp_path, config, teams)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "nginx -t passed" in run.stdout
    # nginx's container starts once every file the controller renders is there: the same list.
    for name, value in REQUIRED_SECRETS.items():
        monkeypatch.setenv(name, value)
    cfg = load_gateway_config(config, teams)
    prefix = option(command(services()["controller"]), "--nginx-prefix")
    rendered = render_nginx_conf(cfg, prefix, REQUIRED_SECRETS["LLMGATE_INTERNAL_KEY"])
    waited = set(re.findall(rf"\[ -s {re.escape(prefix)}/([\w.-]+) \]", " ".join(command(services()["nginx"]))))
    assert waited == set(rendered.files)


def test_db_mode_as_docs_deploy_enables_it_passes_llmgate_check(tmp_path):
    config, teams, _ = compose_copies(tmp_path)
    text = config.read_text()
    enabled = text.replace("# database_url: os.environ/DATABASE_URL", "database_url: os.environ/DATABASE_URL")
    assert enabled != text, "config.compose.yaml: expected the commented database_url line docs/deploy.md uncomments"
    config.write_text(enabled)
    url = interpolate(services()["proxycore"]["environment"]["DATABASE_URL"], {"POSTGRES_PASSWORD": "0123abcd"})
    run = run_check(tmp_path, config, teams, DATABASE_URL=url)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "auth_request" in (tmp_path / "run" / "nginx-staging" / "nginx.conf").read_text()  # every key asks authsvc
    assert "--config" in command(services()["authsvc"])  # which reads database_url from config.compose.yaml
    # authsvc puts proxycore's spend into the database from the usage log: it must see the log directory
    log_dir = yaml.safe_load((COMPOSE_DIR / "teams.compose.yaml").read_text())["gateway"]["log_dir"]
    assert any(target == log_dir for _, target in volume_mounts(services()["authsvc"])), services()["authsvc"]["volumes"]


def test_llmgate_check_refuses_a_broken_compose_teams_file(tmp_path):
    config, teams, _ = compose_copies(tmp_path)
    teams.write_text(teams.read_text().replace("proxy_listen: ", "proxy_listen: proxycore-"))
    run = run_check(tmp_path, config, teams)
    assert run.returncode != 0 and "proxy_listen" in run.stderr


# ---------------------------------------------------------------- the Dockerfile


def test_dockerfile_builds_one_small_non_root_image_of_the_package():
    steps = dockerfile_instructions()
    froms = [rest for kw, rest in steps if kw == "FROM"]
    assert froms and froms[-1].split()[0].startswith("python:3.11-slim")
    runs = " ".join(rest for kw, rest in steps if kw == "RUN")
    assert "pip install --no-cache-dir" in runs
    assert "libnginx-mod-http-js" in runs and re.search(r"\bnginx(-light)?\b", runs)
    assert "rm -rf /var/lib/apt/lists" in runs
    users = [rest for kw, rest in steps if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    entry = json.loads(next(rest for kw, rest in steps if kw == "ENTRYPOINT"))
    assert entry == ["llmgate"]
    cmd = json.loads(next(rest for kw, rest in steps if kw == "CMD"))
    try:
        build_parser().parse_args(cmd)
    except SystemExit:
        pytest.fail(f"CMD {cmd} is refused by the llmgate CLI")
    # compose runs nginx as this user; the uid in the image is the one compose names.
    assert users[-1].split(":")[0] == str(services()["nginx"]["user"]).split(":")[0]


def test_dockerfile_copies_only_what_exists_and_is_not_dockerignored():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = [rest for kw, rest in dockerfile_instructions() if kw in ("COPY", "ADD")]
    assert copies
    sources: list[str] = []
    for rest in copies:
        words = [w for w in rest.split() if not w.startswith("--")]
        sources += words[:-1]
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
        name = src.rstrip("/")
        hits = [p for p in ignored if not p.startswith("!") and (fnmatch.fnmatch(name, p) or name.startswith(p + "/"))]
        assert not hits, f".dockerignore drops {src}, which the Dockerfile copies ({hits})"
    # What render.py reads at run time is in the image.
    assert {"controller/", "proxycore/", "authsvc/", "templates/", "nginx/", "pyproject.toml"} <= set(sources)
    for secret in ("compose/.env", ".venv", "run"):
        assert secret in ignored, f".dockerignore must keep {secret} out of the build context"


# ---------------------------------------------------------------- the sidecar, for real

TEAM_A_KEY = "sk-compose-team-a-0123456789"
TEAM_B_KEY = "sk-compose-team-b-0123456789"
TEAM_C_KEY = "sk-compose-team-c-0123456789"
INTERNAL_KEY = "sk-compose-internal-test-0123456789"
TEAM_A = f"  team-a:\n    keys: [sha256:{sha256_hex(TEAM_A_KEY)}]\n    rpm: 1000\n"
TEAM_B = f"  team-b:\n    keys: [sha256:{sha256_hex(TEAM_B_KEY)}]\n    rpm: 1000\n"
TEAM_C = f"  team-c:\n    keys: [sha256:{sha256_hex(TEAM_C_KEY)}]\n"


def test_the_live_config_names_the_serving_nginx_module_and_the_staging_copy_the_local_one(tmp_path):
    from controller.edge.nginx import EdgeReloader
    from controller.ops.sidecar import SidecarLayout

    config, teams = tmp_path / "config.yaml", tmp_path / "teams.yaml"
    write_config(config, [{"model_name": "llama-3.1-8b-instruct", "api_base": "http://127.0.0.1:9/v1"}])
    teams.write_text(teams_yaml(free_port(), free_port(), free_port(), "map", TEAM_A))
    layout = SidecarLayout(tmp_path / "run", tmp_path / "shared" / "nginx")
    served_module = "/etc/nginx/modules/ngx_http_js_module.so"
    reloader = EdgeReloader(layout, str(config), str(teams), INTERNAL_KEY, nginx_pid=lambda: None, js_module=served_module)
    cfg = reloader.load()
    live = reloader.render(cfg, layout.nginx_prefix)
    staged = reloader.render(cfg, layout.staging_prefix)
    assert f'load_module "{served_module}";' in live.files["nginx.conf"].decode()
    assert f'load_module "{find_js_module()}";' in staged.files["nginx.conf"].decode()
    assert layout.work_dir(layout.nginx_prefix) == layout.nginx_prefix / "work"


class Edge:
    """nginx started by the compose nginx service's own command, the sidecar by the controller's, on loopback."""

    def __init__(self, spawn, tmp_path: Path):
        self.spawn, self.dir = spawn, tmp_path
        self.port, self.proxy_port, self.auth_port = free_port(), free_port(), free_port()
        self.prefix = tmp_path / "shared" / "nginx"  # the `edge` volume
        self.prefix.parent.mkdir()
        self.config, self.teams = tmp_path / "config.yaml", tmp_path / "teams.yaml"
        _, api_base = start_fake_vllm(spawn)
        write_config(self.config, [{"model_name": "llama-3.1-8b-instruct", "api_base": api_base}])
        self.write_teams(TEAM_A)
        self.env = {"LLMGATE_INTERNAL_KEY": INTERNAL_KEY}
        spawn([*LLMGATE, "proxy", "--config", str(self.config), "--teams", str(self.teams), "--port", str(self.proxy_port),
               "--usage-log", str(tmp_path / "logs" / "usage.jsonl")], r"listening on", env=self.env)
        nginx = services()["nginx"]
        script = command(nginx)[0].replace("/run/llmgate/nginx", str(self.prefix))
        path = f"{os.path.dirname(nginx_binary())}:{os.environ.get('PATH', '')}"
        self.nginx = spawn([*nginx["entrypoint"], script], r"waiting for the controller", env={"PATH": path})
        self.sidecar = self.start_sidecar()

    def write_teams(self, teams: str) -> None:
        """Replaced the way editors and `llmgate key new` do: a temp file renamed over it."""
        tmp = self.dir / ".teams.yaml.tmp"
        tmp.write_text(teams_yaml(self.port, self.proxy_port, self.auth_port, "map", teams, log_dir=str(self.dir / "logs")))
        tmp.replace(self.teams)

    def start_sidecar(self, env: dict[str, str] | None = None):
        paths = {f"{MOUNT}/config.compose.yaml": str(self.config), f"{MOUNT}/teams.compose.yaml": str(self.teams),
                 "/tmp/llmgate": str(self.dir / "run"), "/run/llmgate/nginx": str(self.prefix),
                 "/etc/nginx/modules/ngx_http_js_module.so": find_js_module()}
        argv = [paths.get(w, w.replace("/run/llmgate/nginx", str(self.prefix))) for w in command(services()["controller"])]
        return self.spawn([*LLMGATE, *argv], r"^llmgate: sidecar watching|^llmgate: sidecar:", env=env or self.env, timeout=90)

    def checksum(self) -> str:
        return http("GET", f"http://127.0.0.1:{self.port}/-/config-hash").text.strip()

    def chat(self, key: str) -> int:
        body = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        return http("POST", f"http://127.0.0.1:{self.port}/v1/chat/completions", body,
                    {"Authorization": f"Bearer {key}"}).status

    def reloads(self, svc=None) -> list[str]:
        return [line for line in (svc or self.sidecar).lines if line.startswith("llmgate: reload")]


@pytest.fixture
def edge(spawn, tmp_path) -> Edge:
    return Edge(spawn, tmp_path)


def test_sidecar_renders_the_first_config_and_nginx_serves_it(edge):
    assert edge.reloads() and edge.reloads()[0].startswith("llmgate: reload (start): applied"), edge.sidecar.output
    served = edge.checksum()
    assert len(served) == 64 and served in (edge.prefix / "nginx.conf").read_text()
    assert int((edge.prefix / "nginx.pid").read_text()) == edge.nginx.pid  # the process the sidecar signals
    conf = (edge.prefix / "nginx.conf").read_text()
    assert f'"{edge.prefix}/work/tmp/body"' in conf and "llmgate-nginx-" not in conf  # the serving nginx sees only the volume
    assert edge.chat(TEAM_A_KEY) == 200
    assert edge.chat(TEAM_B_KEY) == 401


def test_an_edit_goes_live_and_a_bad_edit_keeps_the_previous_config(edge):
    first = edge.checksum()
    edge.write_teams(TEAM_A + TEAM_B)
    assert wait_until(lambda: edge.checksum() != first, timeout=10), edge.sidecar.output
    assert wait_until(lambda: any("(teams.yaml changed): applied" in line for line in edge.reloads()), timeout=5), edge.sidecar.output
    assert edge.chat(TEAM_B_KEY) == 200
    second = edge.checksum()
    assert second in (edge.prefix / "nginx.conf").read_text()

    edge.write_teams(TEAM_A + TEAM_B.replace("team-b", "Team_B"))
    assert wait_until(lambda: any("failed: kept the previous config" in line for line in edge.reloads()), timeout=10), \
        edge.sidecar.output
    failure = next(line for line in edge.reloads() if "failed" in line)
    assert "teams.yaml" in failure and "Team_B" in failure
    assert edge.checksum() == second
    assert second in (edge.prefix / "nginx.conf").read_text()  # the previous config stays on disk too
    assert edge.chat(TEAM_B_KEY) == 200
    assert edge.nginx.proc.poll() is None


def test_a_restarted_sidecar_applies_what_changed_while_it_was_down(edge):
    first = edge.checksum()
    edge.sidecar.stop()
    again = edge.start_sidecar()
    assert edge.reloads(again)[0].startswith("llmgate: reload (start): unchanged"), again.output
    again.stop()
    edge.write_teams(TEAM_A + TEAM_C)
    assert edge.checksum() == first  # nobody told nginx yet
    third = edge.start_sidecar()
    assert edge.reloads(third)[0].startswith("llmgate: reload (start): applied"), third.output
    assert edge.checksum() != first
    assert edge.chat(TEAM_C_KEY) == 200


def test_sidecar_refuses_to_start_without_the_internal_key(tmp_path):
    config, teams = tmp_path / "config.yaml", tmp_path / "teams.yaml"
    write_config(config, [{"model_name": "llama-3.1-8b-instruct", "api_base": "http://127.0.0.1:9/v1"}])
    teams.write_text(teams_yaml(free_port(), free_port(), free_port(), "map", TEAM_A))
    env = {k: v for k, v in os.environ.items() if k != "LLMGATE_INTERNAL_KEY"}
    proc = subprocess.run([*LLMGATE, "sidecar", "--config", str(config), "--teams", str(teams), "--run-dir",
                           str(tmp_path / "run"), "--nginx-prefix", str(tmp_path / "nginx"), "--nginx-pid-file",
                           str(tmp_path / "nginx" / "nginx.pid")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert proc.returncode == 2 and "LLMGATE_INTERNAL_KEY" in proc.stderr
