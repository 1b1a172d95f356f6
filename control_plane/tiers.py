"""Tenant tiers and the limits a tenant gets when it does not set its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class TierDefaults:
    rate_limit_per_minute: int
    rate_limit_per_hour: int
    monthly_quota: int  # 0: unlimited
    max_concurrency: int  # 0: unlimited


TIERS: Final[dict[str, TierDefaults]] = {
    "free": TierDefaults(60, 1_000, 10_000, 10),
    "basic": TierDefaults(600, 20_000, 1_000_000, 50),
    "premium": TierDefaults(3_000, 100_000, 10_000_000, 200),
    "enterprise": TierDefaults(20_000, 1_000_000, 0, 1_000),
}
DEFAULT_TIER: Final = "free"
