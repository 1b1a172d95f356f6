"""Canonicalisation of the request target, and rejection of anything ambiguous.

The rule: the path that is matched and authorised is exactly the path sent upstream. So the
target is decoded once, and every form that an upstream could read differently from us is
refused with 400 rather than "fixed": dot-segments (also percent-encoded), encoded ``/``
``\\`` or NUL, ``;`` path parameters, empty segments, invalid UTF-8, control characters,
absolute-form targets and fragments. What goes upstream is the raw path as received, which
decodes to exactly the matched path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

from data_plane.errors import BadRequest

MAX_TARGET_LENGTH: Final = 8192
# RFC 3986 path characters plus "%" for escapes; everything else is refused in the raw path.
_RAW_PATH_OK = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/%]*")
_FORBIDDEN_ESCAPES = re.compile(r"%(?:2[fF]|5[cC]|00)")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# C0, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RAW_QUERY_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%\[\]|^`{}\"<> ]*")


@dataclass(frozen=True, slots=True)
class Target:
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
    if _FORBIDDEN_ESCAPES.search(raw_path):
        raise BadRequest("path must not contain encoded '/', '\\' or NUL", code="bad_path")
    if _BAD_ESCAPE.search(raw_path):
        raise BadRequest("path contains a malformed percent-escape", code="bad_path")
    if raw_query and not _RAW_QUERY_OK.fullmatch(raw_query):
        raise BadRequest("query contains characters that are not allowed", code="bad_query")
    if "%" in raw_path:
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
    if path != "/":
        segments = path[1:].split("/")
        for i, segment in enumerate(segments):
            if segment in (".", ".."):
                raise BadRequest("path must not contain '.' or '..' segments", code="bad_path")
            if segment == "" and i != len(segments) - 1:
                raise BadRequest("path must not contain empty segments ('//')", code="bad_path")
    return Target(path, raw_path, raw_query)


def strip_segments(raw_path: str, count: int) -> str:
    """``raw_path`` without its first ``count`` segments (for ``strip_prefix``); always starts with '/'."""
    if count <= 0:
        return raw_path
    parts = raw_path.split("/", count + 1)
    rest = parts[count + 1] if len(parts) > count + 1 else ""
    return "/" + rest
