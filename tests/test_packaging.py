"""`pip install .` (not editable) gives a working llmgate: the templates, the njs module and the migrations
ship as package data, and `llmgate up` runs from anywhere on the example configs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from support import ROOT, free_port, http

MODEL = "llama-3.1-8b-instruct"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv outside the checkout with llmgate's wheel in it; the dependencies come from this venv's
    site-packages (a plain path: its .pth files, the editable install among them, are not read)."""
    tmp = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("llmgate-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_wheel_holds_the_package_data_and_imports_from_the_venv(installed, tmp_path):
    out = subprocess.run([str(installed / "bin" / "python"), "-c",
                          "import controller, importlib.resources as r; print(controller.__file__); "
                          "print(sorted(p.name for p in r.files('llmgate_templates').iterdir())); "
                          "print((r.files('llmgate_nginx') / 'llmgate.js').is_file()); "
                          "import authsvc.keydb.store as s; print(sorted(p.name for p in s.MIGRATIONS_DIR.iterdir()))"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    where, templates, js, migrations = out.stdout.splitlines()
    assert where.startswith(str(installed)) and not where.startswith(str(ROOT))
    assert "nginx.conf.j2" in templates and "ui" in templates and js == "True" and "0001_init.sql" in migrations


def _compose_copy(tmp_path: Path) -> tuple[Path, Path, int, list[int]]:
    """compose/'s config.yaml and teams.yaml, with their ports moved to free ones."""
    listen, backends = free_port(), [free_port(), free_port()]
    config = (ROOT / "compose" / "config.yaml").read_text()
    config = config.replace("127.0.0.1:8001", f"127.0.0.1:{backends[0]}").replace("127.0.0.1:8002", f"127.0.0.1:{backends[1]}")
    teams = (ROOT / "compose" / "teams.yaml").read_text().replace("127.0.0.1:8080", f"127.0.0.1:{listen}")
    assert re.search(r"^\s*proxy_listen:", teams, re.M) is None  # the default: a unix socket
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(config)
    (tmp_path / "conf" / "teams.yaml").write_text(teams)
    return tmp_path / "conf" / "config.yaml", tmp_path / "conf" / "teams.yaml", listen, backends


def _up(spawn, installed: Path, tmp_path: Path, *extra: str):
    config, teams, listen, backends = _compose_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMGATE_", "PYTHONPATH"))}
    svc = spawn([str(installed / "bin" / "llmgate"), "up", "--config", str(config), "--teams", str(teams),
                 "--run-dir", str(tmp_path / "run"), *extra], r"^llmgate is up|^llmgate: .*(exited|did not)",
                env=env, cwd=tmp_path, timeout=60)
    assert any("llmgate is up" in line for line in svc.lines), svc.output
    key = (tmp_path / "run" / "secrets.env").read_text().split("LLMGATE_DEMO_KEY=")[1].split()[0]
    return svc, f"http://127.0.0.1:{listen}", key, backends


def _chat(base: str, key: str):
    return http("POST", base + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                {"Authorization": f"Bearer {key}"}, timeout=30)


def test_llmgate_up_with_demo_answers_a_chat_completion(spawn, installed, tmp_path):
    svc, base, key, _ = _up(spawn, installed, tmp_path, "--demo")
    r = _chat(base, key)
    assert r.status == 200 and r.json()["object"] == "chat.completion", r.text
    assert "the built-in demo backend serves there" in svc.output


def test_without_demo_unreachable_deployments_are_named_and_answer_503(spawn, installed, tmp_path):
    svc, base, key, backends = _up(spawn, installed, tmp_path)
    for port in backends:
        assert any(f"nothing answers at 127.0.0.1:{port}" in line for line in svc.lines), svc.output
    assert "demo backend serves" not in svc.output
    r = _chat(base, key)
    assert r.status == 503 and r.json()["error"]["code"] == "backend_unreachable", r.text
