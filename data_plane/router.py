"""The route table, compiled once per snapshot into a segment trie.

Lookup walks the request path's segments once, following literal children and the
parameter child, and collecting wildcard routes passed on the way; its cost depends on the
path's depth, not on the number of routes. Routes for an exact host are kept per host at
each node, so thousands of tenants' hostnames on the same path cost one dict lookup.

A route with a ``host`` or ``headers`` only matches requests that carry them (host compared
without port, case-insensitively; a leading ``*.`` matches any subdomain; header values
exactly).

Among matching routes the most specific wins: exact > parameter > wildcard, then the longer
literal prefix, then the higher ``priority``, then the route with more host/header
conditions, then the longer pattern, then the older route. A path matched only by routes
that refuse the method gives 405 with the union of their methods.

A single trailing slash is ignored when matching (``/a/b/`` matches ``/a/b``), so that no
route can be side-stepped by an upstream that treats the two alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from shared import patterns
from shared.snapshot import HTTP_METHODS, Route

# A route without a method list takes every method but TRACE: TRACE echoes the request back
# (headers and all) and is allowed only where a route lists it.
_ALL_METHODS: Final = frozenset(HTTP_METHODS - {"TRACE"})

Rank = tuple[int, int, int, int, int, int]


@dataclass(slots=True)
class CompiledRoute:
    route: Route
    pattern: patterns.Pattern
    methods: frozenset[str]
    rank: Rank
    # Segments to drop from the raw path for ``strip_prefix``.
    strip_count: int
    host: str  # lower-case, "" for any
    headers: tuple[tuple[str, str], ...]
    # Access rules, as sets for O(1) checks; empty means "no restriction".
    tenants: frozenset[str]
    tiers: frozenset[str]
    scopes: frozenset[str]

    def matches(self, host: str, headers: Mapping[str, str]) -> bool:
        if self.host:
            if self.host.startswith("*."):
                if not host.endswith(self.host[1:]) or len(host) <= len(self.host) - 1:
                    return False
            elif host != self.host:
                return False
        return all(headers.get(name) == value for name, value in self.headers)


@dataclass(slots=True)
class _Slot:
    """Routes attached at one trie node: those for one exact host apart, the rest (no host,
    or a ``*.`` host, checked by :meth:`CompiledRoute.matches`) together."""

    any_host: list[CompiledRoute] = field(default_factory=list)
    by_host: dict[str, list[CompiledRoute]] = field(default_factory=dict)

    def add(self, compiled: CompiledRoute) -> None:
        if compiled.host and not compiled.host.startswith("*."):
            self.by_host.setdefault(compiled.host, []).append(compiled)
        else:
            self.any_host.append(compiled)

    def collect(self, host: str, values: list[str], found: list[tuple[CompiledRoute, list[str]]]) -> None:
        for compiled in self.any_host:
            found.append((compiled, list(values)))
        if self.by_host:
            for compiled in self.by_host.get(host, ()):
                found.append((compiled, list(values)))

    def copy(self) -> _Slot:
        return _Slot(list(self.any_host), {host: list(routes) for host, routes in self.by_host.items()})

    def remove(self, compiled: CompiledRoute) -> None:
        if compiled.host and not compiled.host.startswith("*."):
            routes = self.by_host[compiled.host]
            routes[:] = [c for c in routes if c is not compiled]
            if not routes:
                del self.by_host[compiled.host]
        else:
            self.any_host[:] = [c for c in self.any_host if c is not compiled]


@dataclass(slots=True)
class _Node:
    literals: dict[str, _Node] = field(default_factory=dict)
    param: _Node | None = None
    here: _Slot = field(default_factory=_Slot)  # patterns that end at this node
    below: _Slot = field(default_factory=_Slot)  # "/*" patterns rooted at this node

    def copy(self) -> _Node:
        return _Node(dict(self.literals), self.param, self.here.copy(), self.below.copy())


@dataclass(frozen=True, slots=True)
class Match:
    """A found route and its path parameters; shared between requests (the router remembers
    it), so callers must not change ``params``."""

    route: CompiledRoute
    params: dict[str, str]


_NO_HEADERS: Mapping[str, str] = {}
# Matches remembered per router (so per snapshot) for tables without host/header conditions;
# past this many distinct (method, path) pairs the memory starts again, so a client walking
# random paths costs a cleared dict now and then, never unbounded memory.
MATCH_CACHE_SIZE: Final = 4096


def request_host(host_header: str | None) -> str:
    """The Host header as routes compare it: lower-case, without port."""
    if not host_header:
        return ""
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        self._root = _Node()
        self.size = 0
        self.conditional = False  # any route with host/header conditions
        self._by_id: dict[str, CompiledRoute] = {}
        self._cache: dict[tuple[str, str], Match] = {}
        for order, route in enumerate(routes):
            self._add(route, order)
        self._next_order = self.size

    def with_changes(self, upserted: Iterable[Route], removed: Iterable[str]) -> Router:
        """A router without the ``removed`` route ids and with ``upserted`` routes added or
        replaced: a replaced route keeps its place in the order, a new one comes after all
        others, as if the whole list were compiled again. Only the trie nodes on the changed
        routes' paths are copied; this router is left untouched (it may be serving requests
        in another thread meanwhile)."""
        new = Router(())
        new._root, new.size, new.conditional = self._root, self.size, self.conditional
        new._by_id, new._next_order = dict(self._by_id), self._next_order
        owned: set[int] = set()
        routes = list({r.id: r for r in upserted}.values())  # an id given twice: the last wins
        orders: dict[str, int] = {}
        for rid in [*removed, *(r.id for r in routes)]:
            compiled = new._by_id.pop(rid, None)
            if compiled is not None:
                segments = compiled.pattern.segments
                wildcard = bool(segments) and segments[-1][0] == patterns.WILDCARD
                node = new._own(segments[:-1] if wildcard else segments, owned)
                (node.below if wildcard else node.here).remove(compiled)
                new.size -= 1
                orders[rid] = compiled.rank[-1]
        for route in routes:
            order = orders.get(route.id)
            if order is None:
                order, new._next_order = new._next_order, new._next_order + 1
            segments = patterns.parse(route.path).segments
            wildcard = bool(segments) and segments[-1][0] == patterns.WILDCARD
            new._own(segments[:-1] if wildcard else segments, owned)
            new._add(route, order)
        return new

    def _own(self, segments: Iterable[tuple[int, str]], owned: set[int]) -> _Node:
        """Copy the nodes along ``segments`` that this router still shares, so that changing
        them changes no other router; returns the last one."""
        if id(self._root) not in owned:
            self._root = self._root.copy()
            owned.add(id(self._root))
        node = self._root
        for kind, text in segments:
            child = node.literals.get(text) if kind == patterns.LITERAL else node.param
            if child is None:
                return node  # the rest is new: _add creates it
            if id(child) not in owned:
                child = child.copy()
                owned.add(id(child))
                if kind == patterns.LITERAL:
                    node.literals[text] = child
                else:
                    node.param = child
            node = child
        return node

    def _add(self, route: Route, order: int) -> None:
        pattern = patterns.parse(route.path)
        segments = pattern.segments
        kinds = {kind for kind, _ in segments}
        klass = 2 if patterns.WILDCARD in kinds else 1 if patterns.PARAM in kinds else 0
        conditions = (1 if route.host else 0) + len(route.headers)
        rank = (klass, -pattern.literal_prefix_length, -route.priority, -conditions, -len(segments), order)
        methods = frozenset(route.methods) if route.methods else _ALL_METHODS
        wildcard = bool(segments) and segments[-1][0] == patterns.WILDCARD
        compiled = CompiledRoute(
            route=route,
            pattern=pattern,
            methods=methods,
            rank=rank,
            strip_count=len(segments) - 1 if wildcard else len(segments),
            host=route.host.lower(),
            headers=tuple((name.lower(), value) for name, value in route.headers),
            tenants=frozenset(route.tenants),
            tiers=frozenset(route.tiers),
            scopes=frozenset(route.scopes),
        )
        self.conditional |= conditions > 0
        node = self._root
        for kind, text in segments[:-1] if wildcard else segments:
            if kind == patterns.LITERAL:
                node = node.literals.setdefault(text, _Node())
            else:
                if node.param is None:
                    node.param = _Node()
                node = node.param
        (node.below if wildcard else node.here).add(compiled)
        self._by_id[route.id] = compiled
        self.size += 1

    def match(self, path: str, method: str, host: str = "", headers: Mapping[str, str] = _NO_HEADERS) -> Match | None:
        """The best route for the request that allows ``method``; None if no route's path
        (and host/headers) matches.

        A request matched only by routes refusing ``method`` returns the best of them, whose
        ``methods`` do not include ``method``: the caller answers 405 (see :meth:`allow_header`).

        Without host or header conditions in the table the answer depends on the method and
        path alone, and is remembered (see :data:`MATCH_CACHE_SIZE`)."""
        if self.conditional:
            return self._match(path, method, host, headers)
        key = (method, path)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        found = self._match(path, method, host, headers)
        if found is not None:
            if len(self._cache) >= MATCH_CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = found
        return found

    def _match(self, path: str, method: str, host: str, headers: Mapping[str, str]) -> Match | None:
        found = self._candidates(path, host, headers)
        if not found:
            return None
        if len(found) > 1:
            found.sort(key=lambda item: item[0].rank)
        for compiled, values in found:
            if method in compiled.methods:
                return Match(compiled, self._params(compiled, values))
        best, values = found[0]
        return Match(best, self._params(best, values))

    def allow_header(self, path: str, host: str = "", headers: Mapping[str, str] = _NO_HEADERS) -> tuple[str, ...]:
        methods: set[str] = set()
        for compiled, _ in self._candidates(path, host, headers):
            methods |= compiled.methods
        return tuple(sorted(methods))

    def _candidates(self, path: str, host: str, headers: Mapping[str, str]) -> list[tuple[CompiledRoute, list[str]]]:
        if path != "/" and path.endswith("/"):
            path = path[:-1]
        segments = path[1:].split("/") if path != "/" else []
        found: list[tuple[CompiledRoute, list[str]]] = []
        self._walk(self._root, segments, 0, host, [], found)
        if self.conditional:
            found = [item for item in found if item[0].matches(host, headers)]
        return found

    def _walk(
        self,
        node: _Node,
        segments: list[str],
        i: int,
        host: str,
        values: list[str],
        found: list[tuple[CompiledRoute, list[str]]],
    ) -> None:
        node.below.collect(host, values, found)
        if i == len(segments):
            node.here.collect(host, values, found)
            return
        segment = segments[i]
        child = node.literals.get(segment)
        if child is not None:
            self._walk(child, segments, i + 1, host, values, found)
        if node.param is not None and segment:
            values.append(segment)
            self._walk(node.param, segments, i + 1, host, values, found)
            values.pop()

    @staticmethod
    def _params(compiled: CompiledRoute, values: list[str]) -> dict[str, str]:
        names = [text for kind, text in compiled.pattern.segments if kind == patterns.PARAM]
        return dict(zip(names, values, strict=False))
