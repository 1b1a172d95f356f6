"""The last good snapshot on disk, so that a data plane restarted while the control plane is
down serves what it served before.

Two files: ``snapshot.pb``, a whole snapshot, and ``snapshot.journal``, the deltas applied
since, each a length-prefixed ``SnapshotDelta``. A full snapshot replaces both (temporary
file, fsync, rename; the journal goes); a delta is appended and fsynced, so a change costs a
few bytes of I/O, not the whole config. When the journal outgrows the snapshot, the owner
writes a whole snapshot again. Both keep the config epoch (the snapshot's ``epoch``, each
delta's ``upserts.epoch``), so a restarted node says in its Hello which database's history
its version counts in, and a journalled delta of another epoch is not replayed.

The files hold key hashes and signing keys: mode 0600 in a directory of mode 0700, never
readable by other users. Everything here blocks: call it off the event loop.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Final

from google.protobuf.message import DecodeError

from shared._generated.tenantgate.v1 import cluster_pb2, snapshot_pb2

log = logging.getLogger(__name__)

SNAPSHOT_FILE: Final = "snapshot.pb"
JOURNAL_FILE: Final = "snapshot.journal"
_LENGTH: Final = struct.Struct(">I")


def _prepare(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)


def save(data_dir: Path, msg: snapshot_pb2.Snapshot) -> None:
    """Write ``msg`` as the last good snapshot, replacing any journal."""
    save_bytes(data_dir, msg.SerializeToString())


def save_bytes(data_dir: Path, *pieces: bytes | memoryview) -> None:
    """Write an encoded ``Snapshot`` (the concatenation of ``pieces``) as the last good
    snapshot, replacing any journal."""
    _prepare(data_dir)
    fd, tmp = tempfile.mkstemp(prefix=".snapshot-", dir=data_dir)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(pieces)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, data_dir / SNAPSHOT_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    (data_dir / JOURNAL_FILE).unlink(missing_ok=True)


def append(data_dir: Path, delta: cluster_pb2.SnapshotDelta) -> int:
    """Append ``delta`` to the journal; returns the journal's size in bytes."""
    _prepare(data_dir)
    payload = delta.SerializeToString()
    fd = os.open(data_dir / JOURNAL_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as f:
        f.write(_LENGTH.pack(len(payload)) + payload)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def snapshot_size(data_dir: Path) -> int:
    try:
        return (data_dir / SNAPSHOT_FILE).stat().st_size
    except OSError:
        return 0


def load(data_dir: Path) -> tuple[snapshot_pb2.Snapshot, list[cluster_pb2.SnapshotDelta]] | None:
    """The last snapshot written by :func:`save` and the deltas appended since (a torn last
    record, from a crash mid-append, is dropped), or None if there is no readable snapshot."""
    path = data_dir / SNAPSHOT_FILE
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the snapshot on disk", extra={"path": str(path), "error": str(exc)})
        return None
    msg = snapshot_pb2.Snapshot()
    try:
        msg.ParseFromString(payload)
    except DecodeError as exc:
        log.warning("the snapshot on disk is corrupt; ignoring it", extra={"path": str(path), "error": str(exc)})
        return None
    return msg, _journal(data_dir / JOURNAL_FILE)


def _journal(path: Path) -> list[cluster_pb2.SnapshotDelta]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read the snapshot journal; using the snapshot alone", extra={"error": str(exc)})
        return []
    deltas = []
    offset = 0
    while offset + _LENGTH.size <= len(data):
        (size,) = _LENGTH.unpack_from(data, offset)
        record = data[offset + _LENGTH.size : offset + _LENGTH.size + size]
        if len(record) < size:
            break
        try:
            deltas.append(cluster_pb2.SnapshotDelta.FromString(record))
        except DecodeError:
            break
        offset += _LENGTH.size + size
    return deltas
