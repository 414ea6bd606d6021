"""The same project on a Spark standalone cluster and through Spark Connect, driven by Dagster.

Both start real servers on 127.0.0.1 from the scripts and jars the pyspark package ships: one
master and two workers (one core each), or a Spark Connect server. The medallion runs as a user would
run it, `dagster asset materialize` in a fresh process with only environment variables changed; its
gold must equal a local run's on the same landed files and the independent oracle. The pytest
process keeps its own local SparkSession (conftest) for the local run and for reading tables back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyspark
import pytest
from dagster import AssetKey, DagsterInstance
from deltalake import DeltaTable

from heartbeat_assets.simulator import Faults, Simulator
from resources import TABLES, LakehouseResource, SparkSessionResource, delta_lake, storage
from resources import connect_server as connect_server_process
from resources.spark import LOCAL_DEFAULTS
from tests.conftest import MOTO_SETTINGS, Lakehouse, delta_rs_rows, free_port
from tests.test_pipeline import assert_gold_matches_oracle, assert_silver_matches_oracle

# In `make test-all` only: servers of their own (a standalone cluster, Spark Connect).
pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SPARK_HOME = Path(pyspark.__file__).resolve().parent
GOLD = ["gold/heartrate_by_patient", "gold/daily_patient_avg", "gold/device_signal_loss"]
APP_NAME = "heartbeat-cluster-test"
#: The Java options the resource gives a JVM that serves one run (C1 only, serial collector).
ONE_RUN_JAVA_OPTIONS = SparkSessionResource(lakehouse=LakehouseResource(data_dir="/tmp")).session_config()[
    "spark.driver.extraJavaOptions"
]


def spark_env(**extra: str) -> dict[str, str]:
    """Environment for Spark's scripts: this pyspark as SPARK_HOME, loopback only, this venv's Python."""
    return {
        **os.environ,
        "SPARK_HOME": str(SPARK_HOME),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        **extra,
    }


def wait_until(condition, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def tail(path: Path, chars: int = 3000) -> str:
    """The end of a log, after the first lines anywhere in it that name an error condition
    ([DELTA_...], [PYTHON_EXCEPTION], ...), which a long stack trace would push out of the end."""
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace")
    conditions = list(dict.fromkeys(line for line in text.splitlines() if ERROR_CONDITION.search(line)))
    return "\n".join([*conditions[:5], "...", text[-chars:]])


ERROR_CONDITION = re.compile(r"\[[A-Z][A-Z0-9_]{4,}(\.[A-Z0-9_]+)?\]")


# The data: a few files with faults, landed once; every run gets its own copy of the data root.


@pytest.fixture(scope="module")
def landed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("landed") / "data"
    sim = Simulator(root, seed=11, patients=4, devices=3)
    sim.land_patients()
    sim.land_recordings(files=3, records=60, faults=Faults(malformed=0.03, duplicates=0.05, signal_gaps=0.5))
    return root


def copy_of(landed: Path, parent: Path) -> Path:
    data = parent / "data"
    shutil.copytree(landed, data)
    return data


@pytest.fixture(scope="module")
def local_run(landed, tmp_path_factory, spark) -> Lakehouse:
    """A local run (this process's local[2] session) on the same files."""
    lakehouse = Lakehouse(copy_of(landed, tmp_path_factory.mktemp("local")), spark)
    lakehouse.run()
    return lakehouse


@pytest.fixture(scope="module")
def local_gold(local_run) -> dict[str, list]:
    return gold_of(local_run)


def gold_of(lakehouse: Lakehouse) -> dict[str, list]:
    return {name: rows for name, rows in lakehouse.contents().items() if name in GOLD}


def materialize(tmp_path: Path, data: Path | str, env: dict[str, str]) -> DagsterInstance:
    """`dagster asset materialize --select '*'` in a fresh process, as in production; its instance."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home)
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        completed = subprocess.run(
            [str(BIN / "dagster"), "asset", "materialize", "-m", "heartbeat_assets", "--select", "*"],
            cwd=PROJECT,
            env=spark_env(HEARTBEAT_DATA_DIR=str(data), DAGSTER_HOME=str(home), **env),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    assert completed.returncode == 0, tail(log, 6000)
    assert "RUN_SUCCESS" in log.read_text()
    return DagsterInstance.from_config(str(home))


def metadata(instance: DagsterInstance, table: str) -> dict:
    event = instance.get_latest_materialization_event(AssetKey(table.split("/")))
    assert event is not None, f"{table} was not materialized"
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def assert_gold_as_local_and_oracle(data: Path, spark, local_gold: dict) -> None:
    lakehouse = Lakehouse(data, spark)
    assert gold_of(lakehouse) == local_gold
    expected = assert_gold_matches_oracle(lakehouse)
    assert_silver_matches_oracle(lakehouse, expected)
    assert expected.silver, "the run had recordings to process"


def assert_counts_reported(instance: DagsterInstance) -> None:
    """The per-batch counts made it back to the Dagster run (they are written where the batch runs)."""
    bronze = metadata(instance, "bronze/recordings")
    assert bronze["micro_batches"] >= 1 and bronze["elements_read"] > 0
    assert bronze["elements_read"] == bronze["recordings_written"] + bronze["quarantined"]
    assert bronze["newest_file_modified_at"] > 0
    silver = metadata(instance, "silver/recordings")
    assert silver["bronze_rows_read"] == bronze["recordings_written"]
    assert silver["unaccounted_rows"] == 0 and silver["recordings_written"] > 0
    assert metadata(instance, "silver/patients")["dagster/row_count"] > 0


# A standalone cluster: one master, two workers.


@dataclass
class StandaloneCluster:
    url: str
    web_ui: str
    workers: list[Path]  # each worker's work dir: <app id>/<executor id>/ for every executor it ran

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.web_ui}/json/", timeout=10) as response:
            return json.load(response)


def stop_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    # No REST submission server (it would take the fixed port 6066); nothing else differs from defaults.
    properties = root / "spark-defaults.conf"
    properties.write_text("spark.master.rest.enabled false\n")
    port, ui_port = free_port(), free_port()
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    env = spark_env(SPARK_LOG_DIR=str(root / "logs"))
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        command = [spark_class, *args, "--properties-file", str(properties)]
        with open(root / f"{name}.log", "w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        processes.append(process)

    cluster = StandaloneCluster(
        url=f"spark://127.0.0.1:{port}",
        web_ui=f"http://127.0.0.1:{ui_port}",
        workers=[root / "worker-1", root / "worker-2"],
    )

    def alive_workers() -> int:
        try:
            return cluster.status()["aliveworkers"]
        except OSError:
            return -1

    try:
        start("master", "org.apache.spark.deploy.master.Master",
              "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui_port))  # fmt: skip
        if not wait_until(lambda: alive_workers() >= 0, 120):
            pytest.skip(f"the Spark master did not start: {tail(root / 'master.log')}")
        for n, work_dir in enumerate(cluster.workers, 1):
            work_dir.mkdir()
            start(f"worker-{n}", "org.apache.spark.deploy.worker.Worker",
                  "--host", "127.0.0.1", "--cores", "1", "--memory", "1g", "--webui-port", "0",
                  "--work-dir", str(work_dir), cluster.url)  # fmt: skip
        if not wait_until(lambda: alive_workers() == 2, 120):
            pytest.skip(f"the Spark workers did not register: {tail(root / 'worker-1.log')}")
        yield cluster
    finally:
        for process in reversed(processes):
            stop_group(process)


def spark_events(event_log_dir: Path):
    """The events of Spark's event logs in a folder (one file per application, or rolled files in a
    folder per application; a running application's log is flushed at every streaming event)."""
    for log in sorted(event_log_dir.rglob("*")):
        if log.is_file() and not log.name.startswith((".", "appstatus")):
            for line in log.read_text().splitlines():
                yield json.loads(line)


def executors_that_ran_tasks(event_log_dir: Path) -> tuple[str, dict[str, int]]:
    """The application id and the tasks each executor finished, from the application's event log."""
    app_id, tasks = None, {}
    for event in spark_events(event_log_dir):
        if event["Event"] == "SparkListenerApplicationStart":
            app_id = event["App ID"]
        elif event["Event"] == "SparkListenerTaskEnd" and event["Task End Reason"]["Reason"] == "Success":
            executor = event["Task Info"]["Executor ID"]
            tasks[executor] = tasks.get(executor, 0) + 1
    return app_id, tasks


def test_medallion_on_a_standalone_cluster_with_its_data_root_on_s3(
    s3, standalone_cluster, landed, local_run, tmp_path
):
    """No executor depends on a path only the driver's disk has: the data root is a bucket of the S3
    server (the workers were started with its AWS_* settings, as a cluster's hosts have theirs)."""
    data = f"{s3}/cluster"
    root = storage.data_root(data)
    root.fs.put(str(landed) + "/", root.path, recursive=True)
    event_log = tmp_path / "spark-events"
    event_log.mkdir()
    spark_conf = {
        "spark.app.name": APP_NAME,
        "spark.executor.memory": "512m",
        # Tiny tasks in cold JVMs, as in a run's own driver JVM: its start options.
        "spark.executor.extraJavaOptions": ONE_RUN_JAVA_OPTIONS,
        # The application's own record of where each task ran.
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": event_log.as_uri(),
        "spark.eventLog.compress": "false",
        **MOTO_SETTINGS,
    }
    instance = materialize(
        tmp_path,
        data,
        {"HEARTBEAT_SPARK_MASTER": standalone_cluster.url, "HEARTBEAT_SPARK_CONF": json.dumps(spark_conf)},
    )

    # The work ran on executors of both workers, none of it in the driver (as it would in local mode).
    app_id, tasks = executors_that_ran_tasks(event_log)
    assert "driver" not in tasks and len(tasks) == 2 and all(n > 0 for n in tasks.values()), tasks
    ran_on = {
        executor: worker.name
        for worker in standalone_cluster.workers
        for executor in (p.name for p in (worker / app_id).iterdir())
    }
    assert sorted(ran_on[executor] for executor in tasks) == ["worker-1", "worker-2"], ran_on
    (app,) = [a for a in standalone_cluster.status()["completedapps"] if a["id"] == app_id]
    assert app["name"] == APP_NAME and app["cores"] == 2 and app["state"] == "FINISHED"

    assert_counts_reported(instance)
    # The local run's gold matches the oracle (test_medallion_through_spark_connect and the pipeline
    # tests check it); every table of the cluster's run equals the local run's.
    # Of a recording sent twice within one micro-batch, silver keeps either copy: its source file may
    # differ.
    on_s3 = LakehouseResource(data_dir=data)
    for table in TABLES:
        ignore = ("source_file",) if table == "silver/recordings" else ()
        assert delta_rs_rows(on_s3.table(table), ignore=ignore) == delta_rs_rows(
            local_run.resource.table(table), ignore=ignore
        ), table
    assert_gold_matches_oracle(local_run)


# A Spark Connect server.


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory):
    events = tmp_path_factory.mktemp("connect") / "events"
    events.mkdir()
    port = free_port()
    server_conf = {
        **LOCAL_DEFAULTS,
        # Delta Lake: its jars (as the resource resolves them) and its session extension.
        "spark.jars": ",".join(delta_lake.delta_jars()),
        **delta_lake.SESSION_SETTINGS,
        "spark.master": "local[2]",
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "2",
        # It serves one test's few queries, as a run's own JVM serves one run.
        "spark.driver.extraJavaOptions": ONE_RUN_JAVA_OPTIONS,
        # The server's record of the streaming queries it ran.
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": events.as_uri(),
        "spark.eventLog.compress": "false",
    }
    try:
        url = connect_server_process.start(port, server_conf)
    except RuntimeError as exc:
        connect_server_process.stop(port)
        pytest.skip(f"the Spark Connect server did not start: {exc}")
    try:
        yield url, events
    finally:
        connect_server_process.stop(port)


def streaming_queries_run(event_log_dir: Path) -> set[str]:
    """Names of the streaming queries the server's event log shows as started."""
    return {
        event["name"]
        for event in spark_events(event_log_dir)
        if event["Event"].endswith("StreamingQueryListener$QueryStartedEvent")
    }


def test_medallion_through_spark_connect(connect_server, landed, local_gold, tmp_path, spark):
    url, server_events = connect_server
    data = copy_of(landed, tmp_path)
    # A server-side setting from the environment is not applied by the client, and the run says so.
    env = {"HEARTBEAT_SPARK_REMOTE": url, "HEARTBEAT_SPARK_CONF": json.dumps({"spark.executor.memory": "1g"})}
    instance = materialize(tmp_path, data, env)
    assert "spark.executor.memory are settings of the Connect server" in (tmp_path / "run.log").read_text()

    # The server ran every query (availableNow, foreachBatch writers in its Python workers).
    # Gold's two aggregates: heartrate_by_patient is rolled up from daily_patient_avg's.
    assert streaming_queries_run(server_events) >= {
        "bronze_recordings", "bronze_patients", "silver_patients", "silver_recordings",
        "gold_daily_patient_avg", "gold_device_signal_loss",
    }  # fmt: skip
    assert_counts_reported(instance)
    assert_gold_as_local_and_oracle(data, spark, local_gold)


#: A Spark Connect client of its own: a Connect session marks its process as a Connect client for
#: good (`SPARK_CONNECT_MODE_ENABLED`), which would turn the test session's local Spark into one.
CONNECT_DOUBLE = """
import sys
from pathlib import Path
from pyspark.sql import SparkSession
from tests.test_tables import append_while_its_double_commits

session = SparkSession.builder.remote(sys.argv[1]).create()
_, raised = append_while_its_double_commits(session, Path(sys.argv[2]))
session.stop()
sys.exit(repr(raised) if raised else 0)
"""


def test_a_batch_whose_double_commits_first_is_written_once_through_connect(connect_server, tmp_path):
    """Through Spark Connect, Delta's conflict with a double of the batch reaches the writer as an
    error condition too: the write reads the double's commit and skips (`tables.commit_idempotent`)."""
    url, _ = connect_server
    done = subprocess.run(
        [sys.executable, "-c", CONNECT_DOUBLE, url, str(tmp_path)],
        cwd=PROJECT, env=spark_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert delta_rs_rows(tmp_path / "t") == [(0,), (1,), (2,)]
    assert DeltaTable(str(tmp_path / "t")).version() == 1


def test_connect_server_launcher_serves_a_command_and_stops_with_it(tmp_path):
    """`heartbeat-connect-server run -- CMD`: the server listens while CMD runs, CMD is told where it
    is, and the server is gone when CMD ends (as `dagster dev` would end)."""
    port = free_port()
    probe = (
        "import os, socket; url = os.environ['HEARTBEAT_SPARK_REMOTE']; print(url); "
        "socket.create_connection(('127.0.0.1', int(url.rsplit(':', 1)[1])), timeout=5).close()"
    )
    launcher = [str(BIN / "heartbeat-connect-server"), "--port", str(port), "run", "--", sys.executable]
    done = subprocess.run([*launcher, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"\nsc://127.0.0.1:{port}\n" in done.stdout  # what the command printed
    assert not connect_server_process.listening(port)
    assert not any(connect_server_process.state_dir(port).glob("*.pid"))


def test_a_run_killed_while_its_query_runs_on_the_connect_server(connect_server, tmp_path, spark):
    """SIGKILL a run while bronze's query runs on the Connect server: the server's query outlives its
    client, and the next run, started at once on the same checkpoint, stops it before starting its
    own (`stopActiveRunOnRestart`), so two runs never drive one checkpoint. Its tables then hold
    every recording once, as the oracle says."""
    url, _ = connect_server
    data = tmp_path / "data"
    sim = Simulator(data, seed=12, patients=6, devices=5)
    sim.land_patients()
    # Enough for bronze's one micro-batch to run for seconds on the server's two cores.
    sim.land_recordings(files=150, records=2000, faults=Faults(malformed=0.01, duplicates=0.02))
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home)
    env = spark_env(HEARTBEAT_DATA_DIR=str(data), DAGSTER_HOME=str(home), HEARTBEAT_SPARK_REMOTE=url)
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", "heartbeat_assets", "--select", "*"]
    with open(tmp_path / "killed.log", "w") as out:
        killed = subprocess.Popen(
            command, cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    batch_started = data / "checkpoints" / "bronze" / "recordings" / "offsets" / "0"
    batch_done = batch_started.parent.parent / "commits" / "0"
    try:
        assert wait_until(batch_started.exists, 300, 0.05), tail(tmp_path / "killed.log")
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    assert not batch_done.exists(), "bronze's batch ended before the run was killed: land more"

    (tmp_path / "next").mkdir()
    instance = materialize(tmp_path / "next", data, {"HEARTBEAT_SPARK_REMOTE": url})
    log = connect_server_process.log_file(int(url.rsplit(":", 1)[1])).read_text(errors="replace")
    # The next run found the killed run's query still running on the server, and stopped it.
    query_id = json.loads((batch_started.parent.parent / "metadata").read_text())["id"]
    assert f"Stopping existing streaming query [id={query_id}, runId=" in log
    assert_counts_reported(instance)
    lakehouse = Lakehouse(data, spark)
    assert_silver_matches_oracle(lakehouse, assert_gold_matches_oracle(lakehouse))
