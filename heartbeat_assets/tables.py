"""Delta tables: how the lakehouse creates, appends to and replaces them, and reads their log.

Delta Lake owns the commits. Spark writes every table (`format("delta")`); a write becomes visible
to readers in one atomic commit, or not at all. Where a micro-batch writes a table from
`foreachBatch` (which Spark runs at least once per batch), the write carries Delta's idempotent-write
options, `txnAppId` (the streaming query's id) and `txnVersion` (the batch id): a batch run again
after a crash finds its commit and is skipped, so each batch is written exactly once.

Each such commit also carries the batch's numbers in its `userMetadata`, and Delta records the rows
it wrote in `operationMetrics`: a run reads them back from the commit history, whichever process or
earlier attempt made the commit.

Reading the log needs no Spark: delta-rs (`deltalake`) gives a table's version, history and row count
(from the statistics of its files), so an idle run starts no JVM.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError
from py4j.protocol import Py4JError, Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from heartbeat_assets.killpoints import kill_point
from resources.storage import delta_rs_options

log = logging.getLogger(__name__)

#: Properties every table is created with. delta-rs, DuckDB and Polars read these tables, so no table
#: feature beyond the basic protocol is enabled (deletion vectors, column mapping, ...).
BASE_PROPERTIES = {"delta.enableDeletionVectors": "false"}


def retention_properties(days: int) -> dict[str, str]:
    """How long a table keeps its history: versions to time-travel to (the log) and the data files
    that older versions need (removed by VACUUM after that)."""
    return {
        "delta.logRetentionDuration": f"interval {days} days",
        "delta.deletedFileRetentionDuration": f"interval {days} days",
    }


def sql_name(path: Path | str) -> str:
    """The table at `path` in Spark SQL: delta.`<path>`."""
    return "delta.`{}`".format(str(path).replace("`", "``"))


def create_table(
    spark: SparkSession,
    path: Path,
    schema: StructType,
    partition_by: Iterable[str] = (),
    properties: dict[str, str] | None = None,
) -> None:
    """Create an empty table at `path` with `schema`, unless one exists there."""
    columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in schema.fields)
    partitioned = f" PARTITIONED BY ({', '.join(partition_by)})" if partition_by else ""
    props = {**BASE_PROPERTIES, **(properties or {})}
    tblproperties = ", ".join(f"'{key}' = '{value}'" for key, value in sorted(props.items()))
    spark.sql(
        f"CREATE TABLE IF NOT EXISTS {sql_name(path)} ({columns}) USING delta{partitioned} "
        f"TBLPROPERTIES ({tblproperties})"
    )


def append(df: DataFrame, path: Path, *, query_id: str, batch_id: int, metadata: dict | None = None) -> None:
    """Append `df` to the table as micro-batch `batch_id` of streaming query `query_id`: skipped if
    that batch was committed before. `metadata` (JSON) goes into the commit's `userMetadata`."""
    writer = (
        df.write.format("delta")
        .mode("append")
        .option("txnAppId", query_id)
        .option("txnVersion", batch_id)
        .option("userMetadata", json.dumps({**(metadata or {}), "query": query_id, "batch": batch_id}))
    )
    commit_idempotent(lambda: writer.save(str(path)), path)
    kill_point(f"write:{table_name(path)}:committed")


def append_split(
    batch: DataFrame,
    *,
    query_id: str,
    batch_id: int,
    rejected: Column,
    kept_to: tuple[Path, list[str]],
    rejected_to: tuple[Path, list[str]],
    numbers: dict[str, Column] | None = None,
) -> None:
    """Append micro-batch `batch_id` to a table and its quarantine: the rows where `rejected` holds to
    `rejected_to` (folder, columns), the others to `kept_to`.

    One Spark job first computes `numbers` (aggregates over the batch, e.g. quality counts) and counts
    the rejected rows: the numbers go into the table's commit, and the quarantine is written only when
    there are rejected rows. The batch is read up to three times: cache it.
    """
    aggregates = {"_rejected": F.count_if(rejected), **(numbers or {})}
    computed = batch.agg(*[column.alias(name) for name, column in aggregates.items()]).first().asDict()
    table, columns = kept_to
    metadata = {name: value for name, value in computed.items() if name != "_rejected" and value is not None}
    append(
        batch.where(~rejected).select(*columns),
        table,
        query_id=query_id,
        batch_id=batch_id,
        metadata=metadata,
    )
    if computed["_rejected"]:
        quarantine, quarantine_columns = rejected_to
        append(
            batch.where(rejected).select(*quarantine_columns),
            quarantine,
            query_id=query_id,
            batch_id=batch_id,
        )


#: Delta's conflicts between two writers of one table: a commit landed while this write ran that
#: changes what the write read (the batch's `txnVersion`, the rows a MERGE matched). Conditions, or
#: their prefixes.
CONFLICTS = (
    "DELTA_CONCURRENT_TRANSACTION",
    "DELTA_CONCURRENT_APPEND",
    "DELTA_CONCURRENT_DELETE_READ",
    "DELTA_CONCURRENT_DELETE_DELETE",
)


def commit_idempotent(write: Callable[[], None], path: Path) -> None:
    """Run `write`, a write whose second run leaves the table as its first did (an append of one
    streaming batch, a MERGE that keeps the newest row, a replacement of every row); after a conflict
    with another writer, once more.

    The other writer is this write's own double: a run killed while its batch ran on a Spark Connect
    server leaves that batch's writer running there, and the next run, which stops the old query,
    writes the same batch while the old writer's commit lands. Run again, the write reads that commit
    (the batch's `txnVersion`, the MERGE's rows) and has nothing left to do, or writes what is missing;
    a replacement replaces the double's rows.
    """
    try:
        write()
    except (PySparkException, Py4JJavaError) as exc:
        condition = error_condition(exc) or ""
        if not condition.startswith(CONFLICTS):
            raise
        log.warning("%s: %s, another writer committed first; writing again", table_name(path), condition)
        write()


def error_condition(exc: Exception) -> str | None:
    """Spark's error condition of `exc` (such as DELTA_CONCURRENT_TRANSACTION), through Spark Connect
    or from a local driver's JVM."""
    if isinstance(exc, PySparkException):
        return exc.getCondition()
    try:
        return exc.java_exception.getErrorClass()
    except Py4JError:  # not a SparkThrowable
        return None


def overwrite(df: DataFrame, path: Path, metadata: dict) -> None:
    """Replace the table's rows with `df` in one commit; `metadata` goes into its `userMetadata`.
    A replacement that conflicts with another (a killed run's, finished by a Connect server) is made
    again: the newest build replaces the older one."""
    writer = df.write.format("delta").mode("overwrite").option("userMetadata", json.dumps(metadata))
    commit_idempotent(lambda: writer.save(str(path)), path)
    kill_point(f"write:{table_name(path)}:committed")


def table_name(path: Path) -> str:
    """`<layer>/<table>` of a table's folder."""
    return f"{path.parent.name}/{path.name}"


# The log, read without Spark.


def load(path: Path, version: int | None = None) -> DeltaTable | None:
    """The table at `path` (at `version`, else the latest), or None if there is none."""
    try:
        return DeltaTable(str(path), version=version, storage_options=delta_rs_options(path) or None)
    except TableNotFoundError:
        return None


def identity(table: DeltaTable | None) -> str | None:
    """`<table id>@<version>`: changes with every commit, and when a table is made anew."""
    return None if table is None else f"{table.metadata().id}@{table.version()}"


def row_count(table: DeltaTable) -> int:
    """The table's rows, from its files' statistics (Delta records each file's row count)."""
    return table.count()


def last_commit(table: DeltaTable) -> dict:
    """The newest commit's information, with its `userMetadata` parsed (a dict; empty if none)."""
    (commit,) = table.history(1)
    return {**commit, "userMetadata": _parsed(commit.get("userMetadata"))}


def batch_commits(table: DeltaTable, query_id: str, batch_ids: list[int]) -> list[dict]:
    """The commits micro-batches `batch_ids` of query `query_id` made to the table, by this run or by
    an attempt that crashed before its batch was done, with their `userMetadata` parsed.

    A query commits at most once per batch to a table, and while a run holds the lakehouse only its
    own writes commit to it (a few before the query: the table's creation, rejected files), so the
    batches' commits are among the newest.
    """
    wanted, found = set(batch_ids), {}
    for commit in table.history(len(wanted) + 16):
        meta, params = _parsed(commit.get("userMetadata")), commit.get("operationParameters") or {}
        if meta.get("query") == query_id and meta.get("batch") in wanted:  # written by `append`
            found[meta["batch"]] = {**commit, "userMetadata": meta}
        elif params.get("queryId") == query_id and int(params.get("epochId", -1)) in wanted:  # Delta's sink
            found[int(params["epochId"])] = {**commit, "userMetadata": meta}
    return [found[batch] for batch in sorted(found)]


def _parsed(user_metadata: str | None) -> dict:
    if not user_metadata:
        return {}
    try:
        parsed = json.loads(user_metadata)
    except ValueError:  # written by someone else
        return {}
    return parsed if isinstance(parsed, dict) else {}
