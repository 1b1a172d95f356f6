"""What every endpoint receives: the process state and the authenticated caller."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from control_plane.auth import Authenticator, Principal
from control_plane.cluster.snapshots import SnapshotCache
from control_plane.errors import NotFound
from control_plane.store.db import Database
from shared.settings import Settings


@dataclass(frozen=True, slots=True)
class AppState:
    settings: Settings
    db: Database
    cache: SnapshotCache
    authenticator: Authenticator


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.tenantgate
    return state


_bearer = HTTPBearer(auto_error=False, description="An admin token")


async def get_principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    return await get_state(request).authenticator.authenticate(request.headers.get("authorization"))


State = Annotated[AppState, Depends(get_state)]
Caller = Annotated[Principal, Depends(get_principal)]


def object_id(value: str, what: str) -> str:
    """A path id as the store wants it; anything that is not a UUID names nothing (404)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound(f"no such {what}") from None


def committed(state: AppState, response: Response, version: int) -> None:
    """Tell the caller and the snapshot builder that ``version`` is committed."""
    response.headers["X-Config-Version"] = str(version)
    state.cache.poke()
