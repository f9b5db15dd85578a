"""The benchmark programs run to the end (their figures are for docs/performance.md, never asserted here)."""

from __future__ import annotations

import subprocess
import sys

from support import ROOT


def test_bench_proxy_quick_runs():
    run = subprocess.run([sys.executable, "bench/bench_proxy.py", "--quick", "--markdown"], capture_output=True,
                         text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for row in ("| direct |", "| proxycore |", "| nginx |", "| gateway-map |", "| gateway-service |",
                "| db-virtual-key |", "proxycore CPU / backend CPU per request"):
        assert row in run.stdout


def test_bench_cancel_quick_runs():
    run = subprocess.run([sys.executable, "bench/bench_cancel.py", "--quick"], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith(("direct ", "gateway "))]
    assert len(rows) == 8  # direct and gateway, idle and loaded, streamed and not
    assert all(row[-1] == "0" for row in rows), run.stdout  # every cancel reached the backend (the `lost` column)


def test_bench_usage_runs():
    run = subprocess.run([sys.executable, "bench/bench_usage.py", "--lines", "20000"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "lines/s at 20,000 lines" in run.stdout
