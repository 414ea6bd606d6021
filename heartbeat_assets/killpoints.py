"""Named points at which the crash tests kill a run, the way a power cut or OOM kill would.

Inactive unless `HEARTBEAT_KILL_AT` names a point (shell-style patterns allowed, `@N` to kill at the
N-th time a matching point is passed). Killing the whole process group takes Spark's JVM down with
the Python process, as when a machine dies; so does killing the warm driver JVM the run uses.

The points:

- `write:<table>:committed`: a write of a micro-batch or a table's new version just committed;
- `batch:<query>:written`: a `foreachBatch` writer is done, before Spark commits the micro-batch;
- `write:<table>:uncommitted`: a write to the table has put a data file in place that no commit
  lists yet (Delta commits after every file is written), whichever code writes it: a watcher thread
  kills the run as soon as such a file appears.
"""

import os
import signal
import threading
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

KILL_AT_ENV = "HEARTBEAT_KILL_AT"
_passed: dict[str, int] = {}


def kill_point(name: str) -> None:
    target = os.environ.get(KILL_AT_ENV)
    if not target:
        return
    pattern, _, nth = target.partition("@")
    if not fnmatch(name, pattern):
        return
    _passed[pattern] = _passed.get(pattern, 0) + 1
    if _passed[pattern] == int(nth or 1):
        _kill()


def _kill() -> None:
    from resources import jvm  # (imports Dagster: not for a Spark Connect worker)

    if jvm.attached_jvm_pid:
        os.kill(jvm.attached_jvm_pid, signal.SIGKILL)
    os.killpg(os.getpgrp(), signal.SIGKILL)


@contextmanager
def watch_writes(tables: dict[str, Path]):
    """While the block runs, kill the run when a data file appears in one of `tables` ({name: path})
    whose `write:<name>:uncommitted` point `HEARTBEAT_KILL_AT` names."""
    pattern = os.environ.get(KILL_AT_ENV, "").partition("@")[0]
    watched = {
        name: path
        for name, path in tables.items()
        if pattern and fnmatch(f"write:{name}:uncommitted", pattern)
    }
    if not watched:
        yield
        return
    stop = threading.Event()
    before = {name: _data_files(path) for name, path in watched.items()}

    def watch() -> None:
        while not stop.wait(0.001):
            if any(_data_files(path) - before[name] for name, path in watched.items()):
                _kill()

    thread = threading.Thread(target=watch, name="kill-point-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _data_files(table) -> set[str]:
    from resources.storage import parquet_files

    return parquet_files(table)
