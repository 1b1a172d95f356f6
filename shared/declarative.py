"""``tenantgate apply`` and ``tenantgate export``: tenants and routes as a YAML file, through the admin API.

Like Kong's decK: ``export`` prints the live state as a file, ``apply -f FILE`` makes the live
state equal the file (``--dry-run`` only shows what would change). Everything goes through the
admin REST API over HTTP; this module imports neither plane.

The file::

    tenants:                        # every tenant; a tenant absent here is deleted
      - name: Acme Corp             # required; the identity (unique)
        tier: premium               # free | basic | premium | enterprise (default free)
        rate_limit_per_minute: 1000 # the four limits default to the tier's (GET /admin/tiers)
        rate_limit_per_hour: 50000
        monthly_quota: 1000000      # 0: unlimited
        max_concurrency: 100        # 0: unlimited
        is_active: true             # default true
    routes:                         # every route; a route absent here is deleted
      - path: /api/users/*          # required
        upstreams:                  # or the shorthand  upstream: http://user-service:3000  (weight 1)
          - {url: http://user-service:3000, weight: 1}
        methods: [GET, POST]        # default []: every method
        host: null                  # exact Host to match; null: any
        headers: {}                 # {X-Version: "2"}: header values the request must carry
        priority: 0
        tenants: [Acme Corp]        # tenant NAMES (ids on the wire); default []: every tenant
        # and, with the admin API's defaults: auth_required (true), rate_limit (null), burst (null),
        # timeout_ms (30000), retries (0), strip_prefix (false), websocket (false),
        # max_body_bytes (10485760), is_active (true), load_balancing (round_robin),
        # hash_on (null; "tenant" with consistent_hash), tiers ([]), scopes ([]),
        # circuit_breaker (null, or {failure_rate, min_requests, window_s, open_s,
        # half_open_requests}), health_check (null, or {path, interval_s, healthy, unhealthy}).
    jwt_issuers:                    # every tenant's JWT issuers; an issuer absent here is deleted
      - tenant: Acme Corp           # required: the tenant's name
        issuer: https://auth.acme.example/   # required; (tenant, issuer) is the identity
        audience: acme-api          # required
        algorithms: [RS256]         # required
        jwks_uri: https://auth.acme.example/.well-known/jwks.json
        # Exactly one key source: jwks ({keys: [...]}), jwks_uri, public_key_pem or hs256_secret.
        # An HS256 issuer may leave hs256_secret out: the stored secret is kept (it is never
        # exported); it is needed only to create the issuer or to change its audience.

Rules:

- Omitted fields take the admin API's defaults, so they are managed too: removing a line resets
  the field. ``export`` writes every field, so its output is explicit and ``apply`` of it changes
  nothing.
- A missing top-level section (``tenants:``, ``routes:`` or ``jwt_issuers:``) is not managed: apply neither
  creates, changes nor deletes objects of that kind. An empty list (``routes: []``) deletes them all.
- Tenants are identified by name; routes by (path, host, headers, priority, methods); issuers by
  (tenant, issuer). Changing an identity field replaces the object (a renamed tenant is a new
  tenant with a new API key). Issuers have no partial update: a changed issuer is deleted and
  created again, so its tokens fail for the moment between the two calls.
- No secrets: API keys and HS256 secrets are never exported. A tenant's first key is printed
  once, when apply creates it.
- Apply order: tenant creates and updates, issuer deletes, replacements and creates, route
  deletes that would clash with a route of the file, route updates and creates, the other route
  deletes, tenant deletes. A failed call stops apply; running it again starts from the live state
  and converges.

Errors (``str()`` is the one line shown to the operator)::

    TenantgateError (shared.errors)
    └── DeclarativeError
        ├── UsageError         bad --admin-url, no admin token (exit code 2)
        ├── ConfigFileError    the file cannot be read, is not YAML, or is not a valid config
        ├── StateError         the live state cannot be written as a file (duplicate names, ...)
        ├── AdminAPIError      the admin API refused a call
        ├── AdminUnreachable   the admin API did not answer
        └── ApplyFailed        a change failed midway: which one and how far apply got
"""

from __future__ import annotations

import copy
import difflib
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import yaml

from shared import patterns
from shared import snapshot as model
from shared.errors import InvalidPattern, TenantgateError
from shared.settings import HostPort, Secret, Settings

TENANT_FIELDS: Final = (
    "name",
    "tier",
    "rate_limit_per_minute",
    "rate_limit_per_hour",
    "monthly_quota",
    "max_concurrency",
    "is_active",
)
TIER_LIMITS: Final = ("rate_limit_per_minute", "rate_limit_per_hour", "monthly_quota", "max_concurrency")
DEFAULT_TIER: Final = "free"
# Every route field of the admin API but id, created_at, updated_at and the ``upstream``
# shorthand, in the order export writes them: the identity first.
ROUTE_FIELDS: Final = (
    "path",
    "methods",
    "host",
    "headers",
    "priority",
    "upstreams",
    "load_balancing",
    "hash_on",
    "auth_required",
    "tenants",
    "tiers",
    "scopes",
    "rate_limit",
    "burst",
    "timeout_ms",
    "retries",
    "strip_prefix",
    "websocket",
    "max_body_bytes",
    "rate_limit_shadow",
    "is_active",
    "circuit_breaker",
    "health_check",
)
# The admin API's defaults (control_plane.api.routes.RouteCreate; a unit test keeps them equal).
ROUTE_DEFAULTS: Final[Mapping[str, Any]] = {
    "methods": [],
    "host": None,
    "headers": {},
    "priority": 0,
    "load_balancing": model.DEFAULT_LOAD_BALANCING,
    "hash_on": None,
    "auth_required": True,
    "tenants": [],
    "tiers": [],
    "scopes": [],
    "rate_limit": None,
    "burst": None,
    "timeout_ms": 30_000,
    "retries": 0,
    "strip_prefix": False,
    "websocket": False,
    "max_body_bytes": model.DEFAULT_MAX_BODY_BYTES,
    "rate_limit_shadow": False,
    "is_active": True,
    "circuit_breaker": None,
    "health_check": None,
}
CIRCUIT_BREAKER_DEFAULTS: Final[Mapping[str, Any]] = {
    "failure_rate": 0.5,
    "min_requests": 20,
    "window_s": 10,
    "open_s": 30,
    "half_open_requests": 3,
}
HEALTH_CHECK_DEFAULTS: Final[Mapping[str, Any]] = {"path": "/health", "interval_s": 5, "healthy": 2, "unhealthy": 3}
DEFAULT_HASH_ON: Final = "tenant"  # what the admin API sets with consistent_hash when hash_on is omitted

PAGE_SIZE: Final = 500
HTTP_TIMEOUT_S: Final = 30.0
MAX_INT32: Final = 2_147_483_647
MAX_QUOTA: Final = 2**62
MAX_PRIORITY: Final = 1_000_000
MAX_ROUTE_TENANTS: Final = 1000
MAX_ROUTE_SCOPES: Final = 32
MAX_NAME_LENGTH: Final = 255
MAX_URL_LENGTH: Final = 2048
MAX_HASH_ON_LENGTH: Final = 300
MAX_AUDIENCE_LENGTH: Final = 512
MAX_KEY_MATERIAL_CHARS: Final = 65_536
# The key sources of a JWT issuer; exactly one is stored (control_plane.api.issuers.KEY_SOURCES).
ISSUER_KEY_SOURCES: Final = ("jwks", "jwks_uri", "public_key_pem", "hs256_secret")
HS256_KEPT: Final = "hs256_secret"  # an HS256 issuer whose file omits the secret: the stored one is kept

Obj = dict[str, Any]


class DeclarativeError(TenantgateError):
    """apply or export cannot go on; ``str()`` is the one line to show."""


class UsageError(DeclarativeError):
    """The command was called wrongly (exit code 2)."""


class ConfigFileError(DeclarativeError):
    """The file cannot be read, is not YAML, or is not a valid config; the message names the position."""


class StateError(DeclarativeError):
    """The live state (or the file against it) cannot be handled; the message says what to do."""


class AdminAPIError(DeclarativeError):
    """The admin API answered with an error."""

    def __init__(self, status: int, code: str, message: str, request_id: str = "") -> None:
        self.status, self.code, self.message, self.request_id = status, code, message, request_id
        hint = {
            401: " — check the admin token (TENANTGATE_ADMIN_TOKEN or --admin-token)",
            403: " — this needs a token with the admin role",
            503: " — the control plane's database is unavailable; retry shortly",
        }.get(status, "")
        rid = f" [request id {request_id}]" if request_id else ""
        super().__init__(f"the admin API answered {status} {code}: {message}{rid}{hint}")


class AdminUnreachable(DeclarativeError):
    """The admin API did not answer."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the admin API at {url}: {reason} — is the control plane running?")


class ApplyFailed(DeclarativeError):
    """A change failed midway; earlier changes stay applied."""

    def __init__(self, change: Change, done: int, total: int, cause: DeclarativeError) -> None:
        self.change, self.done, self.total = change, done, total
        super().__init__(
            f"failed to {change.action} {change.kind} {change.label}: {cause}."
            f" {done} of {total} changes were applied before it; fix the cause and run apply again:"
            " it starts from the live state and converges"
        )


# --- reading the file: YAML with the line of every mapping and key ---


class _Map(dict[str, Any]):
    """A YAML mapping that remembers where it and each of its keys are (1-based lines)."""

    line: int = 0
    key_lines: dict[str, int]


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mappings are :class:`_Map` and that refuses duplicate and non-text keys."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Iterable[_Map]:
    loader.flatten_mapping(node)
    data = _Map()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise _LoadError(line, f"keys must be text, got {key!r}")
        if key in data:
            raise _LoadError(line, f"key {key!r} appears twice in one mapping")
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = line


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)


class _LoadError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


@dataclass(frozen=True, slots=True)
class _At:
    """A position in the file, for error messages: ``FILE:LINE: routes[2].timeout_ms: ...``."""

    source: str
    line: int
    path: str

    def error(self, message: str) -> ConfigFileError:
        where = f"{self.path}: " if self.path else ""
        return ConfigFileError(f"{self.source}:{self.line}: {where}{message}")

    def key(self, mapping: _Map, key: str) -> _At:
        return _At(self.source, mapping.key_lines.get(key, mapping.line), f"{self.path}.{key}" if self.path else key)

    def index(self, i: int, value: Any) -> _At:
        return _At(self.source, value.line if isinstance(value, _Map) else self.line, f"{self.path}[{i}]")


@dataclass(frozen=True, slots=True)
class Document:
    """A parsed, validated file: canonical objects; ``None`` for a section the file leaves out.

    Tenants' limits are ``None`` where the file omits them (the tier's default, see :func:`plan`).
    """

    tenants: tuple[Obj, ...] | None
    routes: tuple[Obj, ...] | None
    jwt_issuers: tuple[Obj, ...] | None = None


def read_source(path: str) -> tuple[str, str]:
    """The file's name for messages and its text; ``-`` reads standard input."""
    if path == "-":
        return "<stdin>", sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return path, f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigFileError(f"cannot read {path}: {reason}") from None


def parse(text: str, source: str = "<file>") -> Document:
    """Parse and validate a config file; raise :class:`ConfigFileError` naming the first problem."""
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except _LoadError as exc:
        raise ConfigFileError(f"{source}:{exc.line}: {exc.message}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise ConfigFileError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    top = _At(source, 1, "")
    if data is None:
        raise top.error("the file is empty; it needs a tenants: list, a routes: list or both")
    if not isinstance(data, _Map):
        raise top.error("the top level must be a mapping with tenants:, routes: and/or jwt_issuers:")
    _no_unknown_keys(data, ("tenants", "routes", "jwt_issuers"), top)
    tenants = _section(data, "tenants", top, _tenant)
    routes = _section(data, "routes", top, _route)
    issuers = _section(data, "jwt_issuers", top, _issuer)
    if tenants is not None:
        _unique_tenants(tenants)
    if issuers is not None:
        _unique_issuers(issuers)
        if tenants is not None:
            names = {t.obj["name"] for t in tenants}
            for i in issuers:
                if i.obj["tenant"] not in names:
                    raise i.at.error(f"tenant: no tenant named {i.obj['tenant']!r} in the file's tenants: list")
    if routes is not None:
        _unique_routes(routes)
        if tenants is not None:
            names = {t.obj["name"] for t in tenants}
            for r in routes:
                missing = [n for n in r.obj["tenants"] if n not in names]
                if missing:
                    raise r.at.error(f"tenants: no tenant named {missing[0]!r} in the file's tenants: list")
    return Document(
        tenants=None if tenants is None else tuple(t.obj for t in tenants),
        routes=None if routes is None else tuple(r.obj for r in routes),
        jwt_issuers=None if issuers is None else tuple(i.obj for i in issuers),
    )


@dataclass(frozen=True, slots=True)
class _Parsed:
    obj: Obj
    at: _At


def _section(data: _Map, key: str, top: _At, item: Callable[[Any, _At], Obj]) -> list[_Parsed] | None:
    if key not in data:
        return None
    at = top.key(data, key)
    value = data[key]
    if not isinstance(value, list):
        raise at.error("must be a list (write [] for none)")
    out = []
    for i, entry in enumerate(value):
        entry_at = at.index(i, entry)
        out.append(_Parsed(item(entry, entry_at), entry_at))
    return out


def _no_unknown_keys(mapping: _Map, allowed: Sequence[str], at: _At) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
            raise at.key(mapping, key).error(f"unknown key {key!r} ({hint})")


# --- field checks: each takes the YAML value and its position, returns the canonical value ---

_Check = Callable[[Any, _At], Any]
_REQUIRED: Final = object()


def _integer(lo: int, hi: int) -> _Check:
    def check(value: Any, at: _At) -> int:
        if type(value) is not int or not lo <= value <= hi:
            raise at.error(f"must be an integer from {lo} to {hi}, got {value!r}")
        return value

    return check


def _fraction(value: Any, at: _At) -> float:
    if type(value) not in (int, float) or not 0 < value <= 1:
        raise at.error(f"must be a number greater than 0 and at most 1, got {value!r}")
    return float(value)


def _boolean(value: Any, at: _At) -> bool:
    if type(value) is not bool:
        raise at.error(f"must be true or false, got {value!r}")
    return value


def _text(max_length: int, validate: Callable[[str], None] | None = None) -> Callable[[Any, _At], str]:
    def check(value: Any, at: _At) -> str:
        if not isinstance(value, str):
            raise at.error(f"must be text, got {value!r} (quote it)")
        if not value or len(value) > max_length:
            raise at.error(f"must be 1 to {max_length} characters")
        if validate is not None:
            try:
                validate(value)
            except ValueError as exc:
                raise at.error(str(exc)) from None
        return value

    return check


def _choice(*allowed: str) -> _Check:
    def check(value: Any, at: _At) -> str:
        if value not in allowed or not isinstance(value, str):
            raise at.error(f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    return check


def _optional(inner: _Check) -> _Check:
    def check(value: Any, at: _At) -> Any:
        return None if value is None else inner(value, at)

    return check


def _text_set(item: _Check, max_items: int) -> _Check:
    """A list of text, canonical as sorted and without repeats."""

    def check(value: Any, at: _At) -> list[str]:
        if not isinstance(value, list):
            raise at.error(f"must be a list, got {value!r}")
        if len(value) > max_items:
            raise at.error(f"at most {max_items} items")
        return sorted({item(v, at.index(i, v)) for i, v in enumerate(value)})

    return check


def _fields(value: Any, at: _At, specs: Mapping[str, tuple[_Check, Any]]) -> Obj:
    """Check a mapping field by field; omitted fields take their default (a copy)."""
    if not isinstance(value, _Map):
        raise at.error(f"must be a mapping of {', '.join(specs)}, got {value!r}")
    _no_unknown_keys(value, tuple(specs), at)
    out: Obj = {}
    for name, (check, default) in specs.items():
        if name in value:
            out[name] = check(value[name], at.key(value, name))
        elif default is _REQUIRED:
            raise at.error(f"{name} is required")
        else:
            out[name] = copy.deepcopy(default)
    return out


def _tenant_name(value: Any, at: _At) -> str:
    name = _text(MAX_NAME_LENGTH)(value, at)
    name = name.strip()  # as the admin API stores it
    if not name or not name.isprintable():
        raise at.error("must be non-empty printable text")
    return name


_TENANT_SPECS: Final[Mapping[str, tuple[_Check, Any]]] = {
    "name": (_tenant_name, _REQUIRED),
    "tier": (_choice(*model.TIERS), DEFAULT_TIER),
    "rate_limit_per_minute": (_optional(_integer(0, MAX_INT32)), None),
    "rate_limit_per_hour": (_optional(_integer(0, MAX_INT32)), None),
    "monthly_quota": (_optional(_integer(0, MAX_QUOTA)), None),
    "max_concurrency": (_optional(_integer(0, MAX_INT32)), None),
    "is_active": (_boolean, True),
}


def _tenant(value: Any, at: _At) -> Obj:
    return _fields(value, at, _TENANT_SPECS)


def _path(value: Any, at: _At) -> str:
    if not isinstance(value, str):
        raise at.error(f"must be text, got {value!r} (quote it)")
    try:
        patterns.parse(value)
    except InvalidPattern as exc:
        raise at.error(str(exc)) from None
    return value


def _method(value: Any, at: _At) -> str:
    if not isinstance(value, str) or value.upper() not in model.HTTP_METHODS:
        raise at.error(f"unknown method {value!r}; allowed: {', '.join(sorted(model.HTTP_METHODS))}")
    return value.upper()


def _host(value: Any, at: _At) -> str:
    return _text(model.MAX_HOST_LENGTH, model.validate_host)(value.lower() if isinstance(value, str) else value, at)


def _headers(value: Any, at: _At) -> dict[str, str]:
    if not isinstance(value, _Map):
        raise at.error(f"must be a mapping of header name to exact value, got {value!r}")
    if len(value) > model.MAX_HEADER_MATCHES:
        raise at.error(f"at most {model.MAX_HEADER_MATCHES} header matches")
    out: dict[str, str] = {}
    for name, expected in value.items():
        name_at = at.key(value, name)
        _text(model.MAX_HEADER_NAME_LENGTH, model.validate_header_name)(name, name_at)
        if not isinstance(expected, str):
            raise name_at.error(f"header values must be text, got {expected!r} (quote it: '{expected}')")
        try:
            model.validate_header_value(expected)
        except ValueError as exc:
            raise name_at.error(str(exc)) from None
        if name.lower() in out:
            raise name_at.error(f"header {name!r} is given twice (names are case-insensitive)")
        out[name.lower()] = expected
    return dict(sorted(out.items()))


def _upstream_url(value: Any, at: _At) -> str:
    return _text(MAX_URL_LENGTH, model.validate_upstream_url)(value, at)


_UPSTREAM_SPECS: Final[Mapping[str, tuple[_Check, Any]]] = {
    "url": (_upstream_url, _REQUIRED),
    "weight": (_integer(1, model.MAX_UPSTREAM_WEIGHT), 1),
}


def _upstreams(value: Any, at: _At) -> list[Obj]:
    if not isinstance(value, list) or not 1 <= len(value) <= model.MAX_UPSTREAMS:
        raise at.error(f"must be a list of 1 to {model.MAX_UPSTREAMS} {{url, weight}} mappings")
    out = [_fields(v, at.index(i, v), _UPSTREAM_SPECS) for i, v in enumerate(value)]
    if len({u["url"] for u in out}) != len(out):
        raise at.error("each upstream url may appear once")
    return out


def _section_of(specs: Mapping[str, tuple[_Check, Any]]) -> _Check:
    def check(value: Any, at: _At) -> Obj | None:
        return None if value is None else _fields(value, at, specs)

    return check


_CIRCUIT_BREAKER_SPECS: Final[Mapping[str, tuple[_Check, Any]]] = {
    "failure_rate": (_fraction, CIRCUIT_BREAKER_DEFAULTS["failure_rate"]),
    "min_requests": (_integer(1, model.MAX_MIN_REQUESTS), CIRCUIT_BREAKER_DEFAULTS["min_requests"]),
    "window_s": (_integer(1, model.MAX_WINDOW_S), CIRCUIT_BREAKER_DEFAULTS["window_s"]),
    "open_s": (_integer(1, model.MAX_WINDOW_S), CIRCUIT_BREAKER_DEFAULTS["open_s"]),
    "half_open_requests": (_integer(1, model.MAX_HALF_OPEN_REQUESTS), CIRCUIT_BREAKER_DEFAULTS["half_open_requests"]),
}
_HEALTH_CHECK_SPECS: Final[Mapping[str, tuple[_Check, Any]]] = {
    "path": (_text(model.MAX_HEALTH_PATH_LENGTH, model.validate_health_path), HEALTH_CHECK_DEFAULTS["path"]),
    "interval_s": (_integer(1, model.MAX_WINDOW_S), HEALTH_CHECK_DEFAULTS["interval_s"]),
    "healthy": (_integer(1, model.MAX_HEALTH_THRESHOLD), HEALTH_CHECK_DEFAULTS["healthy"]),
    "unhealthy": (_integer(1, model.MAX_HEALTH_THRESHOLD), HEALTH_CHECK_DEFAULTS["unhealthy"]),
}
_ROUTE_CHECKS: Final[Mapping[str, _Check]] = {
    "path": _path,
    "methods": _text_set(_method, len(model.HTTP_METHODS)),
    "host": _optional(_host),
    "headers": _headers,
    "priority": _integer(-MAX_PRIORITY, MAX_PRIORITY),
    "upstreams": _optional(_upstreams),
    "load_balancing": _choice(*model.LOAD_BALANCING),
    "hash_on": _optional(_text(MAX_HASH_ON_LENGTH, model.validate_hash_on)),
    "auth_required": _boolean,
    "tenants": _text_set(_tenant_name, MAX_ROUTE_TENANTS),
    "tiers": _text_set(_choice(*model.TIERS), len(model.TIERS)),
    "scopes": _text_set(_text(model.MAX_SCOPE_LENGTH, model.validate_scope), MAX_ROUTE_SCOPES),
    "rate_limit": _optional(_integer(1, MAX_INT32)),
    "burst": _optional(_integer(1, MAX_INT32)),
    "timeout_ms": _integer(1, model.MAX_TIMEOUT_MS),
    "retries": _integer(0, model.MAX_RETRIES),
    "strip_prefix": _boolean,
    "websocket": _boolean,
    "max_body_bytes": _integer(0, MAX_QUOTA),
    "rate_limit_shadow": _boolean,
    "is_active": _boolean,
    "circuit_breaker": _section_of(_CIRCUIT_BREAKER_SPECS),
    "health_check": _section_of(_HEALTH_CHECK_SPECS),
}
_ROUTE_SPECS: Final[Mapping[str, tuple[_Check, Any]]] = {
    **{name: (_ROUTE_CHECKS[name], ROUTE_DEFAULTS.get(name, _REQUIRED)) for name in ROUTE_FIELDS},
    # Exactly one of the two (checked in _route).
    "upstream": (_optional(_upstream_url), None),
    "upstreams": (_ROUTE_CHECKS["upstreams"], None),
}


def _route(value: Any, at: _At) -> Obj:
    out = _fields(value, at, _ROUTE_SPECS)
    upstream = out.pop("upstream")
    if (upstream is None) == (out["upstreams"] is None):
        raise at.error("give exactly one of upstream (a URL) and upstreams (a list of {url, weight})")
    if upstream is not None:
        out["upstreams"] = [{"url": upstream, "weight": 1}]
    if out["burst"] is not None and out["rate_limit"] is None:
        raise at.key(value, "burst").error("needs a rate_limit on the route")
    if out["load_balancing"] == "consistent_hash":
        out["hash_on"] = out["hash_on"] or DEFAULT_HASH_ON
    elif out["hash_on"] is not None:
        raise at.key(value, "hash_on").error("only applies with load_balancing: consistent_hash")
    return {name: out[name] for name in ROUTE_FIELDS}


def _jwks(value: Any, at: _At) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("keys"), list):
        raise at.error("must be a JWKS mapping: {keys: [...]}")
    if len(json.dumps(value)) > MAX_KEY_MATERIAL_CHARS:
        raise at.error(f"is larger than {MAX_KEY_MATERIAL_CHARS} characters")
    return dict(_plain(value))


def _plain(value: Any) -> Any:
    """YAML's mappings as plain dicts (they compare and serialise like the admin API's JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _algorithm(value: Any, at: _At) -> str:
    if value not in model.JWT_ALGORITHMS or not isinstance(value, str):
        raise at.error(f"must be one of {', '.join(sorted(model.JWT_ALGORITHMS))}, got {value!r}")
    return value


_ISSUER_SPECS: Final[Mapping[str, tuple[_Check, Any]]] = {
    "tenant": (_tenant_name, _REQUIRED),
    "issuer": (_text(model.MAX_ISSUER_LENGTH), _REQUIRED),
    "audience": (_text(MAX_AUDIENCE_LENGTH), _REQUIRED),
    "algorithms": (_text_set(_algorithm, len(model.JWT_ALGORITHMS)), _REQUIRED),
    "jwks": (_optional(_jwks), None),
    "jwks_uri": (_optional(_text(MAX_URL_LENGTH)), None),
    "public_key_pem": (_optional(_text(MAX_KEY_MATERIAL_CHARS)), None),
    "hs256_secret": (_optional(_text(MAX_KEY_MATERIAL_CHARS)), None),
}


def _issuer(value: Any, at: _At) -> Obj:
    """An issuer in canonical form: tenant, issuer, audience, algorithms, and the one key source
    it names (none for an HS256 issuer that keeps its stored secret)."""
    out = _fields(value, at, _ISSUER_SPECS)
    given = [name for name in ISSUER_KEY_SOURCES if out[name] is not None]
    hmac = set(out["algorithms"]) <= model.HMAC_JWT_ALGORITHMS
    if not out["algorithms"]:
        raise at.key(value, "algorithms").error("name at least one algorithm")
    if len(given) > 1:
        raise at.key(value, given[1]).error(f"give exactly one key source, not {' and '.join(given)}")
    if not given and not hmac:
        raise at.error("give one key source: jwks, jwks_uri or public_key_pem")
    if hmac and given and given[0] != "hs256_secret":
        raise at.key(value, given[0]).error("HS256 issuers take hs256_secret (or nothing, to keep the stored one)")
    if not hmac and given == ["hs256_secret"]:
        raise at.key(value, "hs256_secret").error("is only for algorithms [HS256]")
    issuer: Obj = {name: out[name] for name in ("tenant", "issuer", "audience", "algorithms")}
    for name in given:
        issuer[name] = out[name]
    return issuer


def issuer_source(issuer: Mapping[str, Any]) -> str:
    """Which key source a canonical issuer has (``hs256_secret`` also when the secret is kept)."""
    return next((name for name in ISSUER_KEY_SOURCES if name in issuer), HS256_KEPT)


def issuer_label(issuer: Mapping[str, Any]) -> str:
    return f"{issuer['issuer']} of {issuer['tenant']}"


def _unique_issuers(issuers: list[_Parsed]) -> None:
    by_identity: dict[tuple[str, str], _Parsed] = {}
    by_audience: dict[tuple[str, str], _Parsed] = {}
    for i in issuers:
        for seen, key, what in (
            (by_identity, (i.obj["tenant"], i.obj["issuer"]), "a tenant has one entry per issuer"),
            (by_audience, (i.obj["issuer"], i.obj["audience"]), "one tenant per (issuer, audience)"),
        ):
            first = seen.setdefault(key, i)
            if first is not i:
                raise i.at.error(
                    f"issuer {i.obj['issuer']!r} is already declared by {first.at.path} (line {first.at.line}): {what}"
                )


def _unique_tenants(tenants: list[_Parsed]) -> None:
    seen: dict[str, _Parsed] = {}
    for t in tenants:
        first = seen.setdefault(t.obj["name"], t)
        if first is not t:
            raise t.at.error(
                f"tenant name {t.obj['name']!r} is already used by {first.at.path} (line {first.at.line});"
                " names identify tenants and must be unique"
            )


def _unique_routes(routes: list[_Parsed]) -> None:
    seen: dict[tuple[Any, ...], _Parsed] = {}
    by_match: dict[tuple[Any, ...], list[_Parsed]] = {}
    for r in routes:
        first = seen.setdefault(route_key(r.obj), r)
        if first is not r:
            raise r.at.error(
                f"route {route_label(r.obj)} is already declared by {first.at.path} (line {first.at.line});"
                " path, host, headers, priority and methods identify a route"
            )
        if r.obj["is_active"]:
            for other in by_match.setdefault(_match_key(r.obj), []):
                if _clash(r.obj, other.obj):
                    raise r.at.error(
                        f"route {route_label(r.obj)} would serve the same requests as {other.at.path}"
                        f" (line {other.at.line}): same path, host, headers and priority, overlapping methods"
                    )
            by_match[_match_key(r.obj)].append(r)


# --- canonical forms, identity and labels ---


def route_key(route: Mapping[str, Any]) -> tuple[Any, ...]:
    """A route's identity: (path, host, sorted headers, priority, sorted methods)."""
    return (
        route["path"],
        route["host"] or "",
        tuple(sorted(route["headers"].items())),
        route["priority"],
        tuple(sorted(route["methods"])),
    )


def _match_key(route: Mapping[str, Any]) -> tuple[Any, ...]:
    return route_key(route)[:4]


def _clash(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether the admin API would refuse both being active (409 route_conflict)."""
    if not (a["is_active"] and b["is_active"]) or _match_key(a) != _match_key(b):
        return False
    return not a["methods"] or not b["methods"] or bool(set(a["methods"]) & set(b["methods"]))


def route_label(route: Mapping[str, Any]) -> str:
    """``GET,POST /api/* host=api.example.com headers={x-version: 2} priority=5``."""
    label = f"{','.join(route['methods'])} {route['path']}" if route["methods"] else route["path"]
    if route["host"]:
        label += f" host={route['host']}"
    if route["headers"]:
        label += f" headers={show(route['headers'])}"
    if route["priority"]:
        label += f" priority={route['priority']}"
    return label


def show(value: Any) -> str:
    """A value as the diff prints it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or "''"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def live_tenant(item: Mapping[str, Any]) -> Obj:
    """A tenant of the admin API in canonical form."""
    return {name: item[name] for name in TENANT_FIELDS}


def live_issuer(item: Mapping[str, Any], names_by_id: Mapping[str, str]) -> Obj:
    """An issuer of the admin API in canonical form (the HS256 secret is never returned)."""
    issuer: Obj = {
        "tenant": names_by_id.get(item["tenant_id"], item["tenant_id"]),
        "issuer": item["issuer"],
        "audience": item["audience"],
        "algorithms": sorted(set(item["algorithms"])),
    }
    source = item["key_source"]
    if source != "hs256_secret":
        issuer[source] = item[source]
    return issuer


def _issuer_changes(old: Obj, new: Obj) -> tuple[tuple[str, Any, Any], ...]:
    """What differs between a live issuer and the file's. Key material shows as a short mark."""
    changes: list[tuple[str, Any, Any]] = [
        (name, old[name], new[name]) for name in ("audience", "algorithms") if old[name] != new[name]
    ]
    old_source, new_source = issuer_source(old), issuer_source(new)
    if old_source != new_source:
        changes.append(("key source", old_source, new_source))
    elif new_source in ("jwks", "jwks_uri") and old[new_source] != new[new_source]:
        changes.append((new_source, _brief(old[new_source]), _brief(new[new_source])))
    elif new_source == "public_key_pem" and old[new_source].strip() != new[new_source].strip():
        changes.append((new_source, "(a key)", "(another key)"))
    return tuple(changes)


def _brief(value: Any) -> Any:
    if isinstance(value, dict):
        kids = [k.get("kid") for k in value.get("keys", []) if isinstance(k, dict)]
        return f"(keys {', '.join(str(k) for k in kids)})"
    return value


def live_route(item: Mapping[str, Any], names_by_id: Mapping[str, str]) -> Obj:
    """A route of the admin API in canonical form; tenant ids become names (an unknown id stays as is)."""
    cb, hc = item.get("circuit_breaker"), item.get("health_check")
    route: Obj = {
        "path": item["path"],
        "methods": sorted({m.upper() for m in item.get("methods") or []}),
        "host": item.get("host") or None,
        "headers": dict(sorted((k.lower(), v) for k, v in (item.get("headers") or {}).items())),
        "priority": item.get("priority", 0),
        "upstreams": [{"url": u["url"], "weight": u.get("weight", 1)} for u in item["upstreams"]],
        "tenants": sorted({names_by_id.get(t, t) for t in item.get("tenants") or []}),
        "tiers": sorted(set(item.get("tiers") or [])),
        "scopes": sorted(set(item.get("scopes") or [])),
        "circuit_breaker": None if cb is None else {**cb, "failure_rate": float(cb["failure_rate"])},
        "health_check": None if hc is None else dict(hc),
    }
    for name in ROUTE_FIELDS:
        route.setdefault(name, item.get(name, ROUTE_DEFAULTS.get(name)))
    return {name: route[name] for name in ROUTE_FIELDS}


# --- the diff ---


@dataclass(frozen=True, slots=True)
class Change:
    """One admin API write. ``values``: the whole object (create) or the new values (update);
    ``fields``: (name, old, new) per changed field (update)."""

    action: str  # create | update | delete (an issuer's update deletes it and creates it again)
    kind: str  # tenant | route | issuer
    label: str
    id: str | None = None
    values: Obj = field(default_factory=dict)
    fields: tuple[tuple[str, Any, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class LiveState:
    """What the admin API holds: its tenant and route items as it returns them."""

    tenants: tuple[Obj, ...]
    routes: tuple[Obj, ...]
    jwt_issuers: tuple[Obj, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    changes: tuple[Change, ...]  # in the order apply makes them

    def summary(self) -> str:
        if not self.changes:
            return "no changes"
        counts = {a: sum(c.action == a for c in self.changes) for a in ("create", "update", "delete")}
        return f"{counts['create']} to create, {counts['update']} to update, {counts['delete']} to delete"

    def lines(self) -> list[str]:
        """The diff: ``+ tenant Acme``, ``~ route GET /api/* : timeout_ms 30000 → 5000``, ``- route /old/*``."""
        out = []
        for c in self.changes:
            if c.action == "update":
                out += [f"~ {c.kind} {c.label} : {name} {show(old)} → {show(new)}" for name, old, new in c.fields]
            else:
                out.append(f"{'+' if c.action == 'create' else '-'} {c.kind} {c.label}")
        return out


def unique_live_names(tenants: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Live tenant name → id; :class:`StateError` naming any name two tenants share."""
    ids: dict[str, str] = {}
    dupes: dict[str, list[str]] = {}
    for t in tenants:
        if t["name"] in ids:
            dupes.setdefault(t["name"], [ids[t["name"]]]).append(t["id"])
        ids.setdefault(t["name"], t["id"])
    if dupes:
        listed = "; ".join(f"{name!r}: {', '.join(tids)}" for name, tids in sorted(dupes.items()))
        raise StateError(
            f"tenant names identify tenants, but several live tenants share a name ({listed});"
            " rename or delete all but one (PATCH/DELETE /admin/tenants/ID), then run again"
        )
    return ids


def _with_limits(tenant: Obj, tiers: Mapping[str, Mapping[str, int]]) -> Obj:
    if all(tenant[name] is not None for name in TIER_LIMITS):
        return tenant
    if tenant["tier"] not in tiers:
        raise StateError(f"tenant {tenant['name']!r}: the admin API lists no tier {tenant['tier']!r}")
    return {name: tiers[tenant["tier"]][name] if tenant[name] is None else tenant[name] for name in TENANT_FIELDS}


def _field_changes(old: Obj, new: Obj, names: Sequence[str]) -> tuple[tuple[str, Any, Any], ...]:
    return tuple((name, old[name], new[name]) for name in names if old[name] != new[name])


def plan(doc: Document, live: LiveState, tiers: Mapping[str, Mapping[str, int]]) -> Plan:
    """The changes that make ``live`` equal ``doc``, in a safe order. ``tiers`` gives each tier's
    default limits (``GET /admin/tiers``) for tenants whose file omits them."""
    ids_by_name = unique_live_names(live.tenants)
    names_by_id = {tid: name for name, tid in ids_by_name.items()}
    live_tenants = {t["name"]: live_tenant(t) for t in live.tenants}

    t_create: list[Change] = []
    t_update: list[Change] = []
    t_delete: list[Change] = []
    if doc.tenants is not None:
        wanted = [_with_limits(t, tiers) for t in doc.tenants]
        for t in wanted:
            old = live_tenants.get(t["name"])
            if old is None:
                t_create.append(Change("create", "tenant", t["name"], values=t))
            elif changed := _field_changes(old, t, TENANT_FIELDS):
                values = {name: new for name, _, new in changed}
                t_update.append(Change("update", "tenant", t["name"], ids_by_name[t["name"]], values, changed))
        kept = {t["name"] for t in wanted}
        t_delete = [
            Change("delete", "tenant", name, ids_by_name[name]) for name in sorted(live_tenants) if name not in kept
        ]
    known_names = {t["name"] for t in doc.tenants} if doc.tenants is not None else set(live_tenants)
    issuer_changes = _plan_issuers(doc, live, names_by_id, known_names)

    live_routes: dict[tuple[Any, ...], tuple[str, Obj]] = {}
    for item in live.routes:
        route = live_route(item, names_by_id)
        other = live_routes.setdefault(route_key(route), (item["id"], route))
        if other[0] != item["id"]:
            raise StateError(
                f"routes {other[0]} and {item['id']} are both {route_label(route)} (one is probably inactive);"
                " path, host, headers, priority and methods identify a route: delete or change one"
                " (DELETE/PATCH /admin/routes/ID), then run again"
            )

    if doc.routes is None:
        deleted = {c.label for c in t_delete}
        for rid, route in live_routes.values():
            gone = sorted(deleted.intersection(route["tenants"]))
            if gone:
                raise StateError(
                    f"tenant {gone[0]!r} would be deleted but route {route_label(route)} ({rid}) names it,"
                    " and the file has no routes: section to change that route; add the routes or keep the tenant"
                )
        return Plan((*t_create, *t_update, *issuer_changes, *t_delete))

    r_update: list[Change] = []
    r_create: list[Change] = []
    for route in doc.routes:
        missing = [n for n in route["tenants"] if n not in known_names]
        if missing:
            where = "in the file's tenants: list" if doc.tenants is not None else "(the file has no tenants: section)"
            raise StateError(f"route {route_label(route)}: there is no tenant named {missing[0]!r} {where}")
        found = live_routes.get(route_key(route))
        if found is None:
            r_create.append(Change("create", "route", route_label(route), values=route))
        elif changed := _field_changes(found[1], route, ROUTE_FIELDS):
            values = {name: new for name, _, new in changed}
            r_update.append(Change("update", "route", route_label(route), found[0], values, changed))
    wanted_keys = {route_key(r) for r in doc.routes}
    active: dict[tuple[Any, ...], list[Obj]] = {}
    for r in doc.routes:
        if r["is_active"]:
            active.setdefault(_match_key(r), []).append(r)
    first_deletes: list[Change] = []
    last_deletes: list[Change] = []
    for key in sorted(live_routes, key=lambda k: (k[0], k[3], k[1], k[2], k[4])):
        if key in wanted_keys:
            continue
        rid, route = live_routes[key]
        delete = Change("delete", "route", route_label(route), rid)
        # A live route that serves what a route of the file will must go first: the admin API
        # refuses two active routes that match the same requests.
        clashes = any(_clash(route, r) for r in active.get(_match_key(route), ()))
        (first_deletes if clashes else last_deletes).append(delete)
    return Plan((*t_create, *t_update, *issuer_changes, *first_deletes, *r_update, *r_create, *last_deletes, *t_delete))


def _plan_issuers(doc: Document, live: LiveState, names_by_id: Mapping[str, str], known: set[str]) -> list[Change]:
    """Deletes first (an issuer moving between tenants frees its (issuer, audience) first), then
    replacements, then creates. Issuers of tenants being deleted are deleted explicitly too."""
    if doc.jwt_issuers is None:
        return []
    live_issuers = {}
    for item in live.jwt_issuers:
        issuer = live_issuer(item, names_by_id)
        live_issuers[(issuer["tenant"], issuer["issuer"])] = (item["id"], item["tenant_id"], issuer)
    deletes: list[Change] = []
    replaces: list[Change] = []
    creates: list[Change] = []
    for issuer in doc.jwt_issuers:
        if issuer["tenant"] not in known:
            where = "in the file's tenants: list" if doc.tenants is not None else "(the file has no tenants: section)"
            raise StateError(f"issuer {issuer_label(issuer)}: there is no tenant named {issuer['tenant']!r} {where}")
        found = live_issuers.get((issuer["tenant"], issuer["issuer"]))
        if found is None:
            if issuer_source(issuer) == HS256_KEPT and "hs256_secret" not in issuer:
                raise StateError(f"issuer {issuer_label(issuer)}: creating an HS256 issuer needs its hs256_secret")
            creates.append(Change("create", "issuer", issuer_label(issuer), values=issuer))
        elif changed := _issuer_changes(found[2], issuer):
            if issuer_source(issuer) == HS256_KEPT and "hs256_secret" not in issuer:
                raise StateError(
                    f"issuer {issuer_label(issuer)}: changing an HS256 issuer recreates it, which needs its"
                    " hs256_secret in the file (the stored secret cannot be read back)"
                )
            replaces.append(
                Change("update", "issuer", issuer_label(issuer), found[0], {**issuer, "tenant_id": found[1]}, changed)
            )
    wanted = {(i["tenant"], i["issuer"]) for i in doc.jwt_issuers}
    for key in sorted(live_issuers):
        if key not in wanted:
            iid, tid, issuer = live_issuers[key]
            deletes.append(Change("delete", "issuer", issuer_label(issuer), iid, {"tenant_id": tid}))
    return [*deletes, *replaces, *creates]


# --- the admin API over HTTP ---


def admin_base_url(settings: Settings, override: str | None) -> str:
    """``--admin-url`` if given, else the address of TENANTGATE_ADMIN_LISTEN (a wildcard host
    becomes loopback)."""
    if override is None:
        addr = settings.admin_listen
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(addr.host, addr.host)
        return f"http://{HostPort(host, addr.port)}"
    parts = urllib.parse.urlsplit(override)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise UsageError(f"--admin-url {override!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise UsageError(f"--admin-url {override!r}: expected http(s)://HOST:PORT, e.g. http://127.0.0.1:8001")
    return override.rstrip("/")


class AdminClient:
    """The few admin API calls apply and export make. Every failure is a :class:`DeclarativeError`."""

    def __init__(self, base_url: str, token: Secret, timeout: float = HTTP_TIMEOUT_S) -> None:
        self.base_url = base_url
        self._token = token
        self._timeout = timeout

    def call(self, method: str, path: str, body: Obj | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {
            "Authorization": f"Bearer {self._token.reveal()}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:  # noqa: S310 - http(s) checked
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except urllib.error.URLError as exc:
            reason = exc.reason.strerror if isinstance(exc.reason, OSError) else None
            raise AdminUnreachable(self.base_url, reason or str(exc.reason)) from None
        except OSError as exc:  # timeouts, resets
            raise AdminUnreachable(self.base_url, str(exc) or type(exc).__name__) from None
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        if 200 <= status < 300 and parsed is not None:
            return parsed
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if not isinstance(error, dict):
            raise AdminAPIError(
                status,
                "unexpected_response",
                f"{method} {path} did not answer with the admin API's JSON — is {self.base_url} the admin API?",
            )
        raise AdminAPIError(
            status, str(error.get("code", "error")), str(error.get("message", "")), str(error.get("request_id", ""))
        )

    def read(self, path: str) -> Any:
        """GET; a 404 here means the URL is not the admin API."""
        try:
            return self.call("GET", path)
        except AdminAPIError as exc:
            if exc.status != 404:
                raise
            raise AdminAPIError(
                404, exc.code, f"GET {path}: {exc.message} — is {self.base_url} the admin API?", exc.request_id
            ) from None

    def live_state(self) -> LiveState:
        tenants: list[Obj] = []
        cursor: str | None = None
        while True:
            query = urllib.parse.urlencode({"limit": PAGE_SIZE, **({"cursor": cursor} if cursor else {})})
            page = self.read(f"/admin/tenants?{query}")
            tenants += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        routes = self.read("/admin/routes")["items"]
        issuers = self.read("/admin/jwt-issuers")["items"]
        return LiveState(tuple(tenants), tuple(routes), tuple(issuers))

    def tiers(self) -> dict[str, dict[str, int]]:
        return {t["name"]: {k: t[k] for k in TIER_LIMITS} for t in self.read("/admin/tiers")["tiers"]}


def _execute_issuer(change: Change, client: AdminClient, tenant_ids: dict[str, str], out: TextIO) -> None:
    if change.action != "create":
        client.call("DELETE", f"/admin/tenants/{change.values['tenant_id']}/jwt-issuers/{change.id}")
    if change.action != "delete":
        body = {k: v for k, v in change.values.items() if k not in ("tenant", "tenant_id")}
        client.call("POST", f"/admin/tenants/{tenant_ids[change.values['tenant']]}/jwt-issuers", body)
    done = {"create": "created", "update": "replaced", "delete": "deleted"}[change.action]
    print(f"{done} issuer {change.label}", file=out, flush=True)


def _execute(change: Change, client: AdminClient, tenant_ids: dict[str, str], out: TextIO) -> None:
    if change.kind == "issuer":
        _execute_issuer(change, client, tenant_ids, out)
        return
    base = f"/admin/{change.kind}s"
    if change.action == "delete":
        client.call("DELETE", f"{base}/{change.id}")
        print(f"deleted {change.kind} {change.label}", file=out, flush=True)
        return
    body = dict(change.values)
    if change.kind == "route" and "tenants" in body:
        body["tenants"] = [tenant_ids[name] for name in body["tenants"]]
    if change.action == "update":
        client.call("PATCH", f"{base}/{change.id}", body)
        print(f"updated {change.kind} {change.label}", file=out, flush=True)
        return
    if change.kind == "route":
        client.call("POST", base, body)
        print(f"created route {change.label}", file=out, flush=True)
        return
    inactive = body.pop("is_active") is False  # created active; switched off right after
    created = client.call("POST", base, body)
    tenant_ids[change.label] = created["id"]
    print(f"created tenant {change.label}", file=out, flush=True)
    print(f"  API key of {change.label} (shown only now, store it safely): {created['api_key']}", file=out, flush=True)
    if inactive:
        client.call("PATCH", f"{base}/{created['id']}", {"is_active": False})


def run_apply(
    client: AdminClient, path: str, *, dry_run: bool = False, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``tenantgate apply``: exit code 0 when the live state equals the file (or would, with ``dry_run``)."""
    out, err = out or sys.stdout, err or sys.stderr
    done, total = 0, 0
    try:
        source, text = read_source(path)
        doc = parse(text, source)
        live = client.live_state()
        the_plan = plan(doc, live, client.tiers())
        for line in the_plan.lines():
            print(line, file=out)
        print(the_plan.summary(), file=out)
        if dry_run or not the_plan.changes:
            if dry_run and the_plan.changes:
                print("dry run: nothing was changed", file=out)
            return 0
        tenant_ids = unique_live_names(live.tenants)
        total = len(the_plan.changes)
        for change in the_plan.changes:
            try:
                _execute(change, client, tenant_ids, out)
            except DeclarativeError as exc:
                raise ApplyFailed(change, done, total, exc) from None
            done += 1
        print(f"applied {done} changes", file=out)
        return 0
    except DeclarativeError as exc:
        print(f"tenantgate apply: {exc}", file=err)
        return 1


# --- export ---


class _Dumper(yaml.SafeDumper):
    """Block style, list items indented under their key, lists of scalars on one line."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, data, flow_style=flow)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    """Multi-line text (a PEM key) as a literal block, the way it was written."""
    style = "|" if "\n" in data else None
    return dumper.represent_scalar(yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG, data, style=style)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(str, _represent_str)

EXPORT_HEADER: Final = (
    "# tenantgate declarative configuration (tenantgate export); apply with: tenantgate apply -f FILE\n"
    "# API keys and HS256 issuer secrets are never exported (apply keeps the stored secret).\n"
)


def export_text(live: LiveState, warn: Callable[[str], None] | None = None) -> str:
    """The live state as a config file: every field, tenants by name, routes by path then priority."""
    ids_by_name = unique_live_names(live.tenants)
    names_by_id = {tid: name for name, tid in ids_by_name.items()}
    tenants = sorted((live_tenant(t) for t in live.tenants), key=lambda t: t["name"])
    routes = []
    for item in live.routes:
        route = live_route(item, names_by_id)
        unknown = [t for t in item.get("tenants") or [] if t not in names_by_id]
        if unknown and warn is not None:
            warn(
                f"route {route_label(route)} ({item['id']}) names tenant id {unknown[0]} that does not exist;"
                " it is exported as the id, which apply refuses until you remove it"
            )
        routes.append(route)
    routes.sort(key=lambda r: (r["path"], r["priority"], r["host"] or "", tuple(r["headers"].items()), r["methods"]))
    issuers = sorted((live_issuer(i, names_by_id) for i in live.jwt_issuers), key=lambda i: (i["tenant"], i["issuer"]))
    body = yaml.dump(
        {"tenants": tenants, "routes": routes, "jwt_issuers": issuers},
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=120,
    )
    return EXPORT_HEADER + body


def run_export(client: AdminClient, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``tenantgate export``: the live state as YAML on ``out``."""
    out, err = out or sys.stdout, err or sys.stderr

    def warn(message: str) -> None:
        print(f"tenantgate export: warning: {message}", file=err)

    try:
        text = export_text(client.live_state(), warn)
    except DeclarativeError as exc:
        print(f"tenantgate export: {exc}", file=err)
        return 1
    out.write(text)
    out.flush()
    return 0
