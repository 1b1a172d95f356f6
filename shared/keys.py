"""API keys and other bearer secrets: generation and hashing, in one place.

Keys carry 256 bits from the OS CSPRNG, so a single SHA-256 is the right hash: there is
nothing to brute-force, and a data plane can look a key up in a dict by its hash in O(1).
The plaintext is shown to the operator once and never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

API_KEY_PREFIX: Final = "tg_"
ADMIN_TOKEN_PREFIX: Final = "tga_"  # noqa: S105 - a prefix, not a secret
KEY_RANDOM_BYTES: Final = 32
# Characters after the type prefix kept for display ("tg_AbCd1234…"); 48 of 256 bits.
DISPLAY_PREFIX_CHARS: Final = 8


def generate_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def generate_token(prefix: str = ADMIN_TOKEN_PREFIX) -> str:
    return prefix + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def hash_key(key: str) -> bytes:
    """The 32-byte digest stored and shipped in snapshots in place of the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def display_prefix(key: str) -> str:
    """The part of a key safe to show in listings."""
    head = API_KEY_PREFIX if key.startswith(API_KEY_PREFIX) else ""
    return key[: len(head) + DISPLAY_PREFIX_CHARS]


def secrets_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))
