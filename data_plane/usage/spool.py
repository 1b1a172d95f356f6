"""Usage batches the control plane has not acknowledged yet, on disk, so that neither a control
plane outage nor a data plane restart loses them.

Every batch is written here before it is sent (write-ahead) and removed only once the control
plane has acknowledged it; the control plane ignores a batch it has already stored, so a batch
sent twice (acknowledgement lost, process killed between send and remove) counts once.

Layout under ``DATA_DIR/usage/``::

    <node_id>.lock                     held (flock) by the live process of that node
    <node_id>/<seq:020d>-<node_id>.batch   one serialized UsageBatch per file, 0600
    <node_id>/seq                      the last sequence number handed out

Sequence numbers are ``max(last + 1, now in microseconds)``: strictly increasing for a node
across restarts, and still increasing if the ``seq`` file were lost with the disk.

A node id that is not stable across restarts (the default, hostname-pid) would strand the
spool of a stopped process; so at start a spool adopts the batches of every node directory
whose lock no live process holds. Adopted batches keep their own node id and sequence
number, so the control plane still recognises them if it had stored them already.

All methods block on the file system: call them off the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from google.protobuf.message import DecodeError

from shared._generated.tenantgate.v1 import cluster_pb2

log = logging.getLogger(__name__)

SPOOL_DIR: Final = "usage"
SUFFIX: Final = ".batch"
SEQ_FILE: Final = "seq"


class CorruptBatch(Exception):
    """A spooled file that does not parse; it has been set aside as ``*.corrupt``."""


class Spool:
    def __init__(self, data_dir: Path, node_id: str, max_bytes: int, clock_us: Callable[[], int] | None = None) -> None:
        self.root = data_dir / SPOOL_DIR
        self.dir = self.root / node_id
        self.node_id = node_id
        self.max_bytes = max_bytes
        self._clock_us = clock_us or (lambda: time.time_ns() // 1000)
        self._lock_fd: int | None = None
        self._last_seq = 0
        self._sizes: dict[Path, int] = {}

    # --- life cycle ---

    def open(self) -> int:
        """Take this node's lock, adopt stranded batches, and index what is pending. Returns the
        number of batches adopted from other (dead) nodes."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self._lock_fd = _lock(self.root / f"{self.node_id}.lock", blocking=True)
        assert self._lock_fd is not None
        self.dir.mkdir(exist_ok=True, mode=0o700)
        adopted = self._adopt_orphans()
        for path in self.dir.glob(f"*{SUFFIX}"):
            self._sizes[path] = path.stat().st_size
        self._last_seq = max(self._read_seq(), *(_seq_of(p) for p in self._sizes if _node_of(p) == self.node_id), 0)
        return adopted

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- what is pending ---

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def batches(self) -> int:
        return len(self._sizes)

    @property
    def full(self) -> bool:
        return self.size_bytes >= self.max_bytes

    def pending(self, limit: int) -> list[Path]:
        """The oldest ``limit`` batch files, oldest first."""
        return sorted(self._sizes, key=lambda p: p.name)[:limit]

    # --- writing and removing ---

    def next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, self._clock_us())
        return self._last_seq

    def append(self, batch: cluster_pb2.UsageBatch, *, force: bool = False) -> bool:
        """Write ``batch`` durably (fsync'd file and directory). False, and nothing written, when
        the spool is at its bound, unless ``force`` (the last batch at shutdown)."""
        if self.full and not force:
            return False
        payload = batch.SerializeToString()
        path = self.dir / f"{batch.seq:020d}-{batch.node_id}{SUFFIX}"
        _write_atomic(self.dir, path, payload)
        self._write_seq()
        self._sizes[path] = len(payload)
        return True

    def read(self, path: Path) -> cluster_pb2.UsageBatch:
        batch = cluster_pb2.UsageBatch()
        try:
            batch.ParseFromString(path.read_bytes())
        except DecodeError as exc:
            aside = path.with_suffix(".corrupt")
            os.replace(path, aside)
            self._sizes.pop(path, None)
            raise CorruptBatch(f"{path.name}: {exc}; moved to {aside.name}") from exc
        return batch

    def remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
            self._sizes.pop(path, None)
        _fsync_dir(self.dir)

    # --- internals ---

    def _read_seq(self) -> int:
        try:
            return int((self.dir / SEQ_FILE).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _write_seq(self) -> None:
        _write_atomic(self.dir, self.dir / SEQ_FILE, str(self._last_seq).encode())

    def _adopt_orphans(self) -> int:
        adopted = 0
        for other in sorted(self.root.iterdir()):
            if not other.is_dir() or other.name == self.node_id:
                continue
            lock_path = self.root / f"{other.name}.lock"
            fd = _lock(lock_path, blocking=False)
            if fd is None:
                continue  # its process is alive and will send them itself
            try:
                for path in other.glob(f"*{SUFFIX}"):
                    os.replace(path, self.dir / path.name)
                    adopted += 1
                for path in other.iterdir():
                    path.unlink(missing_ok=True)
                other.rmdir()
                lock_path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        if adopted:
            _fsync_dir(self.dir)
            log.info("adopted usage batches of a stopped node", extra={"batches": adopted, "node_id": self.node_id})
        return adopted


def _seq_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[0])
    except ValueError:
        return 0


def _node_of(path: Path) -> str:
    return path.name.split("-", 1)[-1].removesuffix(SUFFIX)


def _lock(path: Path, *, blocking: bool) -> int | None:
    """An exclusive flock on ``path`` (created 0600), or None if another process holds it and
    ``blocking`` is false. Guards against the file being unlinked by an adopter between our
    open and our lock: we hold the lock only on the file that is at ``path``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _write_atomic(directory: Path, path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
