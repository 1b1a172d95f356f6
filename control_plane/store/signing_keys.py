"""The gateway's own token-signing keys: ES256 key pairs the data planes sign OAuth access tokens
with (``POST /oauth/token``). The control plane creates the first at start when none is live.

The private key is stored as PKCS#8 PEM (no KMS here; see migration 0004) and leaves this module
only through the snapshot builder: no record returned from here carries it, and the audit trail
keeps only the public key.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from control_plane.jwks import thumbprint
from control_plane.store.audit import Actor, record
from control_plane.store.config import bump_version
from control_plane.store.db import Database

log = logging.getLogger(__name__)

ALGORITHM: Final = "ES256"
SYSTEM: Final = Actor("control-plane", "system")
# Serialises first-start key creation across replicas starting together ("tgsk").
_LOCK_ID: Final = 0x7467_736B


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    kid: str
    algorithm: str
    public_jwk: dict[str, Any]
    created_at: datetime
    retired_at: datetime | None


@dataclass(frozen=True, slots=True)
class KeyPair:
    kid: str
    private_key_pem: str
    public_jwk: dict[str, Any]


_COLUMNS: Final = "kid, algorithm, public_jwk::text AS public_jwk, created_at, retired_at"


def _record(row: asyncpg.Record) -> SigningKeyRecord:
    return SigningKeyRecord(**{**dict(row), "public_jwk": json.loads(row["public_jwk"])})


def generate() -> KeyPair:
    """A new P-256 key pair; kid is the RFC 7638 thumbprint of the public key."""
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = dict(ECAlgorithm.to_jwk(private.public_key(), as_dict=True))
    kid = thumbprint(public)
    return KeyPair(kid, pem, {**public, "kid": kid, "alg": ALGORITHM, "use": "sig"})


async def ensure_live(db: Database) -> SigningKeyRecord:
    """Return the newest live signing key, creating one first if none is live. Safe when several
    replicas start at once: they take turns under an advisory lock, and only the first creates."""
    async with db.transaction() as conn:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC, kid LIMIT 1"
        )
        if row is not None:
            return _record(row)
        version = await bump_version(conn)
        pair = generate()
        row = await conn.fetchrow(
            f"""INSERT INTO signing_keys (kid, algorithm, private_key_pem, public_jwk)
                VALUES ($1, $2, $3, $4::jsonb) RETURNING {_COLUMNS}""",
            pair.kid,
            ALGORITHM,
            pair.private_key_pem,
            json.dumps(pair.public_jwk),
        )
        key = _record(row)
        await record(
            conn,
            SYSTEM,
            "create",
            "signing_key",
            key.kid,
            version,
            after={"kid": key.kid, "algorithm": key.algorithm, "public_jwk": key.public_jwk},
        )
    log.info("created the token signing key", extra={"kid": key.kid, "config_version": version})
    return key


async def list_all(db: Database) -> list[SigningKeyRecord]:
    """Every signing key, newest first; live ones have no ``retired_at``."""
    async with db.connection() as conn:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM signing_keys ORDER BY created_at DESC, kid")
    return [_record(r) for r in rows]


async def rotate(db: Database, actor: Actor) -> tuple[SigningKeyRecord, int]:
    """Create a new signing key, which data planes sign with from the next snapshot on. The key
    it replaces stays live (published and accepted) so that tokens it signed keep working until
    they expire; every older key is retired, and tokens it signed stop working."""
    async with db.transaction() as conn:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        version = await bump_version(conn)
        pair = generate()
        retired = await conn.fetch(
            """UPDATE signing_keys SET retired_at = now()
                WHERE retired_at IS NULL AND kid NOT IN (
                    SELECT kid FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC, kid LIMIT 1)
                RETURNING kid"""
        )
        # clock_timestamp(), not now(): the new key must sort after the one it replaces even when
        # both were created in transactions that started in the same instant.
        row = await conn.fetchrow(
            f"""INSERT INTO signing_keys (kid, algorithm, private_key_pem, public_jwk, created_at)
                VALUES ($1, $2, $3, $4::jsonb, clock_timestamp()) RETURNING {_COLUMNS}""",
            pair.kid,
            ALGORITHM,
            pair.private_key_pem,
            json.dumps(pair.public_jwk),
        )
        key = _record(row)
        await record(
            conn,
            actor,
            "rotate",
            "signing_key",
            key.kid,
            version,
            after={"kid": key.kid, "algorithm": key.algorithm, "retired": [r["kid"] for r in retired]},
        )
    log.info("rotated the token signing key", extra={"kid": key.kid, "config_version": version})
    return key, version
