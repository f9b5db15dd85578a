"""The contracts between llmgate's processes, each defined once: how a client's key is read from its
header and hashed, how keys are compared, what authsvc tells nginx about a virtual key, and the
internal key of a dedicated instance.

nginx/llmgate.js implements `bearer_token` and `key_hash` again in njs (nginx cannot import Python);
tests/test_key_hash_contract.py checks, through a real nginx, that both give the same hash for the same header.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import orjson

# A request's headers between the processes.
TEAM_HEADER = "X-Team"  # set by nginx from the key; proxycore believes it only beside the internal key
KEY_ID_HEADER = "X-Key-Id"  # the key's label, or the first 12 hex digits of its hash
KEY_POLICY_HEADER = "X-Key-Policy"  # a virtual key's limits, from authsvc (JSON, see KeyPolicy)
REQUEST_ID_HEADER = "X-Request-ID"

MAX_AUTHORIZATION = 600  # longer Authorization headers carry no key we accept


def bearer_token(header: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (the scheme in any case, the token trimmed), else None."""
    if not header or len(header) > MAX_AUTHORIZATION or header[:7].lower() != "bearer ":
        return None
    return header[7:].strip() or None


def key_hash(token: str) -> str:
    """The sha256 hex of a key: what teams.yaml, the key database, nginx's maps and caches hold.

    aiohttp decodes header bytes with surrogateescape, and so does Python's argv: encoding the same
    way gives back the bytes the client (or the shell) sent, whatever they are.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def same_key(presented: str | None, expected: str | None) -> bool:
    """Constant-time comparison of two keys; nothing matches a missing or empty key."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


def dedicated_internal_key(internal_key: str, team: str) -> str:
    """A dedicated instance's own internal key, derived so that no other process can speak for its team."""
    return "sk-ded-" + hmac.new(internal_key.encode(), f"dedicated:{team}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """A virtual key's limits, as authsvc passes them on through nginx (X-Key-Policy, JSON)."""

    key_hash: str
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    parallel: int | None = None
    max_budget: float | None = None
    spend: float = 0.0

    @property
    def meter_name(self) -> str:
        return "key-" + self.key_hash[:32]

    def to_header(self) -> str:
        return orjson.dumps({"h": self.key_hash, "m": sorted(self.models) if self.models is not None else None,
                             "rpm": self.rpm, "tpm": self.tpm, "par": self.parallel, "max": self.max_budget,
                             "spent": self.spend}).decode()

    @classmethod
    def from_header(cls, header: str) -> KeyPolicy | None:
        """None for a header that is not a policy (then the request is refused: policies come only from authsvc)."""
        try:
            d = orjson.loads(header)
            h = d["h"]
            if not isinstance(h, str) or len(h) != 64:
                return None
            m = d.get("m")
            return cls(h, frozenset(m) if isinstance(m, list) else None, _positive(d.get("rpm")),
                       _positive(d.get("tpm")), _positive(d.get("par")),
                       float(d["max"]) if isinstance(d.get("max"), (int, float)) else None,
                       float(d.get("spent") or 0.0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


def _positive(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
