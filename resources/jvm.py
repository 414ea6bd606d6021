"""A class-data sharing (CDS) archive for the Spark driver's JVM, made by the first run that needs it.

Every run starts a fresh driver JVM, which loads, verifies and links thousands of Spark's classes
before its first query. Java's AppCDS keeps those classes, already parsed, in a file that later
JVMs map into memory. Measured here on a run adding 10 files: session start 4.2 -> 2.8 s and the
whole run 34 -> 21 s (with `-XX:TieredStopAtLevel=1`, see `resources.spark`).

Java 17 has no automatic archive, so: a JVM started while no archive exists writes one when it exits
(`-XX:ArchiveClassesAtExit`), into a file of its own; the session's teardown waits for that JVM and
renames the file into place (that first run takes about 20 s longer here). A JVM refuses an archive
of another Java build, class path or options and runs without it, so the archive's name includes
what it was built from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pyspark
from dagster import get_dagster_logger

#: Where archives are kept; `HEARTBEAT_JVM_CACHE` moves it, an empty value turns archives off.
CACHE_ENV = "HEARTBEAT_JVM_CACHE"
#: How long the teardown waits for the JVM to write a new archive (about 20 s here).
DUMP_TIMEOUT_S = 300


def default_cache_dir() -> Path | None:
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return Path(configured) if configured.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "heartbeat-lakehouse" / "jvm"


def java_binary() -> str | None:
    """The `java` that spark-submit will start (JAVA_HOME first, as Spark's launcher does)."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.path.exists(os.path.join(java_home, "bin", "java")):
        return os.path.realpath(os.path.join(java_home, "bin", "java"))
    found = shutil.which("java")
    return os.path.realpath(found) if found else None


class ClassArchive:
    """The archive for this Java and this pyspark, and the driver options that use or create it."""

    def __init__(self, cache_dir: Path, java_options: str = ""):
        java = java_binary()
        # Options such as the heap size or the collector can make a JVM refuse an archive.
        stamp = f"{java}:{os.stat(java).st_mtime_ns if java else 0}:{pyspark.__version__}:{java_options}"
        key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
        self.path = cache_dir / f"spark-driver-{key}.jsa"
        self._part = cache_dir / f".spark-driver-{key}.{os.getpid()}.part"
        self.creating = False

    @staticmethod
    def chosen_in(java_options: str) -> bool:
        """Whether JVM options already say which archive to use or write (or to use none)."""
        return any(flag in java_options for flag in ("SharedArchiveFile", "ArchiveClassesAtExit", "-Xshare"))

    def java_options(self, create: bool) -> str:
        """Options for the driver JVM: map the archive, or (`create`) write it at exit if there is none."""
        if self.path.exists():
            return f"-XX:SharedArchiveFile={self.path} -Xlog:cds=off,cds+dynamic=off"
        if not create:
            return ""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only home: run without an archive
            return ""
        self._remove_abandoned_parts()
        self.creating = True
        # CDS warns about each class it cannot keep (e.g. generated reflection classes): not errors.
        return f"-XX:ArchiveClassesAtExit={self._part} -Xlog:cds=off,cds+dynamic=off"

    def _remove_abandoned_parts(self) -> None:
        """Archives whose JVM was killed while writing them (their process is gone) are removed."""
        for part in self.path.parent.glob(".spark-driver-*.part"):
            pid = int(part.suffixes[-2].lstrip("."))
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                part.unlink(missing_ok=True)
            except PermissionError:  # another user's live process
                pass

    def finish(self, jvm_process) -> None:
        """After the session stopped: end the JVM, let it write the archive, put the archive in place."""
        if not self.creating or jvm_process is None:
            return
        # A cache: whatever goes wrong here, the run's work is done, and a later run tries again.
        try:
            jvm_process.stdin.close()  # the gateway JVM exits when its stdin closes, and dumps then
            if jvm_process.wait(timeout=DUMP_TIMEOUT_S) == 0 and self._part.exists():
                os.replace(self._part, self.path)
        except (OSError, subprocess.TimeoutExpired) as exc:
            get_dagster_logger().warning(f"The JVM class archive {self.path} was not written: {exc}")
        finally:
            self._part.unlink(missing_ok=True)
