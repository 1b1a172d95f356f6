"""Canonicalisation of the request target, and rejection of anything ambiguous.

The rule: the path that is matched and authorised is exactly the path sent upstream. So the
target is decoded once, and every form that an upstream could read differently from us is
refused with 400 rather than "fixed": dot-segments (also percent-encoded), encoded ``/``
``\\`` or NUL, ``;`` path parameters, empty segments, invalid UTF-8, control characters,
absolute-form targets and fragments. What goes upstream is the raw path as received, which
decodes to exactly the matched path.

:func:`check_message` covers what the target does not: the HTTP version, the body framing and
the Host header. aiohttp's parser (C or Python) already refuses, before any handler runs,
Content-Length together with Transfer-Encoding, duplicate or non-numeric Content-Length,
a Transfer-Encoding whose last coding is not ``chunked``, duplicate or (HTTP/1.1) missing
Host, CR/LF/NUL in header values, obsolete line folding, bare-LF line endings, oversized
request lines and header fields and malformed chunk sizes; the listener answers those with
the same error body (see ``data_plane.listener``). What the parser lets through and an
upstream could frame or route differently is refused here.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple
from urllib.parse import unquote_to_bytes

from multidict import MultiMapping

from data_plane.errors import BadRequest

MAX_TARGET_LENGTH: Final = 8192
# RFC 3986 path characters plus "%" for escapes; everything else is refused in the raw path.
_RAW_PATH_OK = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/%]*")
_FORBIDDEN_ESCAPES = re.compile(r"%(?:2[fF]|5[cC]|00)")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# C0, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RAW_QUERY_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%\[\]|^`{}\"<> ]*")
# RFC 9110 §7.2 Host: a reg-name (letters, digits, "-", ".", and "_" that container names use),
# an IPv4 address or a bracketed IPv6 literal, then an optional port. No userinfo, no path.
_HOST_OK = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
_HTTP_10: Final = (1, 0)
_HTTP_11: Final = (1, 1)


class Target(NamedTuple):
    """One per request: a named tuple is built in C, a frozen dataclass field by field."""

    path: str  # decoded, what routes are matched against
    raw_path: str  # as received; decodes to exactly ``path``
    raw_query: str  # as received, without "?"; "" when absent


def canonicalise(raw_target: str) -> Target:
    """Split and check a request target; raise :class:`BadRequest` for anything ambiguous."""
    if len(raw_target) > MAX_TARGET_LENGTH:
        raise BadRequest("request target too long", code="target_too_long")
    if not raw_target.startswith("/"):
        raise BadRequest("request target must be a path (origin-form)", code="bad_target")
    if "#" in raw_target:
        raise BadRequest("request target must not contain a fragment", code="bad_target")
    raw_path, _, raw_query = raw_target.partition("?")
    if not _RAW_PATH_OK.fullmatch(raw_path):
        raise BadRequest("path contains characters that are not allowed", code="bad_path")
    escaped = "%" in raw_path  # escapes are checked (and decoded) only where there are any
    if escaped and _FORBIDDEN_ESCAPES.search(raw_path):
        raise BadRequest("path must not contain encoded '/', '\\' or NUL", code="bad_path")
    if escaped and _BAD_ESCAPE.search(raw_path):
        raise BadRequest("path contains a malformed percent-escape", code="bad_path")
    if raw_query and not _RAW_QUERY_OK.fullmatch(raw_query):
        raise BadRequest("query contains characters that are not allowed", code="bad_query")
    if escaped:
        try:
            path = unquote_to_bytes(raw_path).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("path is not valid UTF-8", code="bad_path") from None
        if _CONTROL.search(path):
            raise BadRequest("path must not contain control characters", code="bad_path")
    else:
        path = raw_path
    if ";" in path:
        raise BadRequest("path parameters (';') are not accepted", code="bad_path")
    # Only a path holding "/." can have a dot-segment and only one holding "//" an empty
    # segment (it starts with "/"): most paths skip the walk over their segments.
    if path != "/" and ("/." in path or "//" in path):
        segments = path[1:].split("/")
        for i, segment in enumerate(segments):
            if segment in (".", ".."):
                raise BadRequest("path must not contain '.' or '..' segments", code="bad_path")
            if segment == "" and i != len(segments) - 1:
                raise BadRequest("path must not contain empty segments ('//')", code="bad_path")
    return Target(path, raw_path, raw_query)


def check_message(version: tuple[int, int], headers: MultiMapping[str]) -> None:
    """Refuse (400) an HTTP version, body framing or Host that an upstream could read differently.

    - only HTTP/1.0 and HTTP/1.1 (aiohttp also parses ``GET /`` as HTTP/0.9 and ``HTTP/2.0``);
    - ``Transfer-Encoding`` only in HTTP/1.1, only once and only exactly ``chunked``: another
      coding (``gzip, chunked``) would be decoded differently by different hops (TE.TE);
    - never both ``Transfer-Encoding`` and ``Content-Length`` (CL.TE, TE.CL), even if a parser
      in front of us let it through;
    - at most one ``Host``, and it must be a plain host[:port]: no userinfo, path, spaces.
    """
    if version != _HTTP_11 and version != _HTTP_10:
        raise BadRequest("only HTTP/1.0 and HTTP/1.1 are accepted", code="unsupported_http_version")
    codings = headers.getall("Transfer-Encoding", ())
    if codings:
        if version != _HTTP_11:
            raise BadRequest("Transfer-Encoding is not allowed in HTTP/1.0", code="bad_framing")
        if len(codings) != 1 or codings[0].strip().lower() != "chunked":
            raise BadRequest("Transfer-Encoding must be exactly 'chunked'", code="bad_framing")
        if "Content-Length" in headers:
            raise BadRequest("Content-Length and Transfer-Encoding together", code="bad_framing")
    hosts = headers.getall("Host", ())
    if hosts:
        if len(hosts) > 1:
            raise BadRequest("more than one Host header", code="bad_host")
        if not _HOST_OK.fullmatch(hosts[0]):
            raise BadRequest("the Host header is not a valid host[:port]", code="bad_host")


CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def expects_continue(version: tuple[int, int], headers: MultiMapping[str]) -> bool:
    """Whether the client waits for ``100 Continue`` before sending its body.

    The gateway answers 100 itself, and only once the request has been admitted (route,
    credentials, limits, declared size): a refused client never sends its body at all. The
    ``Expect`` header is not forwarded, so the upstream never sends a 100 of its own."""
    return version == _HTTP_11 and headers.get("Expect", "").lower() == "100-continue"


def strip_segments(raw_path: str, count: int) -> str:
    """``raw_path`` without its first ``count`` segments (for ``strip_prefix``); always starts with '/'."""
    if count <= 0:
        return raw_path
    parts = raw_path.split("/", count + 1)
    rest = parts[count + 1] if len(parts) > count + 1 else ""
    return "/" + rest
