"""shared.keys: key generation, hashing and display."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from shared import keys

pytestmark = pytest.mark.unit

_URLSAFE = re.compile(r"^[A-Za-z0-9_-]+$")


def _random_part(value: str, prefix: str) -> bytes:
    assert value.startswith(prefix)
    body = value[len(prefix) :]
    assert _URLSAFE.match(body)
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def test_api_key_has_prefix_and_256_random_bits() -> None:
    key = keys.generate_api_key()
    assert key.startswith("tg_")
    assert len(key) == 3 + 43  # 32 bytes of urlsafe base64 without padding
    assert len(_random_part(key, "tg_")) == 32


def test_api_keys_are_distinct() -> None:
    generated = {keys.generate_api_key() for _ in range(200)}
    assert len(generated) == 200


def test_api_key_uses_the_os_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_token_urlsafe(nbytes: int) -> str:
        calls.append(nbytes)
        return "RANDOM"

    monkeypatch.setattr(keys.secrets, "token_urlsafe", fake_token_urlsafe)
    assert keys.generate_api_key() == "tg_RANDOM"
    assert calls == [32]


def test_token_has_admin_prefix_by_default() -> None:
    token = keys.generate_token()
    assert token.startswith("tga_")
    assert len(token) == 4 + 43
    assert len(_random_part(token, "tga_")) == 32


def test_token_with_custom_prefix() -> None:
    token = keys.generate_token("tgc_")
    assert token.startswith("tgc_")
    assert len(_random_part(token, "tgc_")) == 32


def test_hash_is_sha256_digest() -> None:
    assert keys.hash_key("abc") == bytes.fromhex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_hash_is_32_bytes_and_matches_hashlib() -> None:
    key = keys.generate_api_key()
    digest = keys.hash_key(key)
    assert len(digest) == 32
    assert digest == hashlib.sha256(key.encode()).digest()


def test_hash_of_non_ascii_key_is_sha256_of_utf8() -> None:
    assert keys.hash_key("tg_café") == hashlib.sha256("tg_café".encode()).digest()


def test_hash_is_case_sensitive() -> None:
    assert keys.hash_key("tg_AbC") != keys.hash_key("tg_abc")


def test_display_prefix_keeps_type_prefix_and_eight_characters() -> None:
    assert keys.display_prefix("tg_AbCd1234efgh5678") == "tg_AbCd1234"


def test_display_prefix_of_generated_key() -> None:
    key = keys.generate_api_key()
    assert keys.display_prefix(key) == key[:11]
    assert len(keys.display_prefix(key)) == 11


def test_display_prefix_without_api_key_prefix_is_eight_characters() -> None:
    assert keys.display_prefix("abcdefghijklmnop") == "abcdefgh"


def test_display_prefix_of_short_key_is_whole_key() -> None:
    assert keys.display_prefix("tg_abc") == "tg_abc"


def test_secrets_equal() -> None:
    assert keys.secrets_equal("tg_same", "tg_same") is True
    assert keys.secrets_equal("tg_same", "tg_Same") is False
    assert keys.secrets_equal("tg_same", "tg_same_longer") is False
    assert keys.secrets_equal("pässwörd", "pässwörd") is True
