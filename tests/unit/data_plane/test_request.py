"""data_plane.request: canonicalisation of the request target, and strip_segments."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from data_plane.errors import BadRequest
from data_plane.request import MAX_TARGET_LENGTH, Target, canonicalise, check_message, expects_continue, strip_segments

pytestmark = pytest.mark.unit


def _rejected(raw_target: str) -> BadRequest:
    with pytest.raises(BadRequest) as exc_info:
        canonicalise(raw_target)
    assert exc_info.value.status == 400
    return exc_info.value


# --- hostile targets are refused with 400 ---


@pytest.mark.parametrize(
    "raw_target",
    [
        "/a/../b",
        "/a/%2e%2e/b",
        "/a/%2E%2e/b",
        "/a/.%2e/b",
        "/a/..",
        "/..",
        "/a/./b",
        "/a/%2e/b",
        "/.",
        "/a/.",
        "/a/%2fb",
        "/a/%2Fb",
        "/a/%5cb",
        "/a/%5Cb",
        "/a/%00b",
        "/a;x=1/b",
        "/a/b;jsessionid=1",
        "/a/%3bb",
        "/a/%3Bx=1",
        "/a//b",
        "//a",
        "/a/b//",
        "http://evil/a",
        "https://evil/a",
        "evil/a",
        "*",
        "",
        "/a#frag",
        "/a?x=1#frag",
        "/a/%ff",
        "/a/%c0%ae%c0%ae/b",
        "/a/%C0%AF",
        "/a/%ed%a0%80",  # UTF-8-encoded surrogate
        "/a/%",
        "/a/%2",
        "/a/%zz",
        "/a/%g0",
        "/a/\\b",
        "/a b",
        "/a/\u00e9",  # raw non-ASCII must be percent-encoded
    ],
)
def test_hostile_target_is_rejected(raw_target: str) -> None:
    _rejected(raw_target)


@pytest.mark.parametrize("char", [chr(c) for c in [*range(0x00, 0x20), 0x7F]])
def test_raw_control_character_in_path_is_rejected(char: str) -> None:
    _rejected(f"/a/x{char}y")


@pytest.mark.parametrize("code", [*range(0x01, 0x20), 0x7F])
def test_encoded_control_character_in_path_is_rejected(code: int) -> None:
    err = _rejected(f"/a/x%{code:02X}y")
    assert err.code == "bad_path"


@pytest.mark.parametrize("escape", ["%C2%85", "%C2%80", "%C2%9F"])
def test_encoded_c1_control_character_in_path_is_rejected(escape: str) -> None:
    _rejected(f"/a/x{escape}y")


@pytest.mark.parametrize("char", ["\x00", "\x01", "\r", "\n", "\x7f"])
def test_control_character_in_query_is_rejected(char: str) -> None:
    assert _rejected(f"/a?x={char}&y=1").code == "bad_query"


@pytest.mark.parametrize("raw_target", ["/a/b\n", "/a/b\n?x=1"])
def test_trailing_newline_in_path_is_rejected(raw_target: str) -> None:
    _rejected(raw_target)


def test_trailing_newline_in_query_is_rejected() -> None:
    _rejected("/a?x=\n")


def test_target_too_long_is_rejected() -> None:
    err = _rejected("/" + "a" * MAX_TARGET_LENGTH)
    assert err.code == "target_too_long"


def test_target_of_maximum_length_is_accepted() -> None:
    raw = "/" + "a" * (MAX_TARGET_LENGTH - 1)
    assert canonicalise(raw).path == raw


@pytest.mark.parametrize(
    ("raw_target", "code"),
    [
        ("http://evil/a", "bad_target"),
        ("*", "bad_target"),
        ("/a#frag", "bad_target"),
        ("/a/%2fb", "bad_path"),
        ("/a/%ff", "bad_path"),
        ("/a/%zz", "bad_path"),
        ("/a/../b", "bad_path"),
        ("/a//b", "bad_path"),
        ("/a;x=1/b", "bad_path"),
    ],
)
def test_rejection_carries_error_code(raw_target: str, code: str) -> None:
    assert _rejected(raw_target).code == code


# --- accepted targets ---


@pytest.mark.parametrize(
    ("raw_target", "expected"),
    [
        ("/", Target("/", "/", "")),
        ("/a/b", Target("/a/b", "/a/b", "")),
        ("/a/b/", Target("/a/b/", "/a/b/", "")),
        ("/a/%41", Target("/a/A", "/a/%41", "")),
        ("/caf%C3%A9", Target("/caf\u00e9", "/caf%C3%A9", "")),
        ("/caf%c3%a9", Target("/caf\u00e9", "/caf%c3%a9", "")),
        ("/a/...", Target("/a/...", "/a/...", "")),
        ("/a/.b/..c", Target("/a/.b/..c", "/a/.b/..c", "")),
        ("/a/%20b", Target("/a/ b", "/a/%20b", "")),
        ("/a/%252e%252e/b", Target("/a/%2e%2e/b", "/a/%252e%252e/b", "")),
        (
            "/v1/~user/a-b_c.d!$&'()*+,=:@",
            Target("/v1/~user/a-b_c.d!$&'()*+,=:@", "/v1/~user/a-b_c.d!$&'()*+,=:@", ""),
        ),
    ],
)
def test_accepted_target(raw_target: str, expected: Target) -> None:
    assert canonicalise(raw_target) == expected


def test_query_string_is_preserved_raw() -> None:
    raw_query = "q=caf%C3%A9&x=%2F..%2F&a=1;b=2&list[]=1&empty="
    assert canonicalise(f"/search/items?{raw_query}") == Target("/search/items", "/search/items", raw_query)


def test_query_may_contain_what_the_path_may_not() -> None:
    assert canonicalise("/a?next=/b/../c//d").raw_query == "next=/b/../c//d"


def test_empty_query_is_empty_string() -> None:
    assert canonicalise("/a?") == Target("/a", "/a", "")


def test_only_first_question_mark_splits_the_query() -> None:
    assert canonicalise("/a?x=1?y=2") == Target("/a", "/a", "x=1?y=2")


def test_raw_path_decodes_to_path() -> None:
    t = canonicalise("/files/%E2%82%AC/r%C3%A9sum%C3%A9?v=1")
    assert t.path == "/files/\u20ac/r\u00e9sum\u00e9"
    assert t.raw_path == "/files/%E2%82%AC/r%C3%A9sum%C3%A9"
    assert t.raw_query == "v=1"


# --- strip_segments ---


@pytest.mark.parametrize(
    ("raw_path", "count", "expected"),
    [
        ("/api/users/123", 0, "/api/users/123"),
        ("/api/users/123", -1, "/api/users/123"),
        ("/api/users/123", 1, "/users/123"),
        ("/api/users/123", 2, "/123"),
        ("/api/users/123", 3, "/"),
        ("/api/users/123", 5, "/"),
        ("/api", 1, "/"),
        ("/api/", 1, "/"),
        ("/api/users/", 2, "/"),
        ("/api/x/", 1, "/x/"),
        ("/api/caf%C3%A9/%41", 1, "/caf%C3%A9/%41"),
        ("/", 1, "/"),
    ],
)
def test_strip_segments(raw_path: str, count: int, expected: str) -> None:
    assert strip_segments(raw_path, count) == expected


# --- check_message: version, framing, Host ---


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def _message_rejected(version: tuple[int, int], *pairs: tuple[str, str]) -> BadRequest:
    with pytest.raises(BadRequest) as exc_info:
        check_message(version, _headers(*pairs))
    return exc_info.value


@pytest.mark.parametrize("version", [(0, 9), (2, 0), (1, 2), (3, 0)])
def test_other_http_versions_are_rejected(version: tuple[int, int]) -> None:
    assert _message_rejected(version, ("Host", "a")).code == "unsupported_http_version"


@pytest.mark.parametrize(
    "codings",
    [
        [("Transfer-Encoding", "gzip, chunked")],
        [("Transfer-Encoding", "chunked, chunked")],
        [("Transfer-Encoding", "identity")],
        [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
    ],
)
def test_ambiguous_framing_is_rejected(codings: list[tuple[str, str]]) -> None:
    assert _message_rejected((1, 1), ("Host", "a"), *codings).code == "bad_framing"


def test_transfer_encoding_in_http_10_is_rejected() -> None:
    assert _message_rejected((1, 0), ("Transfer-Encoding", "chunked")).code == "bad_framing"


@pytest.mark.parametrize("value", ["chunked", "Chunked", " CHUNKED "])
def test_chunked_alone_is_accepted(value: str) -> None:
    check_message((1, 1), _headers(("Host", "a"), ("Transfer-Encoding", value)))


@pytest.mark.parametrize(
    "host",
    ["evil.com@good.com", "good.com/x", "good.com x", "", "good.com:80:80", "good.com:abc", "[::1", "-x.com"],
)
def test_malformed_host_is_rejected(host: str) -> None:
    assert _message_rejected((1, 1), ("Host", host)).code == "bad_host"


def test_two_host_headers_are_rejected() -> None:
    assert _message_rejected((1, 1), ("Host", "a.com"), ("Host", "b.com")).code == "bad_host"


@pytest.mark.parametrize(
    "host", ["api.example.com", "API.Example.com:8000", "127.0.0.1:8000", "[::1]:8000", "user_service:3000", "a"]
)
def test_plain_host_is_accepted(host: str) -> None:
    check_message((1, 1), _headers(("Host", host)))


def test_http_10_without_host_is_accepted() -> None:
    check_message((1, 0), _headers())


@pytest.mark.parametrize(
    ("version", "expect", "expected"),
    [
        ((1, 1), "100-continue", True),
        ((1, 1), "100-Continue", True),
        ((1, 0), "100-continue", False),
        ((1, 1), "", False),
    ],
)
def test_expects_continue(version: tuple[int, int], expect: str, expected: bool) -> None:
    headers = _headers(("Expect", expect)) if expect else _headers()
    assert expects_continue(version, headers) is expected
