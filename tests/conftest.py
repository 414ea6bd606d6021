"""One SparkSession for the whole test session, and helpers to run the lakehouse through Dagster."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dagster import DagsterInstance
from deltalake import DeltaTable
from hypothesis import settings
from pyspark import SparkContext
from s3fs import S3FileSystem

from heartbeat_assets.definitions import build_definitions
from resources import TABLES, LakehouseResource, SparkSessionResource, storage
from resources.jvm import CACHE_ENV as JVM_CACHE_ENV
from resources.jvm import default_cache_dir, stop_warm_drivers
from resources.spark import build_spark_session

# Fuzz tests run 25 examples; HYPOTHESIS_PROFILE=thorough runs 300.
settings.register_profile("default", max_examples=25)
settings.register_profile("thorough", max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

S3_BUCKET = "lakehouse"

# Under pytest-xdist (`make test`), each worker's runs keep their warm driver JVMs in a directory of
# their own: a worker ending its session stops its own, not those another worker's runs are using.
if os.environ.get("PYTEST_XDIST_WORKER") and default_cache_dir() is not None:
    os.environ[JVM_CACHE_ENV] = str(default_cache_dir() / os.environ["PYTEST_XDIST_WORKER"])

#: The longest modules, longest first: `make test` hands whole modules to its workers in this order,
#: then the rest, so that the workers end together.
LONGEST_MODULES = [
    "test_crashes.py",
    "test_ui.py",
    "test_quality.py",
    "test_pipeline.py",
    "test_incremental.py",
    "test_hostile_input.py",
]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)

    items.sort(key=rank)  # stable: each module's tests keep their order


TEST_SPARK = {"master": "local[2]", "shuffle_partitions": 2, "stop_on_teardown": False}


@pytest.fixture(scope="session")
def spark():
    config = SparkSessionResource(lakehouse=LakehouseResource(data_dir="/tmp"), **TEST_SPARK).session_config()
    session = build_spark_session(config)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def forget_delta_tables() -> None:
    """Drop the logs and state Delta keeps cached in the JVM, by table path: in a session that serves
    hundreds of temporary lakehouses they would fill the heap."""
    if SparkContext._jvm is not None and SparkContext._active_spark_context is not None:
        SparkContext._jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()


@pytest.fixture(autouse=True)
def forget_tables_after_each_test():
    yield
    forget_delta_tables()


@pytest.fixture(scope="session", autouse=True)
def no_warm_jvm_left_behind():
    """Runs the tests start in processes of their own keep a warm driver JVM: end them with the suite."""
    yield
    stop_warm_drivers(default_cache_dir())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: moto's server answers the `Expect: 100-continue` of the AWS SDK's file uploads (S3A's optimized
#: copy from a local file, which RocksDB's state checkpoints use) in a way the SDK takes for the final
#: status; S3A's plain upload works with it. Real S3 needs no such setting.
MOTO_SETTINGS = {"spark.hadoop.fs.s3a.optimized.copy.from.local.enabled": "false"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server on 127.0.0.1 with an empty bucket; the AWS_* variables point every client of this
    process and of the runs it starts (Spark's S3A, s3fs, delta-rs) at it."""
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if moto is None:
        pytest.skip("moto's S3 server is not installed (pip install -e '.[dev]')")
    port = free_port()
    log = tmp_path_factory.mktemp("s3-server") / "moto.log"
    with open(log, "w") as out:  # it logs every request
        server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out)
    environment = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",  # delta-rs, for tests that read a table with DeltaTable directly
    }
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    # fsspec keeps one s3fs client per set of arguments, made with the AWS_* settings of its time: a
    # client of another module's server (now stopped) would be reused.
    S3FileSystem.clear_instance_cache()
    try:
        deadline = time.monotonic() + 60
        while True:  # until it listens; a server that exits or never listens skips, saying why
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"moto's S3 server did not start: {log.read_text()[-500:]}")
                time.sleep(0.2)
        storage.data_root(f"s3a://{S3_BUCKET}").fs.mkdir(S3_BUCKET)  # any failure here is a failure
        yield f"s3a://{S3_BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Lakehouse:
    """A lakehouse in a temporary data root, driven through Dagster like a user would."""

    def __init__(self, root: Path, spark, resource: LakehouseResource | None = None):
        self.root = root
        self.spark = spark
        self.resource = resource or LakehouseResource(data_dir=str(root))
        self.defs = build_definitions(
            lakehouse=self.resource, spark=SparkSessionResource(lakehouse=self.resource, **TEST_SPARK)
        )
        self.instance = DagsterInstance.ephemeral()

    def run(self, run_config: dict | None = None, raise_on_error: bool = True, job_name: str = "medallion"):
        job = self.defs.resolve_job_def(job_name)
        return job.execute_in_process(
            instance=self.instance, run_config=run_config, raise_on_error=raise_on_error
        )

    def table(self, name: str, version: int | None = None):
        """Table `name` as Spark reads it (at `version`, else the latest)."""
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(str(self.resource.table(name)))

    def read(self, name: str) -> list[dict]:
        return [row.asDict() for row in self.table(name).collect()]

    def contents(self, ignore: tuple[str, ...] = ()) -> dict[str, list]:
        """Every table's rows, sorted, without the columns that record when a row was ingested."""
        return {table: comparable_rows(self.table(table), ignore) for table in TABLES}

    def materialization_metadata(self, result, table: str) -> dict:
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            if materialization.asset_key.to_user_string() == table:
                return {key: value.value for key, value in materialization.metadata.items()}
        raise AssertionError(f"{table} was not materialized")


#: Columns that record when a row was ingested or a file landed: they differ between two runs of the
#: same input.
VOLATILE = ("ingested_at", "source_modified_at")


def comparable_rows(df, ignore: tuple[str, ...] = ()) -> list[tuple]:
    """A Spark DataFrame's rows, sorted, without the volatile columns and those in `ignore`."""
    return normalized(df.drop(*[c for c in df.columns if c in (*VOLATILE, *ignore)]).collect())


def normalized(rows) -> list[tuple]:
    """Rows of any reader, sorted, in one form: timestamps in UTC without a zone, NaN comparable,
    landed files' URIs relative to the data root."""
    return sorted((tuple(_comparable(v) for v in row) for row in rows), key=repr)


def delta_rs_rows(path, version: int | None = None, ignore: tuple[str, ...] = ()) -> list[tuple]:
    """A Delta table's rows as delta-rs (no Spark) reads them, in the form of `comparable_rows`.

    Delta stores timestamps in UTC; delta-rs gives them with their zone, Spark (session zone UTC)
    without: they compare in UTC without a zone.
    """
    table = DeltaTable(str(path), version=version).to_pyarrow_table()
    columns = [c for c in table.column_names if c not in (*VOLATILE, *ignore)]
    return normalized(zip(*(table.column(c).to_pylist() for c in columns), strict=True) if columns else [])


def assert_readers_agree(lakehouse: "Lakehouse", names) -> None:
    """delta-rs reads each table's latest version with the rows Spark reads."""
    for name in names:
        spark_rows = comparable_rows(lakehouse.table(name))
        assert delta_rs_rows(lakehouse.resource.table(name)) == spark_rows, name


def _comparable(value):
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    if isinstance(value, float) and value != value:
        return "NaN"  # NaN != NaN
    if isinstance(value, str) and value.startswith(("file:", "s3a:")):
        # Copies of a data root, on a disk or a bucket, compare equal.
        return re.sub(r"^(file:|s3a://).*?/landing/", "landing/", value)
    return value


@pytest.fixture
def lakehouse(tmp_path, spark) -> Lakehouse:
    return Lakehouse(tmp_path / "data", spark)
