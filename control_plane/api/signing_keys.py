"""``/admin/signing-keys``: the keys data planes sign OAuth access tokens with
(``POST /oauth/token``), and their rotation. Only public parts are ever returned."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from control_plane.api.deps import Caller, State, committed
from control_plane.store import signing_keys as store

router = APIRouter(prefix="/admin/signing-keys", tags=["signing keys"])


class SigningKeyOut(BaseModel):
    kid: str
    algorithm: str
    public_jwk: dict[str, Any] = Field(description="As published at /.well-known/jwks.json on every data plane.")
    created_at: datetime
    retired_at: datetime | None = Field(description="Retired keys are no longer published nor accepted.")


class SigningKeyList(BaseModel):
    items: list[SigningKeyOut] = Field(description="Newest first: the first live key is the one that signs.")


class SigningKeyRotated(SigningKeyOut):
    config_version: int


def _out(key: store.SigningKeyRecord) -> dict[str, Any]:
    return {
        "kid": key.kid,
        "algorithm": key.algorithm,
        "public_jwk": key.public_jwk,
        "created_at": key.created_at,
        "retired_at": key.retired_at,
    }


@router.get("", response_model=SigningKeyList)
async def list_signing_keys(state: State, caller: Caller) -> dict[str, Any]:
    caller.require_global_read()
    return {"items": [_out(k) for k in await store.list_all(state.db)]}


@router.post("/rotate", status_code=201, response_model=SigningKeyRotated)
async def rotate_signing_key(state: State, caller: Caller, response: Response) -> dict[str, Any]:
    """Create a new signing key. Data planes sign with it from the next snapshot; the previous key
    stays published and accepted so its tokens live out their lifetime; older keys are retired."""
    caller.require_admin()
    key, version = await store.rotate(state.db, caller.actor)
    committed(state, response, version)
    return {**_out(key), "config_version": version}
