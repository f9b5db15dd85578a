"""Benchmark of `llmgate usage`: lines per second and peak memory over generated logs of growing size.

Prints one row per log size (N/4, N and 2N lines); memory that does not grow with the log is the point
(groups and their latency buckets are kept, not lines). Run by `make bench`; `--lines N` (default 1,000,000).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEAMS = [f"team-{i}" for i in range(20)]
MODELS = ["llama-3.1-8b-instruct", "llama-3.1-70b-instruct", "qwen2.5-7b", "bge-small"]


def generate(path: Path, lines: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    day0 = 1
    with open(path, "w") as f:
        for i in range(lines):
            day = day0 + i * 30 // lines
            prompt, completion = rng.randint(5, 3000), rng.randint(1, 800)
            f.write(json.dumps({
                "ts": f"2026-11-{day:02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00.000Z",
                "request_id": f"{i:032x}", "team": rng.choice(TEAMS), "key_id": f"k{rng.randint(0, 5)}",
                "model": rng.choice(MODELS), "endpoint": "chat", "deployment": "d/0",
                "status": rng.choice((200,) * 40 + (429, 500, 403, 400)), "stream": rng.random() < 0.5,
                "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "cost": (prompt * 2e-7 + completion * 6e-7), "latency_ms": rng.lognormvariate(5, 1),
                "ttft_ms": rng.lognormvariate(3, 1), "retries": 0, "fallback": None, "error": None,
            }, separators=(",", ":")) + "\n")


def measure(log_dir: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB, lines) of one `llmgate usage --format json` run."""
    cmd = ["/usr/bin/env", "time", "-f", "%M", sys.executable, "-m", "controller.cli", "usage", "--logs", str(log_dir),
           "--format", "json", "--by", "team,model,day"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"llmgate usage failed: {run.stderr}")
    report = json.loads(run.stdout)
    peak_kib = int(run.stderr.strip().splitlines()[-1])
    return elapsed, peak_kib / 1024, sum(g["requests"] for g in report["groups"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    sizes = sorted({max(1000, args.lines // 4), args.lines, 2 * args.lines})
    print(f"llmgate usage over generated usage logs (20 teams, 4 models, 30 days; {os.cpu_count()} CPUs)")
    print(f"{'lines':>10}  {'MB':>7}  {'seconds':>8}  {'lines/s':>10}  {'peak RSS MiB':>12}")
    with tempfile.TemporaryDirectory(prefix="llmgate-bench-usage-") as tmp:
        rows = []
        for n in sizes:
            d = Path(tmp) / f"logs-{n}"
            d.mkdir()
            generate(d / "usage.jsonl", n)
            mb = (d / "usage.jsonl").stat().st_size / 1e6
            seconds, rss, counted = measure(d)
            if counted != n:
                raise SystemExit(f"the report counted {counted} requests of {n}")
            rows.append((n, mb, seconds, n / seconds, rss))
            print(f"{n:>10,}  {mb:>7.0f}  {seconds:>8.2f}  {n / seconds:>10,.0f}  {rss:>12.1f}")
    target = next(r for r in rows if r[0] == args.lines)
    largest = rows[-1]
    print(f"lines/s at {target[0]:,} lines: {target[3]:,.0f} (goal >= 300,000: "
          f"{'met' if target[3] >= 300_000 else 'missed'}); peak memory {target[4]:.1f} MiB at {target[0]:,} lines, "
          f"{largest[4]:.1f} MiB at {largest[0]:,} (memory holds groups and their latency buckets, not lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
