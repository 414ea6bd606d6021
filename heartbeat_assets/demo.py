"""`heartbeat-demo`: land the sample files, run the `medallion` job, print the gold tables."""

import shutil
import sys

from dagster import DagsterInstance

from heartbeat_assets.simulator import land_file
from resources import LakehouseResource
from resources.lakehouse import PROJECT_ROOT
from resources.spark import build_spark_session

SAMPLES = PROJECT_ROOT / "data" / "samples"
GOLD_TABLES = ["gold/heartrate_by_patient", "gold/daily_patient_avg", "gold/device_signal_loss"]


def land_samples(lakehouse: LakehouseResource) -> int:
    """Copy the sample files into the landing folders (atomically); files already there are skipped."""
    landed = 0
    for kind, folder in (
        ("recordings", lakehouse.recordings_landing),
        ("patients", lakehouse.patients_landing),
    ):
        for sample in sorted((SAMPLES / kind).iterdir()):
            if not (folder / sample.name).exists():
                land_file(folder, sample.name, sample.read_bytes())
                landed += 1
    return landed


def main() -> None:
    from heartbeat_assets import defs

    lakehouse = LakehouseResource()
    lakehouse.ensure_layout()
    print(f"Data root: {lakehouse.root}")
    print(f"Landed {land_samples(lakehouse)} sample file(s).")
    instance = DagsterInstance.get()
    result = defs.resolve_job_def("medallion").execute_in_process(instance=instance, raise_on_error=False)
    if not result.success:
        sys.exit("The medallion run failed; see the log above (or the run in the Dagster UI).")
    print(f"Run {result.run_id} succeeded.")
    spark = build_spark_session(
        {"spark.master": "local[1]", "spark.ui.enabled": "false", "spark.sql.session.timeZone": "UTC"}
    )
    spark.sparkContext.setLogLevel("ERROR")
    for name in GOLD_TABLES:
        table = spark.read.parquet(str(lakehouse.table(name)))
        print(f"\n{name}: {table.count()} rows")
        table.orderBy(*table.columns[:2]).show(20, truncate=False)
    spark.stop()
    width = shutil.get_terminal_size().columns
    print("-" * min(width, 80))
    print("Open the UI with `make ui` (http://127.0.0.1:3000) to see the asset graph and this run.")


if __name__ == "__main__":
    main()
