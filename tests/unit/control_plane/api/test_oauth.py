"""control_plane.api.oauth: what an OAuth client may be created with."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from control_plane.api.oauth import ClientCreate

pytestmark = pytest.mark.unit


def test_scopes_are_deduplicated_in_order_and_name_trimmed() -> None:
    body = ClientCreate(name="  billing  ", scopes=["b:read", "a.write", "b:read", "x_y-z"])
    assert (body.name, body.scopes) == ("billing", ["b:read", "a.write", "x_y-z"])


def test_scopes_default_to_none() -> None:
    assert ClientCreate(name="job").scopes == []


def test_fifty_scopes_are_allowed() -> None:
    assert len(ClientCreate(name="job", scopes=[f"s{i}" for i in range(50)]).scopes) == 50


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "job", "scopes": ["has space"]}, "scope 'has space' must be 1..64 characters"),
        ({"name": "job", "scopes": ["s" * 65]}, "must be 1..64 characters"),
        ({"name": "job", "scopes": [""]}, "must be 1..64 characters"),
        ({"name": "job", "scopes": ["a/b"]}, "must be 1..64 characters"),
        ({"name": "job", "scopes": [f"s{i}" for i in range(51)]}, "at most 50 items"),
        ({"name": "job", "scopes": "read"}, "valid list"),
        ({"name": " "}, "must be non-empty printable text"),
        ({"name": "job", "client_secret": "mine"}, "Extra inputs are not permitted"),
    ],
    ids=["space", "too_long", "empty", "slash", "too_many", "not_a_list", "blank_name", "own_secret"],
)
def test_refused_client(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        ClientCreate(**fields)  # type: ignore[arg-type]
