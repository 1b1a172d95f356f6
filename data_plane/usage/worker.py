"""Usage, metrics and access log of one data plane worker, wired together: what the worker
starts, runs in the background, and flushes when it drains."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from data_plane import metrics
from data_plane.accesslog import AccessLog
from data_plane.metrics import Exposition, RequestMetrics, WorkerGauges
from data_plane.usage.aggregator import Aggregator
from data_plane.usage.recorder import Recorder
from data_plane.usage.reporter import UsageReporter
from data_plane.usage.spool import Spool
from shared.settings import Settings


class Observability:
    def __init__(
        self,
        settings: Settings,
        redis_ok: Callable[[], bool],
        metrics_dir: Path | None = None,
    ) -> None:
        """``metrics_dir``: the multiprocess directory when this worker is one of several."""
        self.aggregator = Aggregator()
        self.access_log = AccessLog(settings)
        self.recorder = Recorder(
            self.aggregator, RequestMetrics(tenant_labels=settings.metrics_tenant_labels), self.access_log
        )
        spool = Spool(settings.data_dir, settings.node_id, settings.usage_spool_max_bytes)
        self.reporter = UsageReporter(settings, self.aggregator, spool)
        self.gauges = WorkerGauges(redis_ok)
        self.exposition = Exposition(metrics_dir, self.gauges.refresh)

    async def start(self) -> None:
        await self.reporter.start()

    def jobs(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        """Background loops, to run as tasks until the worker drains."""
        jobs: list[tuple[str, Coroutine[Any, Any, None]]] = [
            ("usage-reporter", self.reporter.run()),
            ("metrics-gauges", self.gauges.run()),
        ]
        if self.access_log.enabled:
            jobs.append(("access-log", self.access_log.run()))
        return jobs

    async def close(self) -> None:
        """After the proxy has drained: report (or spool) the last usage, write the last log lines."""
        await self.access_log.close()
        await self.reporter.close()
        metrics.flush()
