"""The base of every error tenantgate raises on purpose.

    TenantgateError
    ├── InvalidSnapshot        a snapshot failed validation (the data plane NACKs it)
    └── InvalidPattern         a route path pattern is malformed

Each plane grows its own subtree under :class:`TenantgateError` (``control_plane.errors``,
``data_plane.errors``); third-party exceptions are mapped into it where they are caught.
"""

from __future__ import annotations


class TenantgateError(Exception):
    """Base class of tenantgate's own errors."""


class InvalidSnapshot(TenantgateError):
    """A snapshot is not internally consistent; the message names the offending object."""


class InvalidPattern(TenantgateError, ValueError):
    """A route path pattern is malformed; the message says how."""
