"""``GET /admin/tenants/{id}/usage``: a tenant's usage as a series, its totals, and where it
stands against its monthly quota.

``from``/``to`` are ISO 8601 instants (``Z`` or an offset; without one, UTC), the range is
``[from, to)``; defaults: the last 24 hours. A counter row belongs to the range when its
period starts in it. ``series`` holds the periods that have usage, oldest first. Rows older
than two days are kept per hour and rows older than sixty days per day: asked for a finer
granularity there, they appear as one point at their hour's or day's start.

``quota.used`` counts this calendar month's (UTC) requests that were admitted, i.e. every
request the tenant sent that was not refused with 403 or 429; it is what the data planes have
reported so far (they report every ``TENANTGATE_USAGE_FLUSH_INTERVAL_S``). A
``monthly_quota`` of 0 means unlimited, and ``remaining`` is then null.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from itertools import zip_longest
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from control_plane.api.deps import Caller, State, object_id
from control_plane.errors import Unprocessable
from control_plane.store import tenants as tenant_store
from control_plane.store import usage as store
from shared.usage import quantile

router = APIRouter(prefix="/admin/tenants/{tenant_id}/usage", tags=["usage"])

DEFAULT_RANGE: Final = timedelta(days=1)
# Most periods one answer may span, so that a query stays cheap.
MAX_PERIODS: Final = 10_080  # a week of minutes
_PERIOD: Final = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}


class Counters(BaseModel):
    requests: int
    errors: int = Field(description="Answers with a 5xx status.")
    rejected: int = Field(description="Requests refused with 403 or 429.")
    bytes_in: int
    bytes_out: int
    latency_ms_p50: float | None = Field(description="Gateway latency; null without requests.")
    latency_ms_p99: float | None


class SeriesPoint(Counters):
    start: datetime


class Quota(BaseModel):
    monthly_quota: int = Field(description="0: unlimited.")
    used: int = Field(description="This calendar month's (UTC) admitted requests: all but 403/429 refusals.")
    remaining: int | None = Field(description="null when the quota is unlimited.")


class UsageOut(BaseModel):
    tenant_id: str
    granularity: Literal["minute", "hour", "day"]
    series: list[SeriesPoint]
    totals: Counters
    quota: Quota


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _counters(sums: Sequence[int], latency: Sequence[int]) -> dict[str, Any]:
    requests, errors, rejected, bytes_in, bytes_out = sums
    return {
        "requests": requests,
        "errors": errors,
        "rejected": rejected,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "latency_ms_p50": quantile(latency, 0.50),
        "latency_ms_p99": quantile(latency, 0.99),
    }


@router.get("", response_model=UsageOut)
async def get_usage(
    tenant_id: str,
    state: State,
    caller: Caller,
    from_: Annotated[datetime | None, Query(alias="from", description="Start (inclusive), ISO 8601.")] = None,
    to: Annotated[datetime | None, Query(description="End (exclusive), ISO 8601; default now.")] = None,
    granularity: Literal["minute", "hour", "day"] = "hour",
) -> dict[str, Any]:
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_read(tid)
    now = datetime.now(UTC)
    end = _utc(to) if to is not None else now
    start = _utc(from_) if from_ is not None else end - DEFAULT_RANGE
    if start >= end:
        raise Unprocessable("from", "must be before to")
    if (end - start) / _PERIOD[granularity] > MAX_PERIODS:
        raise Unprocessable(
            "granularity", f"a range this long has more than {MAX_PERIODS} {granularity}s; ask for a coarser one"
        )
    tenant = await tenant_store.get(state.db, tid)
    points = await store.series(state.db, tid, start, end, granularity)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    used = await store.admitted_since(state.db, tid, month_start)

    totals = [0, 0, 0, 0, 0]
    merged: list[int] = []
    series = []
    for p in points:
        latency = list(p.latency)
        series.append(
            {"start": p.start, **_counters((p.requests, p.errors, p.rejected, p.bytes_in, p.bytes_out), latency)}
        )
        for i, value in enumerate((p.requests, p.errors, p.rejected, p.bytes_in, p.bytes_out)):
            totals[i] += value
        merged = [a + b for a, b in zip_longest(merged, latency, fillvalue=0)]
    quota = tenant.monthly_quota
    return {
        "tenant_id": tid,
        "granularity": granularity,
        "series": series,
        "totals": _counters(totals, merged),
        "quota": {
            "monthly_quota": quota,
            "used": used,
            "remaining": max(0, quota - used) if quota else None,
        },
    }
