"""data_plane.proxy: which of an upstream's response headers reach the client."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from data_plane.proxy import _response_headers

pytestmark = pytest.mark.unit


def _upstream(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_hop_by_hop_and_connection_named_headers_are_dropped_every_time() -> None:
    upstream = _upstream(
        ("Content-Type", "text/plain"),
        ("Connection", "keep-alive, X-Secret"),
        ("Keep-Alive", "timeout=5"),
        ("x-secret", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    )
    for _ in range(2):  # the second time from what was remembered
        assert _response_headers(upstream, ()) == [
            ("Content-Type", "text/plain"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ]
    assert _response_headers(_upstream(("X-Secret", "1"), ("Connection", "close")), ()) == [("X-Secret", "1")]


def test_the_gateways_own_headers_replace_the_upstreams() -> None:
    upstream = _upstream(
        ("X-Request-ID", "from-upstream"),
        ("ratelimit", "forged"),
        ("Retry-After", "999"),
        ("ETag", '"1"'),
    )
    replaced = (("RateLimit", '"minute";r=9;t=60'), ("Retry-After", "1"))
    assert _response_headers(upstream, replaced) == [("ETag", '"1"')]
    assert _response_headers(upstream, ()) == [("ratelimit", "forged"), ("Retry-After", "999"), ("ETag", '"1"')]
