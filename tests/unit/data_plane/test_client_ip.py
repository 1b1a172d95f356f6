"""The client address the gateway hashes on (``hash_on: ip``): forged hops are never believed."""

from __future__ import annotations

from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from data_plane.proxy import Proxy
from data_plane.upstream.client import UpstreamClient
from shared import settings

pytestmark = pytest.mark.unit


def _proxy(trusted: str) -> Proxy:
    env = {"TENANTGATE_TRUSTED_PROXIES": trusted} if trusted else {}
    return Proxy(UpstreamClient(), settings.load(environ=env), None)


def _request(peer: str, *forwarded_for: str) -> object:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (peer, 40000) if name == "peername" else default
    headers = CIMultiDict(("X-Forwarded-For", v) for v in forwarded_for)
    return make_mocked_request("GET", "/", headers=headers, transport=transport)


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded_for", "client"),
    [
        ("", "198.51.100.7", ("203.0.113.9",), "198.51.100.7"),  # nothing trusted: the peer
        ("10.0.0.0/8", "198.51.100.7", ("203.0.113.9",), "198.51.100.7"),  # untrusted peer's header ignored
        ("10.0.0.0/8", "10.0.0.2", ("203.0.113.9",), "203.0.113.9"),
        ("10.0.0.0/8", "10.0.0.2", ("1.2.3.4, 203.0.113.9",), "203.0.113.9"),  # a prepended hop is not believed
        ("10.0.0.0/8", "10.0.0.2", ("1.2.3.4", "203.0.113.9, 10.0.0.5"), "203.0.113.9"),  # two trusted hops
        ("10.0.0.0/8", "10.0.0.2", ("10.0.0.9",), "10.0.0.9"),  # all trusted: the farthest
        ("10.0.0.0/8", "10.0.0.2", (), "10.0.0.2"),
    ],
)
def test_client_ip(trusted: str, peer: str, forwarded_for: tuple[str, ...], client: str) -> None:
    assert _proxy(trusted).client_ip(_request(peer, *forwarded_for)) == client  # type: ignore[arg-type]
