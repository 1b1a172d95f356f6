"""Route path patterns, parsed the same way on both planes.

``/a/b`` matches exactly; ``/a/{id}`` matches one non-empty segment in that place;
``/a/*`` (only as the last segment) matches ``/a`` itself and everything below it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from shared.errors import InvalidPattern

MAX_PATTERN_LENGTH: Final = 1024
_PARAM = re.compile(r"^\{[A-Za-z_][A-Za-z0-9_]{0,63}\}$")
# RFC 3986 pchar minus "%" (patterns are decoded text) and minus ";" (never accepted in a path).
_LITERAL = re.compile(r"^[A-Za-z0-9\-._~!$&'()+,=:@]+$")

LITERAL: Final = 0
PARAM: Final = 1
WILDCARD: Final = 2


@dataclass(frozen=True, slots=True)
class Pattern:
    text: str
    # One (kind, literal text or param name) per segment; a trailing wildcard is the last entry.
    segments: tuple[tuple[int, str], ...]

    @property
    def is_exact(self) -> bool:
        return all(kind == LITERAL for kind, _ in self.segments)

    @property
    def literal_prefix_length(self) -> int:
        """Number of leading literal segments: more is more specific."""
        n = 0
        for kind, _ in self.segments:
            if kind != LITERAL:
                break
            n += 1
        return n


def parse(text: str) -> Pattern:
    if not isinstance(text, str) or not text.startswith("/"):
        raise InvalidPattern("path must start with '/'")
    if len(text) > MAX_PATTERN_LENGTH:
        raise InvalidPattern(f"path must be at most {MAX_PATTERN_LENGTH} characters")
    if text == "/":
        return Pattern(text, ())
    parts = text[1:].split("/")
    segments: list[tuple[int, str]] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "*":
            if not last:
                raise InvalidPattern("'*' is only allowed as the last segment")
            segments.append((WILDCARD, "*"))
        elif part == "" and last:
            raise InvalidPattern("path must not end with '/' (use '/*' for a prefix)")
        elif part in ("", ".", ".."):
            raise InvalidPattern("path must not contain empty, '.' or '..' segments")
        elif part.startswith("{"):
            if not _PARAM.match(part):
                raise InvalidPattern(f"bad parameter segment {part!r}: expected {{name}}")
            segments.append((PARAM, part[1:-1]))
        elif not _LITERAL.match(part):
            raise InvalidPattern(f"segment {part!r} has characters not allowed in a path")
        else:
            segments.append((LITERAL, part))
    return Pattern(text, tuple(segments))
