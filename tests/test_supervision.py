"""Workers that crash or hang come back, whatever their number; one that cannot start is reported, not retried
silently; `llmgate up` kills and restarts a child that stops answering."""

from __future__ import annotations

import os
import signal
import subprocess

from support import (
    LLMGATE,
    MASTER_KEY,
    free_port,
    http,
    sha256_hex,
    start_fake_vllm,
    start_gateway,
    wait_until,
    write_config,
)

MODEL = "llama-3.1-8b-instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
KEY = "sk-supervision-0123456789"


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def proxycore_of(gateway_pid: int) -> int:
    for pid in children(gateway_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"\0proxycore\0" in f.read():
                return pid
    raise AssertionError("no proxycore under llmgate up")


def answers(url: str, headers: dict[str, str]) -> bool:
    try:
        return http("POST", url, BODY, headers, timeout=2).status == 200
    except OSError:
        return False


def start_workers(spawn, tmp_path, *extra: str):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base}])
    port = free_port()

    svc = spawn([*LLMGATE, "proxy", "--config", str(cfg), "--port", str(port), "--workers", "2", *extra],
                r"listening on|could not start")
    return svc, f"http://127.0.0.1:{port}"


def test_every_killed_worker_is_replaced_and_serves_within_2_s_three_times_in_a_row(spawn, tmp_path):
    svc, base = start_workers(spawn, tmp_path)
    auth = {"Authorization": f"Bearer {MASTER_KEY}"}
    for round_ in range(3):
        workers = children(svc.pid)
        assert len(workers) == 2, (round_, workers, svc.output)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: answers(base + "/v1/chat/completions", auth), timeout=2.0), (round_, svc.output)
        assert wait_until(lambda workers=workers: len(set(children(svc.pid)) - set(workers)) == 2, timeout=2.0)
    assert svc.output.count("exited (signal 9); starting another") == 6


def test_a_hung_worker_is_killed_and_replaced(spawn, tmp_path):
    svc, base = start_workers(spawn, tmp_path)
    frozen = children(svc.pid)[0]
    os.kill(frozen, signal.SIGSTOP)  # its event loop stops: no heartbeat, no answers
    assert wait_until(lambda: f"proxy worker {frozen} sent no heartbeat" in svc.output, timeout=15), svc.output
    assert wait_until(lambda: frozen not in children(svc.pid) and len(children(svc.pid)) == 2, timeout=5)
    auth = {"Authorization": f"Bearer {MASTER_KEY}"}
    assert all(answers(base + "/v1/chat/completions", auth) for _ in range(10))


def test_a_worker_that_cannot_start_stops_proxycore_with_one_line(spawn, tmp_path):
    log = tmp_path / "usage.jsonl"
    svc, _ = start_workers(spawn, tmp_path, "--usage-log", str(log))
    log.unlink()
    log.mkdir()  # a worker cannot open its usage log any more: every new one fails at start
    for pid in children(svc.pid):
        os.kill(pid, signal.SIGKILL)
    assert svc.proc.wait(timeout=30) == 1
    assert "a proxy worker could not start 5 times in a row" in svc.output, svc.output


def test_workers_stop_when_their_supervisor_is_killed(spawn, tmp_path):
    svc, _ = start_workers(spawn, tmp_path)
    workers = children(svc.pid)
    os.kill(svc.pid, signal.SIGKILL)
    svc.proc.wait(timeout=5)
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), timeout=5), svc.output
    assert "supervisor is gone; this worker stops" in svc.output


def test_gateway_workers_come_back_and_a_hung_proxycore_is_restarted(spawn, tmp_path):
    teams = f"  team-a:\n    keys: [sha256:{sha256_hex(KEY)}]\n"
    gw = start_gateway(spawn, tmp_path, teams, extra="  workers: 2\n")
    url, auth = gw.base + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    parent = proxycore_of(gw.svc.pid)
    for round_ in range(3):
        for pid in children(parent):
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: answers(url, auth), timeout=2.0), (round_, gw.svc.output)
    # a whole proxycore that stops answering (here: its supervisor and workers frozen) is killed and restarted
    frozen = [parent, *children(parent)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    assert wait_until(lambda: "proxycore did not answer its liveness check" in gw.svc.output, timeout=20), gw.svc.output
    assert wait_until(lambda: answers(url, auth), timeout=15), gw.svc.output
    assert proxycore_of(gw.svc.pid) != parent
