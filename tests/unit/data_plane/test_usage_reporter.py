"""data_plane.usage.reporter without a control plane: batches wait on disk, the spool bound
holds new counters in memory (loudly), and shutdown writes the last ones past the bound."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from data_plane.usage import metrics
from data_plane.usage.aggregator import Aggregator
from data_plane.usage.reporter import UsageReporter
from data_plane.usage.spool import Spool
from shared import settings as tg_settings

pytestmark = pytest.mark.unit


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unsent_usage_waits_on_disk_and_the_bound_is_loud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tg_settings.load(
        environ={
            "TENANTGATE_CLUSTER_TOKEN": "cluster-token-0123456789",
            "TENANTGATE_CP_ADDR": f"127.0.0.1:{_closed_port()}",
            "TENANTGATE_NODE_ID": "node-1",
            "TENANTGATE_DATA_DIR": str(tmp_path),
        }
    )
    aggregator = Aggregator()
    spool = Spool(tmp_path, "node-1", max_bytes=1)  # full after one batch
    reporter = UsageReporter(settings, aggregator, spool)
    await reporter.start()

    aggregator.record("t", "r", 1_800_000_000, 200, 1, 1, 1.0)
    await reporter.flush()
    assert spool.batches == 1  # written, not sent: the control plane is not there
    assert "cannot report usage" in reporter.last_error

    aggregator.record("t", "r", 1_800_000_060, 200, 1, 1, 1.0)
    with caplog.at_level(logging.ERROR):
        await reporter.flush()
    assert spool.batches == 1  # at the bound: held in memory, not dropped
    assert metrics.SPOOL_FULL._value.get() == 1 and metrics.HELD_RECORDS._value.get() == 1
    assert any("usage spool is full" in r.getMessage() for r in caplog.records)

    aggregator.record("t", "r", 1_800_000_060, 200, 1, 1, 1.0)
    await reporter.close()  # shutdown: the held and new counters are written past the bound
    again = Spool(tmp_path, "node-1", max_bytes=1)
    again.open()
    batches = [again.read(p) for p in again.pending(10)]
    assert len(batches) == 2
    requests = sum(r.requests for b in batches for r in b.records)
    assert requests == 3
    again.close()
