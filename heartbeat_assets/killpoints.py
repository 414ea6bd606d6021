"""Named points at which the crash tests kill a run, the way a power cut or OOM kill would.

Inactive unless `HEARTBEAT_KILL_AT` names a point (shell-style patterns allowed, `@N` to kill at the
N-th time a matching point is passed). Killing the whole process group takes Spark's JVM down with
the Python process, as when a machine dies; so does killing the warm driver JVM the run uses.
"""

import os
import signal
from fnmatch import fnmatch

from resources import jvm

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
        if jvm.attached_jvm_pid:
            os.kill(jvm.attached_jvm_pid, signal.SIGKILL)
        os.killpg(os.getpgrp(), signal.SIGKILL)
