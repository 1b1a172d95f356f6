"""shared.patterns: parsing of route path patterns."""

from __future__ import annotations

import pytest

from shared import patterns
from shared.errors import InvalidPattern, TenantgateError
from shared.patterns import LITERAL, PARAM, WILDCARD, Pattern

pytestmark = pytest.mark.unit


def test_root_has_no_segments() -> None:
    p = patterns.parse("/")
    assert p == Pattern("/", ())
    assert p.is_exact is True
    assert p.literal_prefix_length == 0


def test_exact_pattern_is_all_literal() -> None:
    p = patterns.parse("/api/users")
    assert p.text == "/api/users"
    assert p.segments == ((LITERAL, "api"), (LITERAL, "users"))
    assert p.is_exact is True
    assert p.literal_prefix_length == 2


def test_param_segment_keeps_its_name() -> None:
    p = patterns.parse("/api/users/{user_id}/posts")
    assert p.segments == ((LITERAL, "api"), (LITERAL, "users"), (PARAM, "user_id"), (LITERAL, "posts"))
    assert p.is_exact is False
    assert p.literal_prefix_length == 2


def test_trailing_wildcard_is_last_segment() -> None:
    p = patterns.parse("/api/*")
    assert p.segments == ((LITERAL, "api"), (WILDCARD, "*"))
    assert p.is_exact is False
    assert p.literal_prefix_length == 1


def test_root_wildcard() -> None:
    p = patterns.parse("/*")
    assert p.segments == ((WILDCARD, "*"),)
    assert p.literal_prefix_length == 0


def test_param_then_wildcard() -> None:
    p = patterns.parse("/{tenant}/files/*")
    assert p.segments == ((PARAM, "tenant"), (LITERAL, "files"), (WILDCARD, "*"))
    assert p.literal_prefix_length == 0


def test_literal_prefix_stops_at_first_param() -> None:
    assert patterns.parse("/a/b/{c}/d/e").literal_prefix_length == 2


@pytest.mark.parametrize(
    "text",
    ["/a-b_c.d~e", "/!$&'()+,=:@"],
)
def test_literal_accepts_rfc3986_pchars(text: str) -> None:
    assert patterns.parse(text).segments == ((LITERAL, text[1:]),)


def test_param_name_of_64_characters_is_accepted() -> None:
    name = "p" * 64
    assert patterns.parse(f"/{{{name}}}").segments == ((PARAM, name),)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a/b",
        "*",
        "/a/",  # trailing slash: use /a/* for a prefix
        "/a//b",
        "//",
        "/a/./b",
        "/a/../b",
        "/..",
        "/.",
        "/a/*/b",  # wildcard not last
        "/*/*",
        "/a*",
        "/a/b*",
        "/{}",
        "/{1id}",
        "/{id",
        "/id}",
        "/{id}x",
        "/{a-b}",
        "/{" + "p" * 65 + "}",
        "/a;b",
        "/a%2Fb",
        "/a?b",
        "/a#b",
        "/a b",
        "/a\\b",
        "/a\x00b",
        "/caf\u00e9",
        "/" + "a" * patterns.MAX_PATTERN_LENGTH,
    ],
)
def test_malformed_pattern_raises_invalid_pattern(text: str) -> None:
    with pytest.raises(InvalidPattern):
        patterns.parse(text)


def test_pattern_of_maximum_length_is_accepted() -> None:
    text = "/" + "a" * (patterns.MAX_PATTERN_LENGTH - 1)
    assert patterns.parse(text).text == text


def test_non_string_raises_invalid_pattern() -> None:
    with pytest.raises(InvalidPattern):
        patterns.parse(None)  # type: ignore[arg-type]


def test_invalid_pattern_is_a_tenantgate_error_and_a_value_error() -> None:
    with pytest.raises(InvalidPattern) as exc_info:
        patterns.parse("/a/*/b")
    assert isinstance(exc_info.value, TenantgateError)
    assert isinstance(exc_info.value, ValueError)
    assert str(exc_info.value) == "'*' is only allowed as the last segment"


def test_trailing_slash_error_suggests_wildcard() -> None:
    with pytest.raises(InvalidPattern) as exc_info:
        patterns.parse("/a/")
    assert str(exc_info.value) == "path must not end with '/' (use '/*' for a prefix)"
