"""The baseline of the worker benchmarks: a no-op function for bare RQ (``rq worker``, RQ's own
forking ``Worker``, no Django), and the record both arms write at their first line.

Imported by bare RQ's work-horses, so it imports neither Django nor the product.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from redis import Redis

QUEUE = "bench-bare"


def first_line_record(connection: Redis, key: str, *, ts: float, ident: str, rss: bool = False) -> None:
    """Append ``{"ts", "id", "worker", "pid"}`` (and the process's RSS in kB) to the list ``key``;
    ``ts`` is the ``time.time()`` the caller took at its first line."""
    record: dict[str, Any] = {"ts": ts, "id": ident, "worker": os.environ.get("RQ_WORKER_ID", ""), "pid": os.getpid()}
    if rss:
        record["rss_kb"] = rss_kb(os.getpid())
    connection.rpush(key, json.dumps(record))


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in kB (resident, shared pages included)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LookupError(f"no VmRSS for pid {pid}")


def noop(key: str) -> None:
    """What bare RQ runs: record the first line, nothing else."""
    ts = time.time()
    from rq import get_current_job

    job = get_current_job()
    assert job is not None
    first_line_record(job.connection, key, ts=ts, ident=job.id)
