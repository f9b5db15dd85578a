"""A full disk under the usage log fails no request and tears no line: lines wait in memory and are written when
space returns, and what does not fit in the spool is counted as dropped. The log lives on a real 1 MiB tmpfs
that the test fills (mounting needs root, as `make test` runs)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import MASTER_KEY, http, start_fake_vllm, start_proxy, wait_until, write_config

MODEL = "llama-3.1-8b-instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}


@pytest.fixture
def small_disk(tmp_path):
    assert os.geteuid() == 0, "this test mounts a tmpfs: run it as root (make test does, as CI)"
    mount = tmp_path / "logs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk) -> None:
    """Take every free block of the tmpfs."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def send(base: str, n: int) -> list[int]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: http("POST", base + "/v1/chat/completions", BODY, AUTH).status, range(n)))


def metric(base: str, name: str) -> float:
    text = http("GET", base + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def parsed_lines(log) -> list[dict]:
    raw = log.read_bytes()
    assert raw.endswith(b"\n") or not raw
    return [json.loads(line) for line in raw.splitlines()]  # every line whole: json.loads raises on a torn one


def start(spawn, tmp_path, disk, *extra: str):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base}])
    proxy, base = start_proxy(spawn, cfg, "--usage-log", str(disk / "usage.jsonl"), *extra)
    return proxy, base, disk / "usage.jsonl"


def test_lines_wait_while_the_disk_is_full_and_are_written_when_space_returns(spawn, tmp_path, small_disk):
    proxy, base, log = start(spawn, tmp_path, small_disk)
    assert send(base, 20) == [200] * 20
    fill(small_disk)
    assert send(base, 300) == [200] * 300  # no request fails for its usage line
    ready = http("GET", base + "/health/readiness")
    assert ready.status == 503 and "No space left on device" in ready.json()["usage_log"]
    assert metric(base, "llmgate_usage_log_failing") == 1
    assert len(parsed_lines(log)) < 320  # some lines wait in memory; none is torn meanwhile
    (small_disk / "filler").unlink()
    assert wait_until(lambda: http("GET", base + "/health/readiness").status == 200, timeout=10), proxy.output
    lines = parsed_lines(log)
    assert len(lines) == 320 and len({line["request_id"] for line in lines}) == 320
    assert metric(base, "llmgate_usage_lines_dropped_total") == 0
    assert "takes lines again" in proxy.output


def test_lines_beyond_the_spool_are_counted_as_dropped(spawn, tmp_path, small_disk):
    proxy, base, log = start(spawn, tmp_path, small_disk, "--usage-spool-lines", "10")
    assert send(base, 5) == [200] * 5
    fill(small_disk)
    assert send(base, 60) == [200] * 60
    assert wait_until(lambda: metric(base, "llmgate_usage_lines_dropped_total") > 0, timeout=5)
    (small_disk / "filler").unlink()
    assert wait_until(lambda: http("GET", base + "/health/readiness").status == 200, timeout=10), proxy.output
    lines = parsed_lines(log)
    dropped = metric(base, "llmgate_usage_lines_dropped_total")
    assert len(lines) + dropped == 65  # every request either logged or counted
    assert "spool is full" in proxy.output
