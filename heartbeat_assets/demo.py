"""`heartbeat-demo`: land the sample files, run the `medallion` job, print the gold tables."""

import shutil
import sys
from datetime import datetime

from dagster import DagsterInstance
from deltalake import QueryBuilder

from heartbeat_assets import tables
from heartbeat_assets.simulator import land_file
from resources import LakehouseResource
from resources.lakehouse import PROJECT_ROOT

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


def print_table(name: str, path, limit: int = 20) -> None:
    """Print a Delta table's first rows, read with delta-rs's SQL engine (no Spark)."""
    table = tables.load(path)
    query = QueryBuilder().register("t", table)
    rows = query.execute(f"SELECT * FROM t ORDER BY 1, 2 LIMIT {limit}").read_all()
    columns = [[_text(v) for v in column.to_pylist()] for column in rows.columns]
    widths = [max([len(n), *map(len, c)]) for n, c in zip(rows.column_names, columns, strict=True)]
    print(f"\n{name}: {table.count()} rows (Delta version {table.version()})")
    print("  ".join(n.ljust(w) for n, w in zip(rows.column_names, widths, strict=True)))
    for row in zip(*columns, strict=True):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _text(value) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


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
    for name in GOLD_TABLES:
        print_table(name, lakehouse.table(name))
    width = shutil.get_terminal_size().columns
    print("-" * min(width, 80))
    print("Open the UI with `make ui` (http://127.0.0.1:3000) to see the asset graph and this run.")


if __name__ == "__main__":
    main()
