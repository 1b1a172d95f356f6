"""New request ids: valid X-Request-ID values, never repeated within a process or across a fork."""

from __future__ import annotations

import os

from data_plane.pipeline import _REQUEST_ID, _new_request_id


def test_new_ids_are_valid_and_distinct() -> None:
    ids = [_new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(_REQUEST_ID.match(rid) for rid in ids)


def test_forked_worker_draws_its_own_prefix() -> None:
    parent = _new_request_id()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave without running anything else
        os.write(write_end, _new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert _REQUEST_ID.match(child)
    assert child[:16] != parent[:16]
    assert child != _new_request_id()
