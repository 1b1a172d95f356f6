"""data_plane.upstream.breaker: closed → open → half-open → closed, on a clock the test drives."""

from __future__ import annotations

import pytest

from data_plane.upstream.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from shared.snapshot import CircuitBreaker

pytestmark = pytest.mark.unit

CONFIG = CircuitBreaker(failure_rate=0.5, min_requests=10, window_s=10, open_s=30, half_open_requests=2)


def _record(breaker: Breaker, ok: bool, now: float, times: int = 1) -> None:
    for _ in range(times):
        assert breaker.allows(now)
        breaker.record(breaker.acquire(), ok, now)


def _opened(now: float = 100.0) -> Breaker:
    breaker = Breaker(CONFIG)
    _record(breaker, True, now, 5)
    _record(breaker, False, now, 5)
    assert breaker.state == OPEN
    return breaker


def test_stays_closed_below_min_requests_even_if_all_fail() -> None:
    breaker = Breaker(CONFIG)
    _record(breaker, False, 100.0, 9)
    assert breaker.state == CLOSED


def test_opens_when_the_failure_rate_reaches_the_threshold() -> None:
    breaker = Breaker(CONFIG)
    _record(breaker, True, 100.0, 6)
    _record(breaker, False, 100.5, 4)
    assert breaker.state == CLOSED  # 4 of 10 < 50 %
    _record(breaker, False, 101.0)
    assert breaker.state == CLOSED  # 5 of 11 < 50 %
    _record(breaker, False, 101.0)
    assert breaker.state == OPEN  # 6 of 12


def test_outcomes_older_than_the_window_do_not_count() -> None:
    breaker = Breaker(CONFIG)
    _record(breaker, False, 100.0, 9)
    _record(breaker, False, 110.0)  # the nine are 10 s old: out of the window
    assert breaker.state == CLOSED
    _record(breaker, False, 110.5, 9)
    assert breaker.state == OPEN


def test_open_sheds_until_open_s_then_lets_half_open_probes_through() -> None:
    breaker = _opened(100.0)
    assert not breaker.allows(100.0)
    assert not breaker.allows(129.9)
    assert breaker.retry_after(100.0) == 30
    assert breaker.retry_after(129.5) == 1
    assert breaker.allows(130.0)
    assert breaker.state == HALF_OPEN
    first, second = breaker.acquire(), (breaker.allows(130.0) and breaker.acquire())
    assert second is not False
    assert not breaker.allows(130.0)  # both probe slots taken
    breaker.record(first, True, 130.1)
    assert breaker.state == HALF_OPEN and breaker.allows(130.1)
    breaker.record(second, True, 130.2)
    assert breaker.state == CLOSED


def test_a_failed_probe_reopens_for_another_open_s() -> None:
    breaker = _opened(100.0)
    assert breaker.allows(130.0)
    breaker.record(breaker.acquire(), False, 130.5)
    assert breaker.state == OPEN
    assert not breaker.allows(160.0) and breaker.allows(160.5)


def test_closing_starts_a_fresh_window() -> None:
    breaker = _opened(100.0)
    _record(breaker, True, 130.0, 2)
    assert breaker.state == CLOSED
    _record(breaker, False, 130.0, 9)  # the five old failures are forgotten
    assert breaker.state == CLOSED


def test_a_request_from_before_the_trial_does_not_decide_it() -> None:
    breaker = Breaker(CONFIG)
    _record(breaker, True, 100.0, 5)
    slow = breaker.acquire()  # sent while closed, answers much later
    _record(breaker, False, 100.0, 5)
    assert breaker.allows(130.0)
    breaker.record(slow, False, 130.0)
    assert breaker.state == HALF_OPEN


def test_a_probe_abandoned_without_an_outcome_frees_its_slot() -> None:
    breaker = _opened(100.0)
    assert breaker.allows(130.0)
    first = breaker.acquire()
    assert breaker.allows(130.0)
    breaker.acquire()
    assert not breaker.allows(130.0)
    breaker.release(first)
    assert breaker.allows(130.0)


def test_reports_every_transition() -> None:
    seen: list[int] = []
    breaker = Breaker(CONFIG, seen.append)
    _record(breaker, False, 100.0, 10)
    assert breaker.allows(130.0)
    breaker.record(breaker.acquire(), False, 130.0)
    assert breaker.allows(160.0)
    _record(breaker, True, 160.0, 2)
    assert seen == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]
