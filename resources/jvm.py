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

A warm driver (`WarmDriver`) goes further: a JVM that outlives the run, kept for the next one. PySpark
attaches to a running gateway JVM when `PYSPARK_GATEWAY_PORT` and `_SECRET` are set (as in apps
that spark-submit starts), so a small keeper process starts the JVM with pyspark's own
`launch_gateway` and holds it; each run takes it and runs its session in the SparkContext there
(`resources.spark.WarmSession`). Runs then skip the JVM's start and its cold code: a run adding 10
files took 9.0 s instead of 17.0 s here. This file is also the keeper's program
(`python -P jvm.py keep <folder>`), so it imports nothing of Dagster at load.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyspark

#: Where archives are kept; `HEARTBEAT_JVM_CACHE` moves it, an empty value turns archives off.
CACHE_ENV = "HEARTBEAT_JVM_CACHE"
#: How long the teardown waits for the JVM to write a new archive (about 20 s here).
DUMP_TIMEOUT_S = 300


#: Environment every driver JVM of the project starts with (a run's own, the warm driver, the Spark
#: Connect server), unless the user's sets it. glibc's malloc gives a process's threads up to 8 arenas
#: of 64 MiB per core; a Spark driver's ~270 threads spread its native allocations (RocksDB's,
#: compression codecs') over 20 and more arenas, each partly empty. With two, the peak memory of
#: the 20-file load of 2M recordings was 1500 and 1506 MiB instead of 1559 and 1613 in a warm driver,
#: 1343 and 1408 instead of 1441 in a new one, in the same time (alternating runs).
DRIVER_ENVIRONMENT = {"MALLOC_ARENA_MAX": "2"}


def driver_environment() -> dict[str, str]:
    """This process's environment, with `DRIVER_ENVIRONMENT`'s values where it has none of its own."""
    return {**DRIVER_ENVIRONMENT, **os.environ}


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
        # A JVM refuses an archive made with another class path (Spark's jars in another pyspark
        # install, e.g. another virtualenv), and options such as the heap size or the collector.
        jars = Path(os.path.realpath(pyspark.__file__)).parent / "jars"
        stamp = (
            f"{java}:{os.stat(java).st_mtime_ns if java else 0}:{pyspark.__version__}:{jars}:{java_options}"
        )
        # It also refuses one whose jars have another size or modification time ("A jar file is not
        # the one used while building the shared archive file"), as after a reinstall at the same path
        # (a virtualenv made again, as a fresh clone's CI does): the jars' stamp is a part of its own.
        jar_stamps = sorted(
            (jar.name, info.st_size, info.st_mtime_ns) for jar in jars.glob("*.jar") for info in [jar.stat()]
        )
        self._install = hashlib.sha256(stamp.encode()).hexdigest()[:16]
        key = f"{self._install}-{hashlib.sha256(repr(jar_stamps).encode()).hexdigest()[:8]}"
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
            if not _alive(int(part.suffixes[-2].lstrip("."))):
                part.unlink(missing_ok=True)

    def _remove_superseded(self) -> None:
        """Archives of earlier jars at this install's path: no JVM can map them any more (~200 MB each)."""
        for archive in self.path.parent.glob(f"spark-driver-{self._install}-*.jsa"):
            if archive != self.path:
                archive.unlink(missing_ok=True)

    def finish(self, jvm_process) -> None:
        """After the session stopped: end the JVM, let it write the archive, put the archive in place."""
        if not self.creating or jvm_process is None:
            return
        # A cache: whatever goes wrong here, the run's work is done, and a later run tries again.
        try:
            jvm_process.stdin.close()  # the gateway JVM exits when its stdin closes, and dumps then
            if jvm_process.wait(timeout=DUMP_TIMEOUT_S) == 0 and self._part.exists():
                os.replace(self._part, self.path)
                self._remove_superseded()
        except (OSError, subprocess.TimeoutExpired) as exc:
            from dagster import get_dagster_logger

            get_dagster_logger().warning(f"The JVM class archive {self.path} was not written: {exc}")
        finally:
            self._part.unlink(missing_ok=True)


#: How long a warm driver JVM waits for its next run, by default (`keep_jvm_warm_s`).
WARM_IDLE_S = 600.0
#: How often the keeper looks at its JVM's run: a run that dies has its JVM killed this soon.
WATCH_INTERVAL_S = 0.2
#: How long a run waits for a warm JVM that another run is using before it starts its own.
TAKE_TIMEOUT_S = 2.0
#: How long a run waits for a new keeper's JVM to accept connections.
START_TIMEOUT_S = 120.0
#: The warm JVM's log (`jvm.log`) is rotated past this size: a JVM may serve runs for weeks.
LOG_MAX_BYTES = 16 * 2**20
#: Settings that act when the JVM starts (or, the code cache's size, when it first generates code);
#: every other setting is the SparkContext's, set per run.
LAUNCH_SETTINGS = (
    "spark.driver.",
    "spark.jars",
    "spark.files",
    "spark.submit.",
    "spark.sql.codegen.cache.maxEntries",
)
#: Environment that the JVM, its C library or spark-submit reads when it starts.
LAUNCH_ENVIRONMENT = ("SPARK_", "PYSPARK_", "HADOOP_", "JAVA_", "_JAVA_", "JDK_", "MALLOC_")
GATEWAY_ENVIRONMENT = ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET")

#: In the folder's name: a keeper that runs code from before a change to these files (a project
#: updated while its JVM idles) keeps its own folder, and idles out there.
KEEPER_PROTOCOL = 2

#: The pid of the warm JVM this process is attached to, if any (the crash tests' kill points kill it).
attached_jvm_pid: int | None = None


class WarmDriver:
    """A driver JVM kept between runs by a keeper process; one run at a time uses it.

    Files in its folder: `lock` (held by the run that uses the JVM; its mtime is the last use),
    `attached` (the pid of that run, removed when it lets go), `gateway.json` (port, secret and pids,
    readable by this user only), `launch.json` (what the keeper starts), `keeper.lock` (held by the
    keeper while it lives) and `jvm.log` (Spark's log).

    A process is taken for the keeper only while `keeper.lock` is held: the pids in `gateway.json`
    outlive a keeper that was killed, and the system gives them to new processes and threads, which
    must never be sent the keeper's signals.

    - A run that finds the JVM taken (another data root's run) starts a JVM of its own, as without.
    - A run that dies attached leaves `attached` behind with the lock free: the keeper then kills the
      JVM at once, so no query of a dead run goes on writing, as a run's own JVM would die with it.
    - The keeper ends the JVM (which then writes the class archive, if it is the first) after
      `idle_s` without a run.
    - The JVM's start options, environment and working directory are fixed when it starts, so the
      folder's name includes them: a run with other options gets a JVM of its own.
    """

    def __init__(self, cache_dir: Path, config: dict[str, str], idle_s: float):
        self.launch_config = {k: v for k, v in config.items() if k.startswith(LAUNCH_SETTINGS)}
        environment = {
            k: v
            for k, v in driver_environment().items()
            if k.startswith(LAUNCH_ENVIRONMENT) and k not in GATEWAY_ENVIRONMENT
        }
        java = java_binary()
        stamp = json.dumps(
            [
                KEEPER_PROTOCOL,
                java,
                os.stat(java).st_mtime_ns if java else 0,
                pyspark.__version__,
                sorted(self.launch_config.items()),
                sorted(environment.items()),
                os.getcwd(),
            ]
        )
        self.cache_dir = cache_dir
        self.dir = cache_dir / f"warm-driver-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
        self.idle_s = idle_s
        self.log_path = self.dir / "jvm.log"
        self.jvm_pid: int | None = None
        self._lock = None
        self._keeper: subprocess.Popen | None = None

    def take(self) -> dict[str, str] | None:
        """Take the JVM for this run, starting it if none runs.

        Returns the environment that makes pyspark attach to it, or None when another run uses it
        or it cannot start (the run then starts a JVM of its own; `jvm.log` says why).
        """
        global attached_jvm_pid
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # its files say how to drive the JVM
        lock = open(self.dir / "lock", "a+")
        if not _lock(lock, TAKE_TIMEOUT_S):
            lock.close()
            return None
        self._lock = lock
        try:
            if (self.dir / "attached").exists():
                # The last run died attached; its keeper should have killed the JVM already.
                self.discard()
            gateway = self._running_gateway() or self._start_keeper()
        except BaseException:
            self.release()
            raise
        if gateway is None:
            self.release()
            return None
        (self.dir / "attached").write_text(str(os.getpid()))
        self.jvm_pid = attached_jvm_pid = gateway["jvm_pid"]
        return {"PYSPARK_GATEWAY_PORT": str(gateway["port"]), "PYSPARK_GATEWAY_SECRET": gateway["secret"]}

    def release(self) -> None:
        """Let the JVM go (after the run stopped its SparkContext); it now counts as idle."""
        global attached_jvm_pid
        if self._lock is None:
            return
        (self.dir / "attached").unlink(missing_ok=True)
        os.utime(self.dir / "lock")
        self._lock.close()  # releases the flock
        self._lock = None
        self.jvm_pid = attached_jvm_pid = None

    def _running_gateway(self) -> dict | None:
        try:
            gateway = json.loads((self.dir / "gateway.json").read_text())
        except (OSError, ValueError):
            return None
        if keeper_running(self.dir) and _alive(gateway["jvm_pid"]) and listening(gateway["port"]):
            return gateway
        self.discard()
        return None

    def _start_keeper(self) -> dict | None:
        launch = {"config": self.launch_config, "cache_dir": str(self.cache_dir), "idle_s": self.idle_s}
        (self.dir / "launch.json").write_text(json.dumps(launch))
        (self.dir / "gateway.json").unlink(missing_ok=True)
        environment = {k: v for k, v in driver_environment().items() if k not in GATEWAY_ENVIRONMENT}
        # Appending, so that the keeper can empty the file under the JVM (see `cap_log`).
        with open(self.log_path, "w"), open(self.log_path, "a") as log:
            # A session of its own: the keeper outlives this run and its process group.
            self._keeper = subprocess.Popen(
                [sys.executable, "-P", os.path.abspath(__file__), "keep", str(self.dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=environment, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self._keeper.poll() is None:
            gateway = self._running_gateway()
            if gateway is not None and gateway["keeper_pid"] == self._keeper.pid:
                return gateway
            time.sleep(0.05)
        self.discard()
        return None

    def discard(self) -> None:
        """Kill the keeper and its JVM, and wait until the JVM is gone (the next run starts a new one)."""
        try:
            gateway = json.loads((self.dir / "gateway.json").read_text())
        except (OSError, ValueError):
            gateway = {}
        keeper_pid = gateway.get("keeper_pid") or (self._keeper.pid if self._keeper else None)
        if keeper_pid and keeper_running(self.dir):
            try:
                os.killpg(keeper_pid, signal.SIGKILL)  # the keeper leads its group; the JVM is in it
            except (ProcessLookupError, PermissionError):
                pass
            for pid in (gateway.get("jvm_pid"), keeper_pid):
                _wait_gone(pid)
        if self._keeper is not None:
            self._keeper.poll()  # reaped: a child of this process is not left a zombie
        (self.dir / "gateway.json").unlink(missing_ok=True)
        (self.dir / "attached").unlink(missing_ok=True)


def forget_java_objects(gateway) -> None:
    """Drop the gateway's references to the Java objects this process was handed.

    py4j frees one when the Python side collects its handle; a process that exits never does, so in
    a JVM that outlives its runs they would pile up (with the plans and sessions they hold).
    """
    from py4j.java_gateway import JavaObject

    keys = JavaObject("GATEWAY_SERVER", gateway._gateway_client).getGateway().getBindings().keySet()
    # Objects are "o<n>"; the gateway's own entries ("j", "t", "GATEWAY_SERVER") stay. The keys come
    # as one string: thousands of them, element by element, would be two round trips each.
    listed = gateway.jvm.java.lang.String.join("\n", keys)
    keys.retainAll([key for key in listed.split("\n") if not key.startswith("o")])


def warm_driver_keepers(cache_dir: Path | None) -> list[int]:
    """The pids of the keepers of warm driver JVMs under `cache_dir` (each leads its process group)."""
    return [pid for _, pid in _running_keepers(cache_dir)]


def _running_keepers(cache_dir: Path | None) -> list[tuple[Path, int]]:
    keepers = []
    for gateway in (cache_dir or Path("/nonexistent")).glob("warm-driver-*/gateway.json"):
        try:
            pid = json.loads(gateway.read_text())["keeper_pid"]
        except (OSError, ValueError, KeyError):
            continue
        if keeper_running(gateway.parent):
            keepers.append((gateway.parent, pid))
    return keepers


def keeper_running(directory: Path) -> bool:
    """Whether a keeper lives in `directory`: it holds `keeper.lock` (the system lets go of the lock
    when the process ends, however it ends)."""
    try:
        handle = open(directory / "keeper.lock")
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return True
            raise
        return False  # closing the file lets go of the lock just taken


def stop_warm_drivers(cache_dir: Path | None) -> None:
    """End every warm driver JVM under `cache_dir` now (each writes its class archive if it has one
    to write); a run that uses one keeps it until the run ends."""
    keepers = _running_keepers(cache_dir)
    for _, pid in keepers:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DUMP_TIMEOUT_S
    while any(keeper_running(directory) for directory, _ in keepers) and time.monotonic() < deadline:
        time.sleep(0.02)


def cap_log(path: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
    """Keep a log that a long-lived JVM appends to under `max_bytes`: past it, the log is copied to
    `<name>.1` (replacing the one before) and emptied, as logrotate's copytruncate does."""
    try:
        if path.stat().st_size <= max_bytes:
            return
        shutil.copyfile(path, path.with_name(path.name + ".1"))
        os.truncate(path, 0)  # the JVM appends (O_APPEND), so it goes on writing from the start
    except OSError:
        pass


def _lock(handle, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def listening(port: int) -> bool:
    """Whether a server on this machine accepts connections on `port` (for a gateway: pids alone may
    have been reused after a reboot)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def _wait_gone(pid: int | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def keep(directory: Path) -> None:
    """The keeper: start the JVM, say how to reach it, end it when its run dies or it idles."""
    from pyspark import SparkConf
    from pyspark.java_gateway import launch_gateway

    launch = json.loads((directory / "launch.json").read_text())
    config = dict(launch["config"])
    java_options = config.get("spark.driver.extraJavaOptions", "")
    archive = None
    if launch["cache_dir"] and not ClassArchive.chosen_in(java_options):
        archive = ClassArchive(Path(launch["cache_dir"]), java_options)
        archive_options = archive.java_options(create=True)
        config["spark.driver.extraJavaOptions"] = f"{java_options} {archive_options}".strip()
    # Held until this process ends: while it is, the pids in gateway.json are this keeper's.
    keeper_lock = open(directory / "keeper.lock", "a")
    if not _lock(keeper_lock, START_TIMEOUT_S):
        sys.exit(f"another keeper holds {directory / 'keeper.lock'}")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    gateway = launch_gateway(SparkConf(loadDefaults=False).setAll(list(config.items())))
    jvm = gateway.proc
    lock = open(directory / "lock", "a+")
    os.utime(directory / "lock")
    published = directory / f".gateway.{os.getpid()}.json"
    published.touch(mode=0o600)
    published.write_text(
        json.dumps(
            {
                "port": gateway.gateway_parameters.port,
                "secret": gateway.gateway_parameters.auth_token,
                "keeper_pid": os.getpid(),
                "jvm_pid": jvm.pid,
            }
        )
    )
    os.replace(published, directory / "gateway.json")
    died_attached = False
    try:

        def idle() -> bool:
            return time.time() - os.fstat(lock.fileno()).st_mtime >= launch["idle_s"]

        while jvm.poll() is None:
            time.sleep(WATCH_INTERVAL_S)
            cap_log(directory / "jvm.log")
            if not ((directory / "attached").exists() or stopping or idle()) or not _lock(lock, 0):
                continue
            # No run holds the JVM: the last one died attached, or it idles, or we were told to stop.
            died_attached = (directory / "attached").exists()
            if died_attached or stopping or idle():
                break
            fcntl.flock(lock, fcntl.LOCK_UN)
        (directory / "gateway.json").unlink(missing_ok=True)
        if died_attached:
            jvm.kill()  # its queries must not outlive their run
            jvm.wait()
            (directory / "attached").unlink(missing_ok=True)
        elif archive is not None and archive.creating:
            archive.finish(jvm)
        else:
            jvm.stdin.close()  # the gateway JVM exits when its stdin closes
            try:
                jvm.wait(timeout=DUMP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass  # killed below
    finally:
        if jvm.poll() is None:
            jvm.kill()
        gateway_file = directory / "gateway.json"
        try:
            if json.loads(gateway_file.read_text())["keeper_pid"] == os.getpid():
                gateway_file.unlink()
        except (OSError, ValueError, KeyError):
            pass


if __name__ == "__main__" and sys.argv[1:2] == ["keep"]:
    keep(Path(sys.argv[2]))
