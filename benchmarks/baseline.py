"""The notebooks' way, as the baseline the benchmark compares with.

Three separate availableNow queries as in the seed notebook `000`: bronze reads the landed JSON with
schema inference and `maxFilesPerTrigger=1` into Parquet, silver joins bronze with the patient CSV
into Parquet, gold keeps a complete-mode average per patient. Its known bugs (`time / 1e6`, the inner
join, `multiLine` on JSON-lines files) are left out so that it reads the same rows as the pipeline:
it reads gzipped files too, and files of one JSON array each (which the benchmark copies into
`landing/recordings_arrays/`) in multiLine mode.

    python -m benchmarks.baseline DATA_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

RECORDINGS_GLOB = "{*.json,*.json.gz}"


def silver_rows(bronze: DataFrame, patients: DataFrame) -> DataFrame:
    """The notebooks' silver: recordings with the patient's name (left join), typed."""
    return bronze.join(patients, "mrn", "left").select(
        F.col("device_id").cast("int"),
        F.col("mrn").cast("long"),
        F.col("time").cast("timestamp").alias("datetime"),
        F.col("heartrate").cast("double"),
        F.col("name").alias("patient_name"),
    )


def by_patient(silver: DataFrame) -> DataFrame:
    """The notebooks' gold: the average heart rate (rounded up) and the recordings of each patient."""
    return silver.groupBy("patient_name").agg(
        F.ceil(F.avg("heartrate")).alias("avg_heartrate"), F.count("device_id").alias("count")
    )


def run(data_dir: Path) -> None:
    spark = (
        SparkSession.builder.master("local[*]")
        .appName("notebook-baseline")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.streaming.schemaInference", "true")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    out = data_dir / "baseline"
    patients = (
        spark.read.format("csv")
        .options(header="true", inferSchema=True)
        .load(str(data_dir / "landing" / "patients"))
    )
    patients.write.mode("overwrite").parquet(str(out / "dim_patient"))
    patients = spark.read.parquet(str(out / "dim_patient"))

    tracker = (
        spark.readStream.option("maxFilesPerTrigger", 1)
        .option("pathGlobFilter", RECORDINGS_GLOB)
        .json(str(data_dir / "landing" / "recordings"))
    )
    arrays = data_dir / "landing" / "recordings_arrays"
    if arrays.exists():  # files of one JSON array each: the JSON reader's multiLine mode
        tracker = tracker.unionByName(
            spark.readStream.option("maxFilesPerTrigger", 1)
            .option("multiLine", "true")
            .option("pathGlobFilter", RECORDINGS_GLOB)
            .json(str(arrays))
        )
    bronze = out / "fact_heartbeat_bronze"
    (
        tracker.writeStream.format("parquet")
        .outputMode("append")
        .trigger(availableNow=True)
        .option("checkpointLocation", str(out / "_checkpoints" / "bronze"))
        .start(str(bronze))
        .awaitTermination()
    )

    silver = out / "fact_heartbeat_silver"
    (
        silver_rows(spark.readStream.format("parquet").load(str(bronze)), patients)
        .writeStream.format("parquet")
        .outputMode("append")
        .trigger(availableNow=True)
        .option("checkpointLocation", str(out / "_checkpoints" / "silver"))
        .start(str(silver))
        .awaitTermination()
    )

    (
        by_patient(spark.readStream.format("parquet").load(str(silver)))
        .writeStream.outputMode("complete")
        .queryName("fact_heartbeat_by_patient_gold")
        .format("memory")
        .trigger(availableNow=True)
        .option("checkpointLocation", str(out / "_checkpoints" / "gold"))
        .start()
        .awaitTermination()
    )
    total = spark.sql("SELECT sum(count) AS n FROM fact_heartbeat_by_patient_gold").first()["n"]
    print(f"baseline gold rows counted: {total}")
    spark.stop()


if __name__ == "__main__":
    run(Path(sys.argv[1]))
