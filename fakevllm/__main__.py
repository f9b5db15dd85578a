"""`python -m fakevllm` (and `llmgate fake-vllm`): serve the fake vLLM until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import sys

from fakevllm.server import run_fake_vllm


def build_parser(prog: str = "llmgate fake-vllm") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="a fake vLLM OpenAI-compatible server (tests, demo, benchmarks)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help="served model name (repeatable); default: llama-3.1-8b-instruct")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before the response starts")
    p.add_argument("--stream-chunks", type=int, default=8, help="content chunks per streamed response")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between streamed chunks")
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction of requests answered with a 500")
    p.add_argument("--seed", type=int, default=None, help="seed for --fail-rate decisions")
    p.add_argument("--api-key", default=None, help="require this bearer key, like `vllm serve --api-key`")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_fake_vllm(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
