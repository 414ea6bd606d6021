"""The SparkSession shared by every asset of a run."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlparse

import py4j.protocol
from dagster import Failure, InitResourceContext, get_dagster_logger
from dagster_pyspark import LazyPySparkResource
from dagster_pyspark.resources import spark_session_from_config
from pydantic import Field, PrivateAttr, field_validator
from pyspark import SparkContext

from resources import delta_lake, storage
from resources.jvm import (
    DRIVER_ENVIRONMENT,
    WARM_IDLE_S,
    ClassArchive,
    WarmDriver,
    default_cache_dir,
    forget_java_objects,
    java_binary,
)
from resources.lakehouse import LakehouseResource

#: Defaults suited to a laptop; any key can be overridden through `spark_config`.
LOCAL_DEFAULTS: dict[str, str] = {
    # Dates and times in the tables are UTC, whatever the machine's zone.
    "spark.sql.session.timeZone": "UTC",
    # Dedupe and aggregate state lives on disk, not the JVM heap.
    "spark.sql.streaming.stateStore.providerClass": (
        "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
    ),
    "spark.sql.streaming.stopGracefullyOnShutdown": "true",
    # A run killed while its query runs on a Spark Connect server leaves the query running there; the
    # next run's query on the same checkpoint stops it before it starts (Spark's default, relied on).
    "spark.sql.streaming.stopActiveRunOnRestart": "true",
    # RocksDB would read every key before writing it to keep a count of the state's rows, which
    # nothing here reads: silver's dedupe of 500k recordings took 18.6 s instead of 21.7 s without it.
    "spark.sql.streaming.stateStore.rocksdb.trackTotalNumberOfRows": "false",
    # Progress of every micro-batch of a run is summed into the asset's metadata.
    "spark.sql.streaming.numRecentProgressUpdates": "1000",
    "spark.ui.showConsoleProgress": "false",
    # Checkpoint logs through Hadoop's FileSystem API: the default (FileContext) manager on a local
    # disk spawns processes to set permissions; this halved the time per micro-batch here.
    "spark.sql.streaming.checkpointFileManagerClass": (
        "org.apache.spark.sql.execution.streaming.checkpointing.FileSystemBasedCheckpointFileManager"
    ),
    # Serial GC: on a laptop's few cores G1's concurrent threads compete with the tasks and its heap
    # grows further; the 2M-recording load took 89 s and peaked at 1479 MiB instead of 91 s, 1866 MiB.
    # The heap grows only when less than 10% is free after a collection, and shrinks above 20%.
    # Both JIT compilers (C1, then C2 for hot code) in a JVM that serves many runs, the warm driver:
    # C2's code is faster once compiled (the 2M-recording load: 119 s against 189 s with C1 only,
    # in a JVM of its own), and a JVM that lives on earns back its compile time. A JVM that lives for
    # one run compiles with C1 only (`ONE_RUN_JIT`). C1 only would also shrink the code cache to
    # 48 MB, which a JVM that runs many queries fills with the code Spark generates for each ("CodeCache
    # is full", then every task failed); 240 MB is reserved, and used only as code is compiled.
    # The JVM's own time zone is UTC too, like the sessions': in a JVM of any other zone Delta checks
    # every commit to a small table (its files listed in the commit's checksum) by rebuilding the
    # table's state, a Spark job per commit (0.7-0.9 s for each gold table here). With the machine
    # in Europe/Berlin, +10 files took 13.9 s a run with this and 17.3 s without (median of 4 each,
    # alternating).
    "spark.driver.extraJavaOptions": (
        "-Dlog4j2.level=WARN -XX:ReservedCodeCacheSize=240m -XX:+UseSerialGC "
        "-XX:MinHeapFreeRatio=10 -XX:MaxHeapFreeRatio=20 -Duser.timezone=UTC"
    ),
    # One block cache and write-buffer budget for all the RocksDB state stores of a JVM (each store
    # would have its own): memory outside the heap stays bounded however many stores a warm driver
    # has opened. The 2M-recording load: 121.6 s, 1446 MiB peak, against 127 s, 1480 MiB.
    "spark.sql.streaming.stateStore.rocksdb.boundedMemoryUsage": "true",
    "spark.sql.streaming.stateStore.rocksdb.maxMemoryUsageMB": "128",
    # Of that budget, the share kept for the stores' index and filter blocks (default 0.1). Silver's
    # dedupe looks up every new key, and a key seen before is ruled out by the filters alone; once
    # they no longer fit, each lookup reads them from disk again. 1M new recordings onto a state of
    # 7-8M keys took 298-360 s in silver by default, 44 s a million with 0.4 (and 21 s with a
    # 512 MiB budget, at 130 MiB more memory); the 2M-recording load is unchanged (35.5 s, 1300 MiB
    # against 35.3 s, 1310 MiB). The write buffers' share (0.5) and this must stay below 1.
    "spark.sql.streaming.stateStore.rocksdb.highPriorityPoolRatio": "0.4",
    # Listing files without per-file work: Hadoop's local file system starts a process for each
    # file whose permissions are asked for (locality does), and more than `threshold` paths are
    # listed by a Spark job with one task per file. A batch of 5,000 landed files went from ~26 s to
    # ~5 s with both (measured here).
    "spark.sql.sources.ignoreDataLocality": "true",
    "spark.sql.sources.parallelPartitionDiscovery.threshold": "100000",
    # Spark compiles the code it generates for each plan and keeps the classes in a cache of 100 by
    # default; a run of this pipeline uses about 150, so the cache evicted what the next run needed.
    # Measured here: in one session a second small run compiled 154 classes with the default, 3 with
    # room for 1000 (8.0 s a run instead of 6.3 s). The JVM reads it once: a launch setting.
    "spark.sql.codegen.cache.maxEntries": "1000",
    # pyspark tells the JVM the Python line behind every Column function it calls (for the
    # "== DataFrame ==" context of a runtime error), ~15 py4j calls each: building bronze's plan took
    # 0.55 s instead of 0.32 s. Runs of one new file: 11.07 s against 10.67 s without it (median of
    # 8, alternating). Errors still name the failing expression, not the Python line.
    "spark.python.sql.dataFrameDebugging.enabled": "false",
    # A bounded heap; without it the JVM grows towards a quarter of the machine's memory. With the
    # free ratios above, the 2M-recording load peaked at 1326 MiB for the whole process tree (1502
    # MiB with a 1 GiB heap), in the same time.
    "spark.driver.memory": "768m",
}


#: Added to the driver's Java options when a run starts a JVM for itself alone: C1 only. Its queries
#: are short and C2 compiles in the background on the same few cores; 10 new files in a JVM of the
#: run's own: 26.3 s a run with C1 only, 35.0 s with C2 (median of 4, alternating). In a warm driver
#: JVM C2 costs its first runs (one new file each): 35.1 against 26.3 s for the run that starts it,
#: 1.5-4.3 s more in the next three, then -0.1 to +1.4 s.
ONE_RUN_JIT = "-XX:TieredStopAtLevel=1"

#: Added with a local master, where the batch jobs (gold's tables and checks) are small: adaptive
#: execution plans each of their stages again as the one before ends, which cost more than it saved
#: on one machine. With it off, landing to gold went from 13.2 to 12.5 s (p50 of 10 landings,
#: alternating with a `dagster dev` that kept it on). Streaming micro-batches never use it.
LOCAL_MASTER_DEFAULTS: dict[str, str] = {"spark.sql.adaptive.enabled": "false"}

#: Added for the warm driver JVM, whose SparkContext serves run after run (`WarmSession`).
WARM_DRIVER_DEFAULTS: dict[str, str] = {
    # Spark keeps the classes it compiles for a plan by the class loader of the tasks that run them,
    # and with session isolation each session's tasks get a class loader of their own: every run
    # compiled its ~105 classes again (1.4 s of the JVM's CPU in a run of one new file). Isolation
    # keeps apart the jars and classes that sessions add (Spark Connect's artifacts); runs add none.
    "spark.sql.artifact.isolation.enabled": "false",
    # The context's status store (jobs, stages, tasks, SQL executions; for the UI) would keep up to
    # 1,000 jobs and 100,000 tasks of the runs before, in the heap of a JVM that lives for weeks.
    "spark.ui.retainedJobs": "200",
    "spark.ui.retainedStages": "200",
    "spark.ui.retainedTasks": "5000",
    "spark.sql.ui.retainedExecutions": "200",
    "spark.sql.streaming.ui.retainedQueries": "20",
}


class SparkSessionResource(LazyPySparkResource):
    """One SparkSession per run, built on dagster-pyspark's `LazyPySparkResource`.

    The session starts when an asset first needs it (a run in which no query has new input never
    starts a JVM) and stops when the run ends. The run holds the lakehouse lock from start to end, so
    a second run cannot drive queries on the same checkpoints.

    With `master` the run is the Spark driver (local, or a cluster's: `spark://`, `yarn`, `k8s://`).
    With `remote` it is a client of a Spark Connect server, which runs the queries; the server's
    master, executors and settings apply, and this run sets only `spark.sql.*` settings.
    """

    lakehouse: LakehouseResource
    spark_config: dict[str, Any] = Field(
        default_factory=dict, description="Extra `spark.*` settings; they win over every default."
    )
    master: str = Field(
        default="local[*]",
        description="Spark master URL, passed to Spark as is: local[*], spark://host:7077, yarn, "
        "k8s://https://host:port. Ignored with `remote`.",
    )
    remote: str | None = Field(
        default=None,
        description="Spark Connect server URL, sc://host:port: the run connects to it instead of "
        "starting a driver. The server must be able to import this project (see docs/deployment.md).",
    )
    app_name: str = "heartbeat-lakehouse"
    shuffle_partitions: int = Field(
        default_factory=lambda: os.cpu_count() or 2,
        description="spark.sql.shuffle.partitions; defaults to the number of cores.",
    )
    ui_enabled: bool = Field(default=False, description="Start the Spark UI (port 4040).")
    log_level: str = Field(default="WARN", description="Spark's log level for the session.")
    stop_on_teardown: bool = Field(
        default=True,
        description="Stop the session when the run ends (tests keep one session for the whole suite).",
    )
    keep_jvm_warm_s: float = Field(
        default=WARM_IDLE_S,
        description="With a local master: keep the driver JVM this many seconds after a run, for the "
        "next run to use (it skips the JVM's start and cold code); 0 starts a JVM per run.",
    )

    _exit_stack: ExitStack | None = PrivateAttr(default=None)
    _class_archive: ClassArchive | None = PrivateAttr(default=None)
    _warm_driver: WarmDriver | None = PrivateAttr(default=None)
    _warm_session: WarmSession | None = PrivateAttr(default=None)

    @field_validator("master")
    @classmethod
    def _not_connect(cls, value: str) -> str:
        if value.startswith("sc://"):
            raise ValueError(f"{value} is a Spark Connect URL: set it as `remote`, not as the master.")
        return value

    @field_validator("remote")
    @classmethod
    def _connect_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("sc://"):
            raise ValueError(f"The Spark Connect URL {value!r} must look like sc://host:port.")
        return value

    def session_config(self, warm_driver: bool = False) -> dict[str, str]:
        """The session's settings, Delta Lake's jars included; for a driver JVM that serves one run
        unless `warm_driver`."""
        config = self._settings(warm_driver)
        # Resolved from Maven Central on first use (then kept); spark.jars ships them to executors.
        try:
            jars = delta_lake.delta_jars(config, s3=self.lakehouse.on_object_storage)
        except delta_lake.DeltaJarsUnavailable as exc:
            raise Failure(str(exc)) from exc
        config["spark.jars"] = ",".join([*jars, *(j for j in config.get("spark.jars", "").split(",") if j)])
        return config

    def _settings(self, warm_driver: bool = False) -> dict[str, str]:
        config = {
            **LOCAL_DEFAULTS,
            **delta_lake.SESSION_SETTINGS,
            "spark.master": self.master,
            "spark.app.name": self.app_name,
            "spark.sql.shuffle.partitions": str(self.shuffle_partitions),
            # Delta rebuilds a table's state from its log in a Spark job of 50 partitions by default,
            # far more than a small table's log needs; as many as the shuffles have.
            "spark.databricks.delta.snapshotPartitions": str(self.shuffle_partitions),
            # VACUUM lists a table's folders in a Spark job of this many tasks (10,000 by default):
            # 28 s for a small gold table here, 4 s with as many tasks as shuffles have.
            "spark.sql.sources.parallelPartitionDiscovery.parallelism": str(self.shuffle_partitions),
            "spark.ui.enabled": str(self.ui_enabled).lower(),
        }
        if self.master.startswith("local") and not self.remote:  # a Connect server's master is its own
            config.update(LOCAL_MASTER_DEFAULTS)
        if self.lakehouse.on_object_storage:
            config.update(storage.s3a_settings())
        if warm_driver:
            config.update(WARM_DRIVER_DEFAULTS)
        else:
            config["spark.driver.extraJavaOptions"] += f" {ONE_RUN_JIT}"
        config.update({key: str(value) for key, value in self.spark_config.items()})
        return config

    def connect_config(self) -> dict[str, str]:
        """What a Spark Connect client may set: the session's SQL settings (the rest, Delta Lake's
        extension among them, is the server's)."""
        return {
            key: value
            for key, value in self._settings().items()
            if key.startswith("spark.sql.") and key not in delta_lake.SESSION_SETTINGS
        }

    def setup_for_execution(self, context: InitResourceContext) -> None:
        stack = ExitStack()
        stack.enter_context(self.lakehouse.exclusive_lock())
        self._exit_stack = stack

    def _init_session(self) -> None:
        if self._spark_session is not None:
            return
        if self.remote:
            self._spark_session = build_connect_session(self.remote, self.connect_config())
            server_side = sorted(key for key in self.spark_config if not key.startswith("spark.sql."))
            if server_side:
                get_dagster_logger().warning(
                    f"Spark Connect: {', '.join(server_side)} are settings of the Connect server and "
                    "do not apply to this run; pass them to start-connect-server.sh with --conf."
                )
        else:
            if self._take_warm_driver(self.session_config(warm_driver=True)):
                return
            config = self.session_config()
            # A JVM this process starts now (none runs yet) may write the class archive at its end.
            # Java options that choose their own archive (or none) are left alone.
            java_options = config.get("spark.driver.extraJavaOptions", "")
            cache_dir = default_cache_dir()
            if cache_dir and SparkContext._gateway is None and not ClassArchive.chosen_in(java_options):
                self._class_archive = ClassArchive(cache_dir, java_options)
                options = self._class_archive.java_options(create=self.stop_on_teardown)
                config["spark.driver.extraJavaOptions"] = f"{java_options} {options}".strip()
            self._spark_session = build_spark_session(config)
            self._spark_session.sparkContext.setLogLevel(self.log_level)

    def _take_warm_driver(self, config: dict[str, str]) -> bool:
        """Start the session in the warm driver JVM (starting that JVM if none runs); False if not."""
        cache_dir = default_cache_dir()
        wanted = self.stop_on_teardown and self.keep_jvm_warm_s > 0 and self.master.startswith("local")
        if not (wanted and cache_dir and SparkContext._gateway is None):
            return False
        warm = WarmDriver(cache_dir, config, self.keep_jvm_warm_s)
        attach = warm.take()
        if attach is None:
            get_dagster_logger().info(
                f"The warm driver JVM is in use by another run or could not start (see {warm.log_path}): "
                "this run starts a JVM of its own."
            )
            return False
        self._warm_driver = warm
        # py4j numbers the Python objects it hands the JVM p0, p1, ... in every process. A JVM that
        # collects an object of an earlier run tells the Python side to drop its number, which would
        # then drop this run's object of that number: numbers unique to this process prevent that.
        py4j.protocol.PYTHON_PROXY_PREFIX = f"p{os.getpid()}_"
        try:
            os.environ.update(attach)  # read once, when pyspark connects
            try:
                self._warm_session = WarmSession(config)
            finally:
                for key in attach:
                    os.environ.pop(key, None)
            self._spark_session = self._warm_session.session
            self._spark_session.sparkContext.setLogLevel(self.log_level)
            # Every Java object this run is handed is dropped when it lets the JVM go
            # (`forget_java_objects`), so py4j need not tell the JVM of each one Python collects, a
            # round trip each: ~1,000 a run of one new file, 0.27 s.
            SparkContext._gateway.gateway_property.enable_memory_management = False
        except BaseException:
            self._warm_driver = self._warm_session = None
            warm.discard()  # a JVM left in an unknown state serves no other run
            _hand_back(warm)
            raise
        started = "a SparkContext of the runs before" if self._warm_session.reused else "a new SparkContext"
        get_dagster_logger().info(
            f"Spark runs in the warm driver JVM (pid {warm.jvm_pid}), in {started}; its log is "
            f"{warm.log_path}."
        )
        return True

    def _release_warm_driver(self) -> None:
        """Leave the warm JVM clean for the next run: no query, no state store open, nothing of this
        run's session left in the SparkContext."""
        warm, self._warm_driver = self._warm_driver, None
        session, self._warm_session = self._warm_session, None
        try:
            if session is not None:
                session.close()
            if SparkContext._jvm is not None:
                forget_java_objects(SparkContext._gateway)
        except BaseException:
            warm.discard()  # a JVM left in an unknown state serves no other run
            raise
        finally:
            _hand_back(warm)

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        try:
            if self._warm_driver is not None:
                self._release_warm_driver()
            elif self.stop_on_teardown and self._spark_session is not None:
                stop_session(self._spark_session)
                if self._class_archive is not None and self._class_archive.creating:
                    self._class_archive.finish(SparkContext._gateway.proc)
                    SparkContext._gateway = SparkContext._jvm = None  # that JVM has exited
        finally:
            if self._exit_stack is not None:
                self._exit_stack.close()


def _hand_back(warm: WarmDriver) -> None:
    """Give the warm JVM back for the next run, forgetting it in this process."""
    warm.release()
    # That JVM is the next run's now: a later session of this process starts its own.
    SparkContext._gateway = SparkContext._jvm = SparkContext._active_spark_context = None


class WarmSession:
    """A run's SparkSession in the warm driver JVM, on a SparkContext that outlives the run.

    The context is the one the runs before used, if it was made with the same settings (else it is
    stopped and a new one made): the classes Spark compiled for their plans are then compiled once
    (see `WARM_DRIVER_DEFAULTS`), and the context's start and stop are skipped. Each run has a session
    of its own (`newSession`: its own SQL settings, views and streaming queries), sharing the state
    of the context's first session. What the run added goes when it ends: its queries, the
    listeners its session registered with the context, cached data, open state stores.
    """

    #: A setting of the warm JVM's SparkContext: which settings the context was made with.
    SETTINGS_KEY = "spark.heartbeat.settingsDigest"

    def __init__(self, config: dict[str, str]):
        from pyspark import SparkConf
        from pyspark.sql import SparkSession

        digest = hashlib.sha256(json.dumps(sorted(config.items())).encode()).hexdigest()[:16]
        SparkContext._ensure_initialized()  # attaches to the gateway that PYSPARK_GATEWAY_PORT names
        jvm = SparkContext._jvm
        running = getattr(getattr(jvm, "org.apache.spark.SparkContext$"), "MODULE$").getActive()
        java_context = None
        if running.isDefined():
            if running.get().conf().get(self.SETTINGS_KEY, "") == digest:
                java_context = jvm.org.apache.spark.api.java.JavaSparkContext(running.get())
            else:  # made for other settings (an edited configuration)
                running.get().stop()
        self.reused = java_context is not None
        conf = SparkConf().setAll(list(config.items())).set(self.SETTINGS_KEY, digest)
        context = SparkContext(conf=conf, jsc=java_context)
        # The context's first session (pyspark takes it from the JVM's default session) stays as it
        # is: its shared state (the SQL listener, the cache manager) serves every run's session.
        self._first = SparkSession(context)
        self.session = self._first.newSession()
        SparkSession._activeSession = self.session
        SparkSession._get_j_spark_session_class(jvm).setActiveSession(self.session._jsparkSession)
        self._listeners_before = set(self._listeners())

    def _listeners(self) -> dict[int, Any]:
        """The listeners registered with the context, by their identity in the JVM."""
        identity = SparkContext._jvm.java.lang.System.identityHashCode
        return {identity(listener): listener for listener in self._listener_bus().listeners()}

    def _listener_bus(self):
        return self.session.sparkContext._jsc.sc().listenerBus()

    def close(self) -> None:
        """End the run's part: the context stays in the JVM, for the next run."""
        from pyspark.sql import SparkSession

        jvm = SparkContext._jvm
        for query in self.session.streams.active:
            query.stop()
        # Each session registers listeners with the context (its streaming queries' bus, ...), which
        # never unregister them: they would pile up, and each would see every later run's events.
        bus = self._listener_bus()
        for key, listener in self._listeners().items():
            if key not in self._listeners_before:
                bus.removeListener(listener)
        self.session._jsparkSession.sharedState().cacheManager().clearCache()
        jvm.org.apache.spark.sql.execution.streaming.state.StateStore.stop()
        sessions = SparkSession._get_j_spark_session_class(jvm)
        sessions.clearActiveSession()
        sessions.setDefaultSession(self._first._jsparkSession)
        # Let go of the context on the Python side only (pyspark's stop() would stop it in the JVM).
        context = self.session.sparkContext
        server, context._accumulatorServer, context._jsc = context._accumulatorServer, None, None
        context.stop()
        SparkSession._instantiatedSession = SparkSession._activeSession = None
        shut_down_in_background(server)


def shut_down_in_background(server) -> None:
    """End pyspark's accumulator server without waiting for it.

    That server (a socketserver in a thread of this process, for the updates of Python accumulators,
    which nothing here uses) looks at its shutdown flag every 0.5 s; `SparkContext.stop` would wait.
    """
    if server is not None:
        threading.Thread(target=server.shutdown, name="accumulator-server-shutdown", daemon=True).start()


def stop_session(session) -> None:
    """`session.stop()`, without waiting for pyspark's accumulator server to end (0.42 s of a run's
    0.44 s teardown in a warm driver JVM): it is shut down in the background."""
    context = getattr(session, "_sc", None)  # a Spark Connect session has none
    server = getattr(context, "_accumulatorServer", None)
    if server is not None:
        context._accumulatorServer = None  # so that stop() leaves it alone
    session.stop()
    shut_down_in_background(server)


def build_spark_session(config: dict[str, str]):
    """Create (or reuse) the SparkSession; fail with a remedy when Java is missing.

    This process is the Spark driver, whatever the master, so it needs Java.
    """
    if java_binary() is None:
        raise Failure(
            "Spark needs Java 17 but no `java` was found on PATH and JAVA_HOME is not set. "
            "Install it (Debian/Ubuntu: `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME."
        )
    # pyspark starts the JVM with this process's environment.
    added = {key: value for key, value in DRIVER_ENVIRONMENT.items() if key not in os.environ}
    os.environ.update(added)
    try:
        return spark_session_from_config(config)
    except Exception as exc:  # pyspark raises several types when the JVM cannot start
        if "JAVA_GATEWAY_EXITED" in str(exc) or "Java gateway" in str(exc):
            raise Failure(
                f"Spark's JVM failed to start ({exc}). Check that Java 17 is installed and that "
                "JAVA_HOME points at it."
            ) from exc
        raise
    finally:
        for key in added:
            os.environ.pop(key, None)


def build_connect_session(url: str, config: dict[str, str]):
    """A Spark Connect session on the server at `url`, with the session settings `config`.

    Fails fast, with what to do, when the client libraries are missing or the server is unreachable.
    """
    try:
        import pyspark.sql.connect.session  # noqa: F401  (grpcio, pandas, pyarrow, ...)
    except ImportError as exc:
        raise Failure(
            f"Spark Connect needs its client libraries ({exc}). Install them with "
            "`pip install -e '.[connect]'` (the `connect` extra of this project)."
        ) from exc
    from resources.connect_server import DEFAULT_PORT

    parsed = urlparse(url.split(";", 1)[0])
    host, port = parsed.hostname or "localhost", parsed.port or DEFAULT_PORT
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as exc:
        raise Failure(
            f"Cannot reach the Spark Connect server at {host}:{port} ({exc}). Start it (see "
            "docs/deployment.md, 'Spark Connect') or fix HEARTBEAT_SPARK_REMOTE."
        ) from exc
    from pyspark.sql import SparkSession

    session = SparkSession.builder.remote(url).config(map=config).getOrCreate()
    extension = delta_lake.SESSION_SETTINGS["spark.sql.extensions"]
    if extension not in session.conf.get("spark.sql.extensions", ""):
        raise Failure(
            f"The Spark Connect server at {host}:{port} does not load Delta Lake, which every table of "
            f"this lakehouse is. Start it with `--packages {delta_lake.PACKAGE}` and "
            + " ".join(f"`--conf {key}={value}`" for key, value in delta_lake.SESSION_SETTINGS.items())
            + " (see docs/deployment.md, 'Spark Connect')."
        )
    return session
