"""A large configuration, loaded straight into Postgres: N routes, N tenants, K API keys.

The admin API serialises writers on the config-version row, so 10,000 + 10,000 + 100,000
objects through it would take many minutes; one transaction with COPY takes seconds. It
follows the rules every admin write follows: the config version is bumped first in the same
transaction (so change-log triggers record the new version), and the commit is announced on
the config channel so every control plane rebuilds at once. Keys are real keys, hashed with
the project's own hashing, so the data plane authenticates them like any other.

The shapes mix the three pattern kinds (literal, parameter, wildcard) so the router holds a
realistic trie, and the tenant and route the benchmark requests sit in the middle.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Final

import asyncpg

from shared.keys import display_prefix, generate_api_key, hash_key

NOTIFY_CHANNEL: Final = "tenantgate_config"
TENANT_COLUMNS: Final = (
    "id",
    "name",
    "tier",
    "rate_limit_per_minute",
    "rate_limit_per_hour",
    "monthly_quota",
    "max_concurrency",
)
KEY_COLUMNS: Final = ("id", "tenant_id", "key_hash", "prefix")
ROUTE_COLUMNS: Final = ("id", "path_pattern", "upstream_url", "upstreams", "methods")


@dataclass(frozen=True)
class Loaded:
    routes: int
    tenants: int
    keys: int
    version: int
    load_s: float
    # A request the gateway must serve with this dataset: a route and key in the middle.
    path: str
    api_key: str


def _route_pattern(i: int) -> str:
    kind = i % 3
    if kind == 0:
        return f"/svc{i}/v1/*"
    if kind == 1:
        return f"/svc{i}/items/{{item_id}}"
    return f"/svc{i}/exact/status"


def load(database_url: str, upstream_url: str, routes: int, tenants: int, keys: int) -> Loaded:
    return asyncio.run(_load(database_url, upstream_url, routes, tenants, keys))


async def _load(database_url: str, upstream_url: str, routes: int, tenants: int, keys: int) -> Loaded:
    target_route = (routes // 2) - (routes // 2) % 3  # a wildcard route in the middle
    target_tenant = tenants // 2
    tenant_ids = [uuid.uuid4() for _ in range(tenants)]
    tenant_rows = [(tenant_ids[i], f"bench-dataset-{i}", "basic", 0, 0, 0, 0) for i in range(tenants)]
    key_rows = []
    target_key = ""
    per_tenant = max(1, keys // max(1, tenants))
    for i in range(keys):
        owner = (i // per_tenant) % tenants
        key = generate_api_key()
        if owner == target_tenant and not target_key:
            target_key = key
        key_rows.append((uuid.uuid4(), tenant_ids[owner], hash_key(key), display_prefix(key)))
    upstreams = [{"url": upstream_url, "weight": 1}]
    route_rows = [(uuid.uuid4(), _route_pattern(i), upstream_url, upstreams, ["GET", "POST"]) for i in range(routes)]
    conn = await asyncpg.connect(database_url)
    try:
        # COPY speaks the binary protocol: jsonb's binary form is a version byte and the text.
        await conn.set_type_codec(
            "jsonb",
            encoder=lambda value: b"\x01" + json.dumps(value).encode(),
            decoder=lambda data: json.loads(data[1:]),
            schema="pg_catalog",
            format="binary",
        )
        start = time.perf_counter()
        async with conn.transaction():
            version: int = await conn.fetchval(
                "UPDATE config_version SET version = version + 1, updated_at = now() WHERE id = 1 RETURNING version"
            )
            await conn.copy_records_to_table("tenants", records=tenant_rows, columns=TENANT_COLUMNS)
            await conn.copy_records_to_table("api_keys", records=key_rows, columns=KEY_COLUMNS)
            await conn.copy_records_to_table("routes", records=route_rows, columns=ROUTE_COLUMNS)
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(version))
        elapsed = time.perf_counter() - start
    finally:
        await conn.close()
    return Loaded(
        routes=routes,
        tenants=tenants,
        keys=keys,
        version=version,
        load_s=round(elapsed, 3),
        path=f"/svc{target_route}/v1/items/42",
        api_key=target_key,
    )
