"""data_plane.router: most-specific-match routing, method filtering, params, scale."""

from __future__ import annotations

from dataclasses import replace

import pytest

from data_plane import router as router_module
from data_plane.router import Router
from shared.snapshot import Route, Upstream

pytestmark = pytest.mark.unit

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _route(id: str, path: str, methods: tuple[str, ...] = (), priority: int = 0) -> Route:
    return Route(
        id=id,
        path=path,
        methods=methods,
        upstreams=(Upstream(f"http://{id}.upstream:8080", 1),),
        auth_required=True,
        rate_limit=0,
        timeout_ms=30_000,
        strip_prefix=False,
        priority=priority,
    )


def _winner(router: Router, path: str, method: str = "GET") -> str | None:
    m = router.match(path, method)
    return None if m is None else m.route.route.id


# --- specificity ---


def test_exact_beats_param() -> None:
    router = Router([_route("param", "/users/{id}"), _route("exact", "/users/me")])
    assert _winner(router, "/users/me") == "exact"
    assert _winner(router, "/users/42") == "param"


def test_exact_beats_wildcard() -> None:
    router = Router([_route("wild", "/users/*"), _route("exact", "/users/me")])
    assert _winner(router, "/users/me") == "exact"
    assert _winner(router, "/users/you") == "wild"


def test_param_beats_wildcard() -> None:
    router = Router([_route("wild", "/users/*"), _route("param", "/users/{id}")])
    assert _winner(router, "/users/42") == "param"
    assert _winner(router, "/users/42/posts") == "wild"


def test_exact_beats_higher_priority_param_and_wildcard() -> None:
    router = Router(
        [
            _route("wild", "/a/*", priority=100),
            _route("param", "/a/{x}", priority=50),
            _route("exact", "/a/b"),
        ]
    )
    assert _winner(router, "/a/b") == "exact"


def test_param_beats_wildcard_with_longer_literal_prefix() -> None:
    # Class comes before literal prefix length.
    router = Router([_route("wild", "/a/b/*"), _route("param", "/a/{x}")])
    assert _winner(router, "/a/b") == "param"


def test_longer_literal_prefix_wins_among_wildcards() -> None:
    router = Router([_route("short", "/api/*"), _route("long", "/api/users/*"), _route("root", "/*")])
    assert _winner(router, "/api/users/1") == "long"
    assert _winner(router, "/api/users") == "long"
    assert _winner(router, "/api/orders/1") == "short"
    assert _winner(router, "/other") == "root"


def test_longer_literal_prefix_wins_among_params() -> None:
    router = Router([_route("short", "/a/{x}/c"), _route("long", "/a/b/{y}")])
    assert _winner(router, "/a/b/c") == "long"


def test_longer_literal_prefix_beats_priority() -> None:
    router = Router([_route("short", "/api/*", priority=100), _route("long", "/api/users/*", priority=0)])
    assert _winner(router, "/api/users/1") == "long"


def test_priority_breaks_ties() -> None:
    router = Router([_route("low", "/a/{x}", priority=1), _route("high", "/a/{y}", priority=5)])
    assert _winner(router, "/a/1") == "high"


def test_priority_breaks_ties_between_wildcards() -> None:
    router = Router([_route("low", "/a/*", priority=-1), _route("high", "/a/*", priority=0)])
    assert _winner(router, "/a/b") == "high"


def test_older_route_wins_full_tie() -> None:
    router = Router([_route("first", "/a/{x}"), _route("second", "/a/{y}")])
    assert _winner(router, "/a/1") == "first"


def test_priority_breaks_ties_between_wildcards_of_different_depth() -> None:
    # Same class (wildcard), same literal prefix (1): per SPEC the priority decides.
    router = Router([_route("shallow", "/a/*", priority=10), _route("deep", "/a/{x}/*", priority=0)])
    assert _winner(router, "/a/1/2") == "shallow"


# --- wildcard ---


@pytest.mark.parametrize("path", ["/a", "/a/", "/a/b", "/a/b/c", "/a/b/c/"])
def test_wildcard_matches_prefix_itself_and_everything_below(path: str) -> None:
    router = Router([_route("wild", "/a/*")])
    assert _winner(router, path) == "wild"


@pytest.mark.parametrize("path", ["/ab", "/", "/b/a", "/A"])
def test_wildcard_does_not_match_other_prefixes(path: str) -> None:
    router = Router([_route("wild", "/a/*")])
    assert router.match(path, "GET") is None


@pytest.mark.parametrize("path", ["/", "/x", "/x/y/z"])
def test_root_wildcard_matches_everything(path: str) -> None:
    assert _winner(Router([_route("all", "/*")]), path) == "all"


def test_wildcard_below_param() -> None:
    router = Router([_route("files", "/{tenant}/files/*")])
    assert _winner(router, "/acme/files") == "files"
    assert _winner(router, "/acme/files/x/y") == "files"
    assert router.match("/acme/other", "GET") is None
    assert router.match("/files", "GET") is None


# --- param ---


def test_param_matches_exactly_one_segment() -> None:
    router = Router([_route("param", "/users/{id}")])
    assert _winner(router, "/users/42") == "param"
    assert router.match("/users", "GET") is None
    assert router.match("/users/", "GET") is None
    assert router.match("/users/42/posts", "GET") is None


def test_param_does_not_match_empty_segment() -> None:
    router = Router([_route("param", "/users/{id}/posts")])
    assert router.match("/users//posts", "GET") is None
    assert _winner(router, "/users/7/posts") == "param"


def test_params_are_extracted() -> None:
    router = Router([_route("r", "/orgs/{org}/repos/{repo}")])
    m = router.match("/orgs/acme/repos/gateway", "GET")
    assert m is not None
    assert m.params == {"org": "acme", "repo": "gateway"}


def test_params_are_extracted_from_decoded_path() -> None:
    router = Router([_route("r", "/files/{name}")])
    m = router.match("/files/r\u00e9sum\u00e9", "GET")
    assert m is not None
    assert m.params == {"name": "r\u00e9sum\u00e9"}


def test_params_are_extracted_before_wildcard() -> None:
    router = Router([_route("r", "/{tenant}/files/*")])
    m = router.match("/acme/files/a/b", "GET")
    assert m is not None
    assert m.params == {"tenant": "acme"}


def test_exact_match_has_no_params() -> None:
    m = Router([_route("r", "/a/b")]).match("/a/b", "GET")
    assert m is not None
    assert m.params == {}


def test_params_belong_to_the_winning_route() -> None:
    router = Router([_route("generic", "/{kind}/{id}"), _route("users", "/users/{user_id}")])
    m = router.match("/users/9", "GET")
    assert m is not None
    assert m.route.route.id == "users"
    assert m.params == {"user_id": "9"}


# --- exact and trailing slash ---


def test_exact_route_matches_only_its_path() -> None:
    router = Router([_route("exact", "/a/b")])
    assert _winner(router, "/a/b") == "exact"
    assert router.match("/a", "GET") is None
    assert router.match("/a/b/c", "GET") is None
    assert router.match("/a/bc", "GET") is None


def test_trailing_slash_matches_exact_route() -> None:
    router = Router([_route("exact", "/a/b")])
    assert _winner(router, "/a/b/") == "exact"


def test_root_route_matches_only_root() -> None:
    router = Router([_route("root", "/")])
    assert _winner(router, "/") == "root"
    assert router.match("/a", "GET") is None


def test_matching_is_case_sensitive() -> None:
    router = Router([_route("exact", "/Users")])
    assert router.match("/users", "GET") is None
    assert _winner(router, "/Users") == "exact"


# --- no route ---


def test_no_route_returns_none() -> None:
    router = Router([_route("a", "/a"), _route("b", "/b/{x}"), _route("c", "/c/*")])
    assert router.match("/d", "GET") is None
    assert router.allow_header("/d") == ()


def test_empty_router_returns_none() -> None:
    router = Router([])
    assert router.size == 0
    assert router.match("/", "GET") is None


# --- methods ---


def test_route_without_methods_allows_every_method_but_trace() -> None:
    router = Router([_route("any", "/a")])
    for method in ALL_METHODS:
        m = router.match("/a", method)
        assert m is not None
        assert method in m.route.methods
    assert router.allow_header("/a") == ALL_METHODS
    trace = router.match("/a", "TRACE")
    assert trace is not None and "TRACE" not in trace.route.methods


def test_trace_is_allowed_where_the_route_lists_it() -> None:
    router = Router([_route("echo", "/a", methods=("GET", "TRACE"))])
    m = router.match("/a", "TRACE")
    assert m is not None and "TRACE" in m.route.methods


def test_route_refusing_method_falls_through_to_less_specific_route() -> None:
    router = Router([_route("exact", "/a/b", methods=("GET",)), _route("wild", "/a/*", methods=("POST",))])
    assert _winner(router, "/a/b", "GET") == "exact"
    assert _winner(router, "/a/b", "POST") == "wild"


def test_fall_through_keeps_specificity_order() -> None:
    router = Router(
        [
            _route("exact", "/a/b", methods=("GET",)),
            _route("param", "/a/{x}", methods=("GET", "PUT")),
            _route("wild", "/a/*", methods=("PUT", "POST")),
        ]
    )
    assert _winner(router, "/a/b", "PUT") == "param"
    assert _winner(router, "/a/b", "POST") == "wild"


def test_no_route_allowing_method_returns_best_route_without_it() -> None:
    router = Router([_route("wild", "/a/*", methods=("POST",)), _route("exact", "/a/b", methods=("GET", "HEAD"))])
    m = router.match("/a/b", "DELETE")
    assert m is not None
    assert m.route.route.id == "exact"
    assert "DELETE" not in m.route.methods


def test_allow_header_is_union_of_matching_routes_methods() -> None:
    router = Router(
        [
            _route("exact", "/a/b", methods=("GET", "HEAD")),
            _route("wild", "/a/*", methods=("POST",)),
            _route("other", "/c/*", methods=("PUT",)),
        ]
    )
    assert router.allow_header("/a/b") == ("GET", "HEAD", "POST")
    assert router.allow_header("/a/b/") == ("GET", "HEAD", "POST")
    assert router.allow_header("/a/x") == ("POST",)


def test_method_not_allowed_match_keeps_params() -> None:
    router = Router([_route("r", "/users/{id}", methods=("GET",))])
    m = router.match("/users/5", "DELETE")
    assert m is not None
    assert m.params == {"id": "5"}
    assert m.route.methods == frozenset({"GET"})


# --- compiled route data ---


def test_strip_count_is_the_literal_segments_before_the_wildcard() -> None:
    router = Router([_route("wild", "/api/v1/*"), _route("exact", "/api/v1/users"), _route("root", "/*")])
    assert router.match("/api/v1/x/y", "GET").route.strip_count == 2  # type: ignore[union-attr]
    assert router.match("/api/v1/users", "GET").route.strip_count == 3  # type: ignore[union-attr]
    assert router.match("/zzz", "GET").route.strip_count == 0  # type: ignore[union-attr]


def test_size_counts_routes() -> None:
    assert Router([_route("a", "/a"), _route("b", "/b"), _route("c", "/a")]).size == 3


# --- scale ---


def test_router_with_ten_thousand_routes_matches_correctly() -> None:
    routes: list[Route] = []
    for i in range(2_500):
        routes.append(_route(f"exact-{i}", f"/svc{i}/health"))
        routes.append(_route(f"param-{i}", f"/svc{i}/items/{{item_id}}", methods=("GET",)))
        routes.append(_route(f"wild-{i}", f"/svc{i}/*", methods=("GET", "POST")))
        routes.append(_route(f"prio-{i}", f"/svc{i}/items/{{other}}", methods=("GET",), priority=-1))
    router = Router(routes)
    assert router.size == 10_000
    for i in (0, 1, 1234, 2_499):
        assert _winner(router, f"/svc{i}/health") == f"exact-{i}"
        m = router.match(f"/svc{i}/items/x{i}", "GET")
        assert m is not None
        assert m.route.route.id == f"param-{i}"
        assert m.params == {"item_id": f"x{i}"}
        assert _winner(router, f"/svc{i}/items/x{i}", "POST") == f"wild-{i}"
        assert _winner(router, f"/svc{i}/items/x/deeper", "GET") == f"wild-{i}"
        assert _winner(router, f"/svc{i}", "POST") == f"wild-{i}"
    assert router.match("/svc2500/health", "GET") is None
    assert router.match("/svc12/", "GET").route.route.id == "wild-12"  # type: ignore[union-attr]
    assert router.match("/svc", "GET") is None


def test_many_hosts_on_one_path_each_get_their_own_route() -> None:
    routes = [replace(_route(f"t{i}", "/api/*"), host=f"t{i}.example.com") for i in range(2000)]
    routes.append(replace(_route("wild", "/api/*"), host="*.example.com"))
    routes.append(_route("fallback", "/api/*"))
    router = Router(routes)

    def winner(host: str) -> str | None:
        m = router.match("/api/x", "GET", host)
        return None if m is None else m.route.route.id

    assert winner("t1234.example.com") == "t1234"
    assert winner("other.example.com") == "wild"
    assert winner("elsewhere.org") == "fallback"


# --- remembered matches ---


def test_remembered_match_answers_alike_for_every_method_and_path() -> None:
    router = Router([_route("get", "/items/{id}", ("GET",)), _route("any", "/items/*")])
    for _ in range(2):  # the second round is answered from what the router remembers
        get = router.match("/items/7", "GET")
        assert get is not None and (get.route.route.id, get.params) == ("get", {"id": "7"})
        assert _winner(router, "/items/7", "POST") == "any"
        assert _winner(router, "/items/8/x") == "any"
        assert _winner(router, "/other") is None


def test_a_changed_router_does_not_answer_from_the_old_ones_memory() -> None:
    router = Router([_route("a", "/a/*")])
    assert _winner(router, "/a/b") == "a"
    changed = router.with_changes([_route("b", "/a/b")], ())
    assert _winner(changed, "/a/b") == "b"
    assert _winner(router, "/a/b") == "a"


def test_memory_stays_bounded_under_random_paths() -> None:
    router = Router([_route("p", "/p/{x}")])
    for i in range(3 * router_module.MATCH_CACHE_SIZE):
        assert _winner(router, f"/p/{i}") == "p"
    assert len(router._cache) <= router_module.MATCH_CACHE_SIZE
