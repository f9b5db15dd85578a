"""`python -m authsvc` (and `llmgate auth`): the key checks nginx asks for, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import sys

from authsvc.options import HELP, add_arguments
from authsvc.server import run_authsvc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmgate auth", description=HELP,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run_authsvc(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
