"""One SparkSession for the whole test session, and helpers to run the lakehouse through Dagster."""

import os
import re
import socket
from pathlib import Path

import pytest
from dagster import DagsterInstance
from hypothesis import settings

from heartbeat_assets.definitions import build_definitions
from resources import TABLES, LakehouseResource, SparkSessionResource
from resources.jvm import default_cache_dir, stop_warm_drivers
from resources.spark import build_spark_session

# Fuzz tests run 25 examples; HYPOTHESIS_PROFILE=thorough runs 300.
settings.register_profile("default", max_examples=25)
settings.register_profile("thorough", max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

TEST_SPARK = {"master": "local[2]", "shuffle_partitions": 2, "stop_on_teardown": False}


@pytest.fixture(scope="session")
def spark():
    config = SparkSessionResource(lakehouse=LakehouseResource(data_dir="/tmp"), **TEST_SPARK).session_config()
    session = build_spark_session(config)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


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

    def read(self, name: str) -> list[dict]:
        return [row.asDict() for row in self.spark.read.parquet(str(self.resource.table(name))).collect()]

    def contents(self, ignore: tuple[str, ...] = ()) -> dict[str, list]:
        """Every table's rows, sorted, without the columns that record when a row was ingested."""
        out = {}
        for table in TABLES:
            df = self.spark.read.parquet(str(self.resource.table(table)))
            df = df.drop(*[c for c in df.columns if c in ("ingested_at", "source_modified_at", *ignore)])
            rows = [tuple(_comparable(v) for v in row) for row in df.collect()]
            out[table] = sorted(rows, key=repr)
        return out

    def materialization_metadata(self, result, table: str) -> dict:
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            if materialization.asset_key.to_user_string() == table:
                return {key: value.value for key, value in materialization.metadata.items()}
        raise AssertionError(f"{table} was not materialized")


def _comparable(value):
    if isinstance(value, float) and value != value:
        return "NaN"  # NaN != NaN
    if isinstance(value, str) and value.startswith("file:"):
        return re.sub(r"^file:.*?/landing/", "landing/", value)  # copies of a data root compare equal
    return value


@pytest.fixture
def lakehouse(tmp_path, spark) -> Lakehouse:
    return Lakehouse(tmp_path / "data", spark)
