"""`llmgate up` as one supervised tree: the banner's curl works, crashed children come back, SIGTERM stops all."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

from support import LLMGATE, free_port, http, launch_gateway, start_fake_vllm, start_gateway, wait_until, write_config

TEAMS = """  demo:
    keys: [os.environ/LLMGATE_DEMO_KEY]
"""


def children(pid: int) -> dict[int, str]:
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]): line.split(None, 1)[1] for line in out.strip().splitlines()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[1].split()[0] != "Z"


def test_banner_curl_command_works(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, TEAMS)
    lines = gw.svc.lines
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
    command = "\n".join(lines[start:start + 3])
    assert f"127.0.0.1:{gw.port}" in command
    key = (gw.run_dir / "secrets.env").read_text().split("LLMGATE_DEMO_KEY=")[1].split()[0]
    assert key not in gw.svc.output  # read from its file by the shell, never printed
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert '"chat.completion"' in run.stdout, run.stdout + run.stderr


def test_crashed_children_are_restarted(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, TEAMS)
    key = (gw.run_dir / "secrets.env").read_text().split("LLMGATE_DEMO_KEY=")[1].split()[0]
    body = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}

    def ok() -> bool:
        try:
            return http("POST", gw.base + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"}).status == 200
        except OSError:  # refused while nginx is being restarted
            return False

    kids = children(gw.svc.pid)
    proxy = next(pid for pid, args in kids.items() if "-m proxycore " in args)
    nginx = next(pid for pid, args in kids.items() if "nginx" in args)
    os.kill(proxy, signal.SIGKILL)
    assert wait_until(lambda: "proxycore exited" in gw.svc.output, timeout=5)
    assert wait_until(ok, timeout=10)
    workers = list(children(nginx))
    assert workers
    os.kill(nginx, signal.SIGKILL)
    assert wait_until(lambda: "nginx exited" in gw.svc.output, timeout=5)
    assert wait_until(ok, timeout=10)
    for pid in workers:  # the crashed master's workers do not go on serving the old config
        assert wait_until(lambda pid=pid: not alive(pid), timeout=5), f"nginx worker {pid} outlived its master"
    assert re.search(r"restarting in \d", gw.svc.output)


def test_sigterm_stops_the_whole_tree(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, TEAMS, lookup="service")
    kids = children(gw.svc.pid)
    assert len(kids) == 3  # proxycore, authsvc, nginx (the fake backend belongs to the test)
    grandkids = [g for k in kids for g in children(k)]  # nginx workers
    assert gw.svc.stop() == 0
    for pid in [*kids, *grandkids]:
        assert wait_until(lambda pid=pid: not alive(pid), timeout=5), f"{pid} outlived llmgate up"
    assert "llmgate: stopping" in gw.svc.output


def test_sigusr1_reopens_logs_without_restarting_anything(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, TEAMS, lookup="service")
    before = children(gw.svc.pid)
    (gw.log_dir / "access.jsonl").rename(gw.log_dir / "access.jsonl.1")
    (gw.log_dir / "usage.jsonl").exists() and (gw.log_dir / "usage.jsonl").rename(gw.log_dir / "usage.jsonl.1")
    gw.svc.signal(signal.SIGUSR1)
    key = (gw.run_dir / "secrets.env").read_text().split("LLMGATE_DEMO_KEY=")[1].split()[0]
    body = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert wait_until(lambda: (gw.log_dir / "access.jsonl").exists(), timeout=5)
    assert http("POST", gw.base + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"}).status == 200
    assert wait_until(lambda: (gw.log_dir / "usage.jsonl").exists(), timeout=5)
    assert "exited" not in gw.svc.output
    assert set(children(gw.svc.pid)) == set(before)


def test_two_gateways_on_one_machine_need_no_ports_but_their_own(spawn, tmp_path):
    """proxycore and authsvc listen on unix sockets of their run by default: nothing else to choose."""
    _, api_base = start_fake_vllm(spawn)
    bases = []
    for name in ("one", "two"):
        directory = tmp_path / name
        directory.mkdir()
        port = free_port()
        write_config(directory / "config.yaml", [{"model_name": "llama-3.1-8b-instruct", "api_base": api_base}])
        (directory / "teams.yaml").write_text(f"gateway:\n  listen: 127.0.0.1:{port}\n  key_lookup: service\n"
                                              f"teams:\n{TEAMS}")
        svc = launch_gateway(spawn, directory)
        assert "proxycore unix:" in svc.output, svc.output
        bases.append((f"http://127.0.0.1:{port}", directory))
    body = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for base, directory in bases:
        key = (directory / "run" / "secrets.env").read_text().split("LLMGATE_DEMO_KEY=")[1].split()[0]
        assert http("POST", base + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"}).status == 200


def test_a_taken_port_is_one_line_that_names_the_setting(spawn, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path / "config.yaml", [{"model_name": "m", "api_base": "http://127.0.0.1:9/v1"}])
        run = subprocess.run([*LLMGATE, "proxy", "--config", str(cfg), "--port", str(port)], capture_output=True,
                             text=True, timeout=30)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    line = [x for x in run.stderr.splitlines() if "cannot listen" in x]
    assert len(line) == 1 and f"127.0.0.1:{port}" in line[0] and "gateway.proxy_listen" in line[0], run.stderr
