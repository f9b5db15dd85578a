"""Keys the gateway needs but the operator did not set: generated once by `llmgate up`, kept in
`<run-dir>/secrets.env` (mode 0600), and read back by the commands that work on the same files."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from controller.model.gateway import INTERNAL_KEY_ENV

MASTER_KEY_ENV = "LLMGATE_MASTER_KEY"
DEMO_KEY_ENV = "LLMGATE_DEMO_KEY"
GENERATED = (MASTER_KEY_ENV, INTERNAL_KEY_ENV, DEMO_KEY_ENV)


def secrets_file(run_dir: Path) -> Path:
    return run_dir / "secrets.env"


def _read(path: Path) -> dict[str, str]:
    saved: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            if value:
                saved[name.strip()] = value.strip()
    return saved


def load_saved_secrets(run_dir: Path) -> None:
    """The keys `llmgate up` generated, into the environment (what is set there already wins)."""
    for name, value in _read(secrets_file(run_dir)).items():
        os.environ.setdefault(name, value)


def ensure_secrets(run_dir: Path) -> None:
    """Generate what is neither in the environment nor saved, save it, and put all of it in the environment."""
    path = secrets_file(run_dir)
    saved = _read(path)
    missing = [n for n in GENERATED if n not in os.environ and n not in saved]
    for name in missing:
        saved[name] = "sk-" + secrets.token_urlsafe(32)
    if missing:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in saved.items())
    for name, value in saved.items():
        os.environ.setdefault(name, value)
