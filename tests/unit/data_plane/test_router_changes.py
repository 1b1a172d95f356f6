"""data_plane.router.Router.with_changes: a router changed in place of a rebuild answers every
request as a router compiled from the whole new route list, and leaves the old one as it was."""

from __future__ import annotations

import random

import pytest

from data_plane.router import Router
from shared.snapshot import Route, Upstream

PATHS = ("/a/*", "/a/b", "/a/{id}", "/a/b/*", "/c/{x}/d", "/c/*", "/", "/*", "/a/b/c", "/e/{y}")
PROBES = ("/a", "/a/b", "/a/z", "/a/b/c", "/a/b/c/d", "/c/1/d", "/c/1", "/e/2", "/x", "/")


def route(i: int, rng: random.Random) -> Route:
    return Route(
        id=f"r{i}",
        path=rng.choice(PATHS),
        methods=rng.choice(((), ("GET",), ("POST",))),
        upstreams=(Upstream("http://u:1", 1),),
        auth_required=True,
        rate_limit=0,
        timeout_ms=1000,
        strip_prefix=False,
        priority=rng.choice((0, 0, 5)),
        host=rng.choice(("", "", "h.example", "*.example")),
    )


def answers(router: Router) -> list[tuple[str | None, tuple[str, ...]]]:
    out = []
    for path in PROBES:
        for method in ("GET", "POST"):
            for host in ("", "h.example", "x.example"):
                match = router.match(path, method, host)
                out.append((match.route.route.id if match else None, router.allow_header(path, host)))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_changes_answer_like_a_rebuild_and_leave_the_old_router_alone(seed: int) -> None:
    rng = random.Random(seed)
    routes = {f"r{i}": route(i, rng) for i in range(30)}
    router = Router(routes.values())
    next_id = 30
    for _ in range(200):
        before = answers(router)
        removed = rng.sample(sorted(routes), k=min(len(routes), rng.randint(0, 2)))
        for rid in removed:
            del routes[rid]
        upserted = []
        for _ in range(rng.randint(0, 3)):
            if routes and rng.random() < 0.5:
                rid = rng.choice(sorted(routes))
                changed = route(int(rid[1:]), rng)
            else:
                changed = route(next_id, rng)
                next_id += 1
            routes[changed.id] = changed
            upserted.append(changed)
        changed_router = router.with_changes(upserted, removed)
        assert answers(router) == before  # the old router is untouched
        assert answers(changed_router) == answers(Router(routes.values()))
        assert changed_router.size == len(routes)
        router = changed_router
