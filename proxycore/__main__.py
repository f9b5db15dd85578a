"""`python -m proxycore` (and `llmgate proxy`): the OpenAI-compatible API, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import sys

from proxycore.options import HELP, add_arguments
from proxycore.serve import run_proxy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmgate proxy", description=HELP,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run_proxy(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
