"""Writing Parquet tables from inside `foreachBatch`, exactly once.

`foreachBatch` is at-least-once: after a crash Spark re-runs the last uncommitted micro-batch with the
same input. Both writers here are idempotent in the batch id, which makes the end result exactly-once:

* `append_batch` names every file it adds `part-b<batch id>-<n>.parquet`; a re-run of the batch first
  removes the files of the failed attempt, then moves its own into place.
* `replace_table` keeps a table as a single Parquet file and swaps it with one atomic rename, so a
  reader sees the old table or the new one, never a missing, empty or half-written one.

Spark writes into a `_staging` folder inside the table (readers skip names starting with `_` or `.`),
then the files are renamed into place, which is atomic on a local or POSIX file system.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pyspark.sql import Column, DataFrame, Observation
from pyspark.sql import functions as F
from pyspark.sql.types import DateType

from heartbeat_assets.killpoints import kill_point

TABLE_FILE = "part-00000.parquet"
LINEAGE_FILE = "_lineage.json"


def _is_data_file(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def data_files(table: Path) -> list[Path]:
    """The Parquet files a reader of `table` sees (partition folders included)."""
    if not table.exists():
        return []
    found = []
    for folder, dirs, files in os.walk(table):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        found.extend(Path(folder) / f for f in files if _is_data_file(f))
    return sorted(found)


def _stage(
    df: DataFrame, table: Path, name: str, partition_by: list[str] | None, single_file: bool
) -> tuple[Path, int]:
    """Write `df` to `<table>/_staging/<name>`; the folder and the number of rows written.

    The rows are counted while they are written (an observed metric), not by a second job.
    """
    staging = table / "_staging" / name
    shutil.rmtree(staging, ignore_errors=True)
    written = Observation()
    df = df.observe(written, F.count(F.lit(1)).alias("rows"))
    writer = (df.coalesce(1) if single_file else df).write.mode("overwrite")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.parquet(str(staging))
    return staging, written.get["rows"]


def append_batch(
    df: DataFrame,
    table: Path,
    batch_id: int,
    partition_by: list[str] | None = None,
    known_empty: bool = False,
) -> int:
    """Append `df` to `table` as the output of micro-batch `batch_id`; return the rows written.

    Safe to call again for the same batch id: the earlier attempt's files are replaced. With
    `known_empty` (`df` was counted empty as another write read the same rows) no Spark job runs.
    """
    return append_rows(df, table, f"b{batch_id:012d}", partition_by, known_empty)


def append_split(
    batch: DataFrame,
    batch_id: int,
    rejected: Column,
    kept_to: tuple[Path, list[str]],
    rejected_to: tuple[Path, list[str]],
    partition_by: list[str] | None = None,
    observe: tuple[Column, ...] = (),
) -> tuple[int, int, dict]:
    """Append the rows of micro-batch `batch_id` to a table and its quarantine: those where
    `rejected` holds to `rejected_to` (folder, columns), the others to `kept_to`. Returns the rows
    written to each, and the values of the aggregates `observe`, computed over `batch` as it is read.

    The first write also counts the rejected rows, so the quarantine's write (a second Spark job,
    which reads `batch` again: cache it) runs only when there are some.
    """
    seen = Observation()
    counted = batch.observe(seen, F.count_if(rejected).alias("_rejected"), *observe)
    table, columns = kept_to
    kept = append_batch(counted.where(~rejected).select(*columns), table, batch_id, partition_by)
    metrics = seen.get
    quarantine, quarantine_columns = rejected_to
    quarantined = append_batch(
        batch.where(rejected).select(*quarantine_columns),
        quarantine,
        batch_id,
        known_empty=metrics["_rejected"] == 0,
    )
    return kept, quarantined, metrics


def append_rows(
    df: DataFrame, table: Path, key: str, partition_by: list[str] | None = None, known_empty: bool = False
) -> int:
    """Append `df` to `table` under `key`, replacing whatever an earlier call with that key wrote."""
    name = _name(table)
    prefix = f"part-{key}-"
    if known_empty:  # what an earlier attempt staged or moved is removed all the same
        shutil.rmtree(table / "_staging" / f"rows-{key}", ignore_errors=True)
        _remove_files(table, prefix)
        return 0
    staging, rows = _stage(df, table, f"rows-{key}", partition_by, single_file=False)
    kill_point(f"append:{name}:staged")
    _remove_files(table, prefix)
    if rows:
        # Numbered across partition folders: names stay unique within the table.
        for n, source in enumerate(data_files(staging)):
            target = table / source.parent.relative_to(staging) / f"{prefix}{n:05d}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            kill_point(f"append:{name}:moving")
        _remove_empty_placeholder(table)
    shutil.rmtree(staging, ignore_errors=True)
    return rows


def _remove_files(table: Path, prefix: str) -> None:
    for old in data_files(table):
        if old.name.startswith(prefix):
            old.unlink()


EMPTY_FILE = "part-empty.parquet"
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"


def ensure_exists(df: DataFrame, table: Path, partition_by: list[str] | None = None) -> None:
    """Give a table that has no file yet an empty one with its schema, so readers find the table.

    `df` only provides the schema (a streaming DataFrame will do). For a partitioned table the empty
    file sits in a placeholder partition whose value gives the column its type (a date column would
    read as `void` from a null partition); it is removed when the first rows arrive.
    """
    if data_files(table):
        return
    spark = df.sparkSession
    empty = spark.createDataFrame([], df.schema).drop(*(partition_by or []))
    staging, _ = _stage(empty, table, "empty", None, single_file=True)
    types = {field.name: field.dataType for field in df.schema.fields}
    folder = table.joinpath(
        *(
            f"{c}={'1970-01-01' if isinstance(types[c], DateType) else NULL_PARTITION}"
            for c in partition_by or []
        )
    )
    folder.mkdir(parents=True, exist_ok=True)
    (staged_file,) = data_files(staging)
    os.replace(staged_file, folder / EMPTY_FILE)
    shutil.rmtree(staging, ignore_errors=True)


def _remove_empty_placeholder(table: Path) -> None:
    for placeholder in [p for p in data_files(table) if p.name == EMPTY_FILE]:
        placeholder.unlink()
        folder = placeholder.parent
        while folder != table and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def replace_table(df: DataFrame, table: Path, lineage: dict) -> int:
    """Atomically replace `table` with `df` as one Parquet file; record what it was built from."""
    staging, rows = _stage(df, table, "replace", None, single_file=True)
    (staged_file,) = data_files(staging)
    kill_point(f"replace:{_name(table)}:staged")
    os.replace(staged_file, table / TABLE_FILE)
    kill_point(f"replace:{_name(table)}:renamed")
    shutil.rmtree(staging, ignore_errors=True)
    _remove_empty_placeholder(table)
    _write_json_atomically(table / LINEAGE_FILE, {**lineage, "rows": rows})
    return rows


def _name(table: Path) -> str:
    return f"{table.parent.name}/{table.name}"


def read_lineage(table: Path) -> dict | None:
    """What the current version of a replaced table was built from, or None if it was never built."""
    try:
        return json.loads((table / LINEAGE_FILE).read_text())
    except FileNotFoundError:
        return None


def _write_json_atomically(path: Path, payload: dict) -> None:
    write_atomically(path, json.dumps(payload, sort_keys=True))


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` by a rename: readers see the old content or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
