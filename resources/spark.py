"""The SparkSession shared by every asset of a run."""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack
from typing import Any

from dagster import Failure, InitResourceContext
from dagster_pyspark import LazyPySparkResource
from dagster_pyspark.resources import spark_session_from_config
from pydantic import Field, PrivateAttr

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
    # Progress of every micro-batch of a run is summed into the asset's metadata.
    "spark.sql.streaming.numRecentProgressUpdates": "1000",
    "spark.ui.showConsoleProgress": "false",
    # Checkpoint logs through Hadoop's FileSystem API: the default (FileContext) manager on a local
    # disk spawns processes to set permissions; this halved the time per micro-batch here.
    "spark.sql.streaming.checkpointFileManagerClass": (
        "org.apache.spark.sql.execution.streaming.checkpointing.FileSystemBasedCheckpointFileManager"
    ),
    "spark.driver.extraJavaOptions": "-Dlog4j2.level=WARN",
    # A bounded heap keeps the whole run (Python, JVM, RocksDB) under 1.5 GiB on a 2M-record load;
    # without it the JVM grows towards a quarter of the machine's memory.
    "spark.driver.memory": "1g",
}


class SparkSessionResource(LazyPySparkResource):
    """One SparkSession per run, built on dagster-pyspark's `LazyPySparkResource`.

    The session starts when an asset first needs it (a run in which no query has new input never
    starts a JVM) and stops when the run ends. The run holds the lakehouse lock from start to end, so
    a second run cannot drive queries on the same checkpoints.
    """

    lakehouse: LakehouseResource
    spark_config: dict[str, Any] = Field(
        default_factory=dict, description="Extra `spark.*` settings; they win over every default."
    )
    master: str = Field(default="local[*]", description="Spark master URL.")
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

    _exit_stack: ExitStack | None = PrivateAttr(default=None)

    def session_config(self) -> dict[str, str]:
        config = {
            **LOCAL_DEFAULTS,
            "spark.master": self.master,
            "spark.app.name": self.app_name,
            "spark.sql.shuffle.partitions": str(self.shuffle_partitions),
            "spark.ui.enabled": str(self.ui_enabled).lower(),
        }
        config.update({key: str(value) for key, value in self.spark_config.items()})
        return config

    def setup_for_execution(self, context: InitResourceContext) -> None:
        stack = ExitStack()
        stack.enter_context(self.lakehouse.exclusive_lock())
        self._exit_stack = stack

    def _init_session(self) -> None:
        if self._spark_session is None:
            self._spark_session = build_spark_session(self.session_config())
            self._spark_session.sparkContext.setLogLevel(self.log_level)

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        try:
            if self.stop_on_teardown and self._spark_session is not None:
                self._spark_session.stop()
        finally:
            if self._exit_stack is not None:
                self._exit_stack.close()


def build_spark_session(config: dict[str, str]):
    """Create (or reuse) the SparkSession; fail with a remedy when Java is missing."""
    if config.get("spark.master", "").startswith("local") and not _java_available():
        raise Failure(
            "Spark needs Java 17 but no `java` was found on PATH and JAVA_HOME is not set. "
            "Install it (Debian/Ubuntu: `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME."
        )
    try:
        return spark_session_from_config(config)
    except Exception as exc:  # pyspark raises several types when the JVM cannot start
        if "JAVA_GATEWAY_EXITED" in str(exc) or "Java gateway" in str(exc):
            raise Failure(
                f"Spark's JVM failed to start ({exc}). Check that Java 17 is installed and that "
                "JAVA_HOME points at it."
            ) from exc
        raise


def _java_available() -> bool:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.path.exists(os.path.join(java_home, "bin", "java")):
        return True
    return shutil.which("java") is not None
