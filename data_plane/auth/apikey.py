"""API keys: ``X-API-Key`` hashed once and looked up in a table built per snapshot.

A key is accepted only in its header. One sent in the query string would end up in access
logs, browser histories and the upstream's logs, so such a request is refused before anything
reads the key (:func:`in_query`) and the key is never echoed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Iterable, Mapping
from typing import Final
from urllib.parse import unquote_plus

from data_plane.auth.identity import API_KEY_CHALLENGE, Identity, www_authenticate
from data_plane.errors import Unauthenticated
from shared.shardmap import MASK as SHARD_MASK
from shared.shardmap import ShardMap
from shared.snapshot import ApiKey, Tenant

HEADER: Final = "X-API-Key"
MAX_KEY_LENGTH: Final = 256
# Query parameter names (compared in lower case, after percent-decoding) that carry a key.
QUERY_NAMES: Final = frozenset(
    {"api_key", "apikey", "api-key", "x-api-key", "x_api_key", "xapikey", "key", "access_token", "api_token"}
)
_CHALLENGE: Final = www_authenticate(API_KEY_CHALLENGE)


class KeyTable:
    """SHA-256 of a key → the identity it proves. Built once per snapshot; revoked keys and
    keys of deleted tenants are absent from the snapshot, so they are absent here.

    The table is a :class:`ShardMap`: a snapshot delta that adds or revokes a key copies one
    shard of the table (:meth:`patched`), and a lookup is still one dict probe."""

    __slots__ = ("_by_hash", "_shards")

    def __init__(self, keys: Iterable[ApiKey], tenants: Mapping[str, Tenant]) -> None:
        self._set(ShardMap((k.key_hash, Identity(tenants[k.tenant_id], frozenset(), False, k.id)) for k in keys))

    @classmethod
    def filling(cls, keys: Iterable[ApiKey], tenants: Mapping[str, Tenant]) -> Generator[None, None, KeyTable]:
        """The table of ``keys`` built a little at a time (``table = yield from KeyTable.filling(...)``)."""
        by_hash = yield from ShardMap.filling(
            (k.key_hash, Identity(tenants[k.tenant_id], frozenset(), False, k.id)) for k in keys
        )
        table = KeyTable.__new__(KeyTable)
        table._set(by_hash)
        return table

    def _set(self, by_hash: ShardMap[bytes, Identity]) -> None:
        self._by_hash = by_hash
        self._shards = by_hash.shards

    def __len__(self) -> int:
        return len(self._by_hash)

    def patched(self, removed: Iterable[bytes], keys: Iterable[ApiKey], tenants: Mapping[str, Tenant]) -> KeyTable:
        """This table without the ``removed`` hashes and with ``keys`` (re)added: what a snapshot
        delta changed (data_plane/snapshot.py), at the cost of the keys it names, not of all."""
        table = KeyTable.__new__(KeyTable)
        table._set(
            self._by_hash.patched(
                removed, [(k.key_hash, Identity(tenants[k.tenant_id], frozenset(), False, k.id)) for k in keys]
            )
        )
        return table

    def lookup(self, key: str) -> Identity:
        """The identity ``key`` proves; :class:`Unauthenticated` if none.

        A dict lookup by digest: the time taken does not depend on how much of a wrong key
        matches a real one, so there is nothing to learn from timing. Keys are case-sensitive.
        """
        if not key or len(key) > MAX_KEY_LENGTH:
            raise Unauthenticated("invalid API key", code="invalid_api_key", headers=_CHALLENGE)
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        identity = self._shards[hash(digest) & SHARD_MASK].get(digest)
        if identity is None:
            raise Unauthenticated("invalid API key", code="invalid_api_key", headers=_CHALLENGE)
        return identity


def in_query(raw_query: str) -> bool:
    """Whether a query string carries a parameter named like an API key or access token."""
    for part in raw_query.split("&"):
        name = part.partition("=")[0]
        if "%" in name or "+" in name:
            name = unquote_plus(name, errors="replace")
        if name.lower() in QUERY_NAMES:
            return True
    return False
