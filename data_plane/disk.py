"""The last good snapshot on disk, so that a data plane restarted while the control plane is
down serves what it served before.

The file holds key hashes and (later) signing keys: it is written atomically (temporary file,
fsync, rename) with mode 0600 in a directory of mode 0700, never readable by other users.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Final

from google.protobuf.message import DecodeError

from shared._generated.tenantgate.v1 import snapshot_pb2

log = logging.getLogger(__name__)

SNAPSHOT_FILE: Final = "snapshot.pb"


def save(data_dir: Path, msg: snapshot_pb2.Snapshot) -> None:
    """Write ``msg`` as the last good snapshot. Blocking: call it off the event loop."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    payload = msg.SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=".snapshot-", dir=data_dir)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, data_dir / SNAPSHOT_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(data_dir: Path) -> snapshot_pb2.Snapshot | None:
    """The last snapshot written by :func:`save`, or None if there is none or it is unreadable."""
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
    return msg
