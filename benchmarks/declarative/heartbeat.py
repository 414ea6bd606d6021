"""The baseline's pipeline as Spark Declarative Pipelines: the benchmark's peer (`spark-pipelines run`).

The semantics of `benchmarks/baseline.py`, whose silver and gold transformations it runs, written as
a user of SDP would: bronze a streaming table of the landed JSON (schema inferred; files of one JSON
array each read in multiLine mode from their own folder, in the same query), silver a streaming table
joined with the patients, gold a materialized view of the average heart rate per patient. Tables are
Parquet in the pipeline's warehouse. `benchmarks` must be importable (PYTHONPATH).
"""

from pathlib import Path

from pyspark import pipelines as dp
from pyspark.sql import DataFrame, SparkSession

from benchmarks.baseline import RECORDINGS_GLOB, by_patient, silver_rows

spark = SparkSession.active()
LANDING = Path(spark.conf.get("heartbeat.landing"))
ARRAYS = LANDING / "recordings_arrays"


@dp.materialized_view
def dim_patient() -> DataFrame:
    return spark.read.format("csv").options(header="true", inferSchema="true").load(str(LANDING / "patients"))


@dp.table
def fact_heartbeat_bronze() -> DataFrame:
    # One flow over both folders, as the baseline's one query: two append flows into one Parquet
    # table race on its file sink's log ("Race while writing batch 0"), and a retried flow lost rows.
    recordings = spark.readStream.option("pathGlobFilter", RECORDINGS_GLOB).json(str(LANDING / "recordings"))
    if ARRAYS.exists():
        arrays = spark.readStream.option("multiLine", "true").option("pathGlobFilter", RECORDINGS_GLOB)
        recordings = recordings.unionByName(arrays.json(str(ARRAYS)))
    return recordings


@dp.table
def fact_heartbeat_silver() -> DataFrame:
    return silver_rows(spark.readStream.table("fact_heartbeat_bronze"), spark.read.table("dim_patient"))


@dp.materialized_view
def fact_heartbeat_by_patient_gold() -> DataFrame:
    return by_patient(spark.read.table("fact_heartbeat_silver"))
