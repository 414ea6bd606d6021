"""How fast Spark parses landed recordings, with and without bronze's accounting of every line.

    python -m benchmarks.parse_floor LANDING_FOLDER

Times, in one session and after a first run of each that warms it, two parses of the same files to
Spark's no-op sink (nothing written): Spark's JSON reader with the recording's schema given (JSON
Lines files line by line, files of one JSON array in multiLine mode), which is the least any Spark
pipeline spends to read them; and bronze's own parse (`bronze.parse_recordings`), which also keeps
each element's text, file, line and array index, tells why a malformed one is malformed, and rescues
unknown fields. Prints the seconds of each as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from benchmarks.run import is_json_array
from heartbeat_assets import bronze

ROUNDS = 2


def json_reader(spark: SparkSession, lines: list[str], arrays: list[str]) -> DataFrame:
    schema = bronze.RECORDING_SCHEMA
    parts = [spark.read.schema(schema).json(lines)] if lines else []
    if arrays:
        parts.append(spark.read.schema(schema).option("multiLine", True).json(arrays))
    return parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])


def bronze_parse(spark: SparkSession, files: list[str]) -> DataFrame:
    whole = spark.read.format("text").option("wholetext", True).load(files)
    return bronze.parse_recordings(
        whole.select(
            "value",
            F.col("_metadata.file_path").alias("source_file"),
            F.col("_metadata.file_modification_time").alias("source_modified_at"),
        )
    )


def timed(frame: DataFrame) -> float:
    started = time.perf_counter()
    frame.write.format("noop").mode("overwrite").save()
    return time.perf_counter() - started


def main(landing: Path) -> dict[str, float]:
    files = sorted(
        str(path) for path in landing.iterdir() if path.is_file() and not path.name.startswith((".", "_"))
    )
    arrays, lines = [], []
    for path in files:
        (arrays if is_json_array(Path(path)) else lines).append(path)
    spark = (
        SparkSession.builder.master("local[*]")
        .config("spark.driver.memory", "768m")  # as the pipeline's driver
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        found = {}
        for _ in range(ROUNDS):  # the last round's times: the first warms the session
            found = {
                "json_reader_s": round(timed(json_reader(spark, lines, arrays)), 2),
                "bronze_parse_s": round(timed(bronze_parse(spark, files)), 2),
            }
        return found
    finally:
        spark.stop()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
