"""Fixtures shared by every test: real Postgres and Redis for this run.

Postgres: the server at 127.0.0.1:5432 (user postgres, trust auth) when it answers, else an
embedded one started for this run. Each test that asks for ``database_url`` gets a fresh
database, dropped afterwards. Redis: 127.0.0.1:6379 when it answers, else an embedded one;
this run uses one database number of its own, flushed before and after.
Set TENANTGATE_TEST_POSTGRES_URL / TENANTGATE_TEST_REDIS_URL to point the suite elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis

from shared.embedded import EmbeddedPostgres, EmbeddedRedis

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS = ("127.0.0.1", 6379)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _redis_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A URL to a Postgres server's maintenance database, where test databases are created."""
    configured = os.environ.get("TENANTGATE_TEST_POSTGRES_URL")
    if configured:
        yield configured
        return
    if _reachable("127.0.0.1", 5432):
        yield LOCAL_POSTGRES
        return
    with tempfile.TemporaryDirectory(prefix="tg-test-pg-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 - the embedded server runs as another user
        server = EmbeddedPostgres(Path(tmp) / "pgdata")
        try:
            yield server.start()
        finally:
            server.stop()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _admin_execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def fresh_database(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty database beside the maintenance one; dropped on leaving."""
    name = f"tg_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(postgres_admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(postgres_admin_url, name)
    finally:
        asyncio.run(_admin_execute(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    with fresh_database(postgres_admin_url) as url:
        yield url


def _claim_redis_db() -> tuple[int, IO[bytes]]:
    """A Redis database number no other test run on this machine is using: runs side by side
    each hold an exclusive lock on the number they flush."""
    numbers = list(range(1, 16))
    random.shuffle(numbers)
    for db in numbers:
        lock = open(Path(tempfile.gettempdir()) / f"tenantgate-test-redis-db-{db}.lock", "wb")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        return db, lock
    raise RuntimeError("all 15 Redis test databases are in use by other test runs; wait for one to finish")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database number of this run's own, flushed before and after."""
    configured = os.environ.get("TENANTGATE_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    embedded: EmbeddedRedis | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if _redis_ping(*LOCAL_REDIS):
        host, port = LOCAL_REDIS
    else:
        tmp = tempfile.TemporaryDirectory(prefix="tg-test-redis-")
        embedded = EmbeddedRedis(Path(tmp.name))
        embedded.start()
        host, port = "127.0.0.1", embedded.port
    db, lock = _claim_redis_db()
    client = redis.Redis(host=host, port=port, db=db)
    client.flushdb()
    try:
        yield f"redis://{host}:{port}/{db}"
    finally:
        client.flushdb()
        client.close()
        lock.close()
        if embedded is not None:
            embedded.stop()
        if tmp is not None:
            tmp.cleanup()


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    """Processes started by one test; all stopped at its end, their logs shown if it failed."""
    from tests.integration.harness import Processes

    # Set up after (so torn down before) the test's database: processes stop before it is dropped.
    if "database_url" in request.fixturenames:
        request.getfixturevalue("database_url")
    processes = Processes(tmp_path)
    yield processes
    processes.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(processes.dump_logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[object]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
