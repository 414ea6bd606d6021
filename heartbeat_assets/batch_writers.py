"""What Spark runs for each micro-batch of a `foreachBatch` query, and nothing else.

Where one micro-batch writes two tables (a table and its quarantine) or merges into one, the
streaming query hands each batch to a writer made here. With a local driver the writer runs in the
run's own process; through Spark Connect the server runs it in a Python worker it starts for the
query, which unpickles the writer and imports what it refers to. So this module imports neither
Dagster nor the asset modules: a worker imports pyspark, Delta's log reader and this module only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from heartbeat_assets import tables
from heartbeat_assets.killpoints import kill_point

#: Writes micro-batch `batch_id` of the query with id `query_id`.
BatchWriter = Callable[[DataFrame, int, str], None]


def foreach_batch(write_batch: BatchWriter, name: str) -> Callable[[DataFrame, int], None]:
    """The function for `foreachBatch`: `write_batch(batch, batch_id, query_id)`, then the
    `batch:<name>:written` kill point (written, but Spark has not committed the batch)."""
    query_name = name.replace("/", "_")

    def on_batch(batch: DataFrame, batch_id: int) -> None:
        write_batch(batch, batch_id, micro_batch_query_id(batch, query_name))
        kill_point(f"batch:{name}:written")

    return on_batch


def micro_batch_query_id(batch: DataFrame, query_name: str) -> str:
    """The id of the streaming query whose micro-batch `batch` is: the same across restarts from one
    checkpoint, and new with a new checkpoint (so a rebuilt table's batches are not taken for old ones)."""
    session = batch.sparkSession
    context = getattr(session, "_sc", None)
    if context is not None:  # the micro-batch's thread in the driver knows its query
        return context.getLocalProperty("sql.streaming.queryId")
    # Spark Connect: the writer runs in a worker attached to the query's session on the server.
    (query,) = [q for q in session.streams.active if q.name == query_name]
    return query.id


def split_writer(
    *,
    kept_to: tuple[Path, list[str]],
    rejected_to: tuple[Path, list[str]],
    numbers: dict[str, Column],
    raw_of_rejected_only: bool = False,
) -> BatchWriter:
    """Writes each micro-batch to a table and its quarantine (`tables.append_split`): the rows with
    a `reason` to the quarantine. The batch is computed once, into the cache. With
    `raw_of_rejected_only` only rejected rows keep their `raw` text: the table has no use for it, and
    it is most of the bytes."""

    def write_batch(batch: DataFrame, batch_id: int, query_id: str) -> None:
        if raw_of_rejected_only:
            batch = batch.withColumn("raw", F.when(F.col("reason").isNotNull(), F.col("raw")))
        batch = batch.persist()
        try:
            tables.append_split(
                batch, query_id=query_id, batch_id=batch_id, rejected=F.col("reason").isNotNull(),
                kept_to=kept_to, rejected_to=rejected_to, numbers=numbers,
            )  # fmt: skip
        finally:
            batch.unpersist()

    return write_batch


#: Columns of silver/patients: the patient, and the bronze row the name comes from.
PATIENT_COLUMNS = ["mrn", "name", "source_modified_at", "source_file", "source_line"]


def current_patients(bronze_patients: DataFrame) -> DataFrame:
    """One row per mrn with its latest name: the newest file (modification time, then name) wins,
    and within a file the last line. Rows without a numeric mrn or a name are left out. The row's
    source (`source_modified_at`, `source_file`, `source_line`) is kept: it orders the rows."""
    valid = bronze_patients.where(
        F.col("mrn").rlike("^[0-9]{1,18}$") & (F.col("name") != "") & F.col("_extra").isNull()
    )
    newest = F.max_by(F.struct(*PATIENT_COLUMNS[1:]), F.struct(*PATIENT_COLUMNS[2:]))
    return (
        valid.groupBy(F.col("mrn").cast("bigint").alias("mrn"))
        .agg(newest.alias("_newest"))
        .select("mrn", "_newest.*")
    )


#: A patient row replaces the dimension's when it comes from a newer source (the order of
#: `current_patients`): merging batch after batch gives the newest row over all of them.
MERGE_NEWEST = (
    "MERGE INTO {table} AS t USING {batch} AS s ON t.mrn = s.mrn "
    "WHEN MATCHED AND struct(s.source_modified_at, s.source_file, s.source_line) "
    "> struct(t.source_modified_at, t.source_file, t.source_line) THEN UPDATE SET * "
    "WHEN NOT MATCHED THEN INSERT *"
)


def merge_patients(batch: DataFrame, table: Path, query_id: str, batch_id: int) -> None:
    """Fold a micro-batch of bronze patient rows into the dimension with one MERGE (idempotent: a
    batch merged again changes nothing). Its commit records the batch, like `tables.append`."""
    session = batch.sparkSession
    current_patients(batch).createOrReplaceTempView("patients_batch")
    # SQL's MERGE takes no write options: the commit's userMetadata is a session setting, set for
    # this statement only (the session's one writer at a time is this query's batch).
    session.conf.set(
        "spark.databricks.delta.commitInfo.userMetadata", json.dumps({"query": query_id, "batch": batch_id})
    )
    try:
        merge = MERGE_NEWEST.format(table=tables.sql_name(table), batch="patients_batch")
        tables.commit_idempotent(lambda: session.sql(merge), table)
    finally:
        session.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
    kill_point("write:silver/patients:committed")


def patients_merger(table: Path) -> BatchWriter:
    """Merges each micro-batch of bronze patient rows into the dimension at `table`."""
    return lambda batch, batch_id, query_id: merge_patients(batch, table, query_id, batch_id)
