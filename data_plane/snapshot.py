"""The compiled snapshot a worker serves from, and the one reference that holds it.

Everything a request needs that can be computed per snapshot is computed here, once:
the route trie and the key table (hash → tenant). A request reads :attr:`Holder.current`
once and finishes on that object even if a newer snapshot is swapped in meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from data_plane.auth.stage import Auth
from data_plane.router import Router
from data_plane.upstream.client import Target
from shared import snapshot as model
from shared._generated.tenantgate.v1 import snapshot_pb2


@dataclass(frozen=True, slots=True)
class Compiled:
    version: int
    router: Router
    # SHA-256 of a key → its tenant. Revoked keys are absent from the snapshot.
    tenants_by_key_hash: dict[bytes, model.Tenant]
    tenants: dict[str, model.Tenant]
    # Route id → its upstream, parsed once.
    upstreams: dict[str, Target]
    compile_ms: float
    # Key table, token verifier (with its cache) and token endpoint state of this snapshot.
    auth: Auth


def compile_snapshot(msg: snapshot_pb2.Snapshot) -> Compiled:
    """Validate and compile a whole snapshot; raises ``InvalidSnapshot`` and then nothing is changed."""
    started = time.perf_counter()
    snap = model.from_proto(msg)
    tenants = {t.id: t for t in snap.tenants}
    by_hash = {k.key_hash: tenants[k.tenant_id] for k in snap.api_keys}
    router = Router(snap.routes)
    # One upstream per route for now; the first is the route's target.
    upstreams = {r.id: Target.parse(r.upstreams[0].url, r.timeout_ms) for r in snap.routes}
    auth = Auth(snap, tenants)
    return Compiled(snap.version, router, by_hash, tenants, upstreams, (time.perf_counter() - started) * 1000, auth)


class Holder:
    """The current compiled snapshot of this worker: swapped by one reference assignment."""

    __slots__ = ("current", "source")

    def __init__(self) -> None:
        self.current: Compiled | None = None
        self.source = "none"  # "control_plane" once a snapshot from the CP is live

    def swap(self, compiled: Compiled, source: str) -> None:
        self.current = compiled
        self.source = source
