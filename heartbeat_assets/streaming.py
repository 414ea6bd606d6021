"""The one runner behind every layer: an availableNow streaming query with its own checkpoint.

Each layer defines a pure DataFrame transformation and where its rows go: a Delta table through
Delta's own streaming sink, or a `foreachBatch` writer where one micro-batch writes two tables (or
merges). This module starts the query, waits for it, and sums the query's progress and the Delta
commits of its micro-batches into numbers the Dagster assets report.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetExecutionContext,
    AssetKey,
    Failure,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as CheckStatus
from py4j.protocol import Py4JJavaError
from pyspark.errors import AnalysisException, StreamingQueryException
from pyspark.sql import DataFrame, SparkSession

from heartbeat_assets import checks, tables
from heartbeat_assets.batch_writers import BatchWriter, foreach_batch
from heartbeat_assets.killpoints import watch_writes
from resources import storage


@dataclass
class QueryReport:
    """What one availableNow run of a streaming query did, summed over its micro-batches."""

    name: str
    query_id: str = ""
    batch_ids: list[int] = field(default_factory=list)
    input_rows: int = 0
    duration_s: float = 0.0
    #: Numbers the batches recorded in their commits' `userMetadata`, summed over the batches.
    counts: dict[str, int] = field(default_factory=dict)
    #: The same under `max:<name>` keys, combined with max.
    maxima: dict[str, float] = field(default_factory=dict)
    #: Per table written: Delta's operation metrics of the batches' commits, summed.
    operations: dict[str, dict[str, int]] = field(default_factory=dict)
    state_metrics: dict[str, int] = field(default_factory=dict)
    #: Spark's own time per phase of its micro-batches (queryPlanning, addBatch, walCommit, ...).
    phase_ms: dict[str, int] = field(default_factory=dict)

    @property
    def batches(self) -> int:
        return len(self.batch_ids)

    def count(self, key: str) -> int:
        return self.counts.get(key, 0)

    def rows_written(self, table: str) -> int:
        """Rows the batches committed to `table` (Delta's `numOutputRows`)."""
        return self.operations.get(table, {}).get("numOutputRows", 0)

    def metadata(self) -> dict[str, float | int]:
        """Numeric metadata for Dagster, so the UI can plot it across runs."""
        return {
            "micro_batches": self.batches,
            "input_rows": self.input_rows,
            "query_duration_s": round(self.duration_s, 3),
            **{f"spark_{phase}_ms": ms for phase, ms in sorted(self.phase_ms.items())},
            **self.counts,
        }


def run_available_now(
    df: DataFrame,
    *,
    name: str,
    checkpoint: Path,
    writes: dict[str, Path],
    write_batch: BatchWriter | None = None,
    output_mode: str = "append",
) -> QueryReport:
    """Run `df` with `trigger(availableNow=True)` until it has consumed all available input.

    Without `write_batch` the rows go to the one table of `writes` ({table name: path}) through
    Delta's streaming sink. With it, `write_batch(batch_df, batch_id, query_id)` writes each
    micro-batch to the tables of `writes`. Either way the report sums the Delta commits of this
    run's batches to those tables. The query name is `name` with `/` replaced.
    """
    report = QueryReport(name=name)
    query_name = name.replace("/", "_")
    writer = df.writeStream.queryName(query_name).outputMode(output_mode).trigger(availableNow=True)
    writer = writer.option("checkpointLocation", str(checkpoint))
    if write_batch is None:
        ((_, sink),) = writes.items()
        writer = writer.format("delta")
    else:
        writer = writer.foreachBatch(foreach_batch(write_batch, name))
    started = time.monotonic()
    try:
        with watch_writes(writes):
            query = writer.start(str(sink)) if write_batch is None else writer.start()
            query.awaitTermination()
    except (StreamingQueryException, AnalysisException, Py4JJavaError) as exc:
        raise _query_failure(name, checkpoint, exc) from exc
    report.duration_s = time.monotonic() - started
    report.query_id = query.id
    for progress in query.recentProgress:
        if "addBatch" not in (progress.durationMs or {}):  # no data, so no batch was run
            continue
        report.batch_ids.append(progress.batchId)
        report.input_rows += progress.numInputRows
        for phase, ms in (progress.durationMs or {}).items():
            report.phase_ms[phase] = report.phase_ms.get(phase, 0) + int(ms)
        for operator in progress.stateOperators:
            for key, value in (operator.customMetrics or {}).items():
                if key.startswith("numDropped"):
                    report.state_metrics[key] = report.state_metrics.get(key, 0) + int(value)
    for table, path in writes.items():
        _add_commits(report, table, tables.batch_commits(tables.load(path), query.id, report.batch_ids))
    return report


def _add_commits(report: QueryReport, table: str, commits: list[dict]) -> None:
    operations = report.operations.setdefault(table, {})
    for commit in commits:
        for key, value in (commit.get("operationMetrics") or {}).items():
            operations[key] = operations.get(key, 0) + int(value)
        for key, value in commit["userMetadata"].items():
            if key in ("query", "batch"):
                continue
            if key.startswith("max:"):
                metric = key.removeprefix("max:")
                report.maxima[metric] = max(float(value), report.maxima.get(metric, float(value)))
            else:
                report.counts[key] = report.counts.get(key, 0) + int(value)


# Errors Spark raises when a checkpoint was written by a different query (another plan, state schema
# or set of sources), e.g. after an upgrade of this project.
CHECKPOINT_MISMATCH = re.compile(
    r"STATE_STORE|STATEFUL_OPERATOR|state schema|sources in the checkpoint|INCOMPATIBLE|"
    r"checkpoint location|STREAMING_QUERY_EVOLUTION|metadata file",
    re.IGNORECASE,
)


def _query_failure(name: str, checkpoint: Path, exc: BaseException) -> Failure:
    first = _first_line(exc)
    layer = name.split("/")[0]
    if CHECKPOINT_MISMATCH.search(str(exc)):
        return Failure(
            f"{name}: its checkpoint at {checkpoint} does not match the query any more ({first}). "
            f"Rebuild the {layer} layer and what depends on it with the `full_refresh_{layer}` job "
            f"(or delete that checkpoint folder and the table)."
        )
    return Failure(
        f"The streaming query of {name} failed: {first}. Checkpoint: {checkpoint}. "
        "Fix the cause and run again; processing resumes from the last committed micro-batch."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class InputWatch:
    """Tells, without Spark, whether a query's inputs changed since its last complete run.

    The mark covers what the query reads: the files of its landing folders, the identity (table id and
    version) of the Delta tables it reads, and its settings. It is stored beside the checkpoint only
    after the query completed, so a crashed or failed run is never skipped after. Landing folders
    are marked by the names of their files, not times: a file renamed in just after the mark was
    taken may leave its folder's mtime as it was (file systems keep times at a coarse tick).
    """

    FILE = "_input_mark"

    def __init__(
        self,
        checkpoint: Path,
        *,
        landing: list[Path] = (),
        tables_read: list[Path] = (),
        settings: object = None,
    ):
        self.path = checkpoint / self.FILE
        stamps = [repr(settings)]
        for folder in landing:
            names = sorted(e.name for e in storage.list_files(folder) if not e.name.startswith("."))
            stamps.append(f"{folder}: {names}")
        stamps.extend(f"{path}: {tables.identity(tables.load(path))}" for path in tables_read)
        self.mark = hashlib.sha256("\n".join(stamps).encode()).hexdigest()

    @property
    def unchanged(self) -> bool:
        try:
            return self.path.read_text() == self.mark
        except FileNotFoundError:
            return False

    def record(self) -> None:
        """Remember the inputs as seen before the query ran (call after it completed)."""
        storage.write_text_atomic(self.path, self.mark)


def unchanged_results(
    context: AssetExecutionContext,
    watch: InputWatch,
    keys: list[AssetKey],
    per_run_checks: dict[str, AssetCheckResult] | None = None,
) -> list | None:
    """What a step yields when its query can be skipped, or None when it must run.

    Skipped when the inputs are unchanged since the query's last complete run and every check of the
    step has an earlier evaluation: the tables are as that run left them, so each materialization
    keeps its row count and each check carries over its last verdict (pass or fail, same severity),
    except `per_run_checks`, by name: checks about what a run added, given their result for nothing.
    """
    per_run_checks = per_run_checks or {}
    if not watch.unchanged:
        return None
    check_keys = [key for key in context.selected_asset_check_keys if key.asset_key in keys]
    latest = {}
    for key in check_keys:
        done = context.instance.event_log_storage.get_asset_check_execution_history(
            key,
            limit=1,
            status={CheckStatus.SUCCEEDED, CheckStatus.FAILED},
        )
        if not done or not isinstance(done[0].evaluation, AssetCheckEvaluation):
            return None
        latest[key] = done[0]
    results: list = []
    for key in keys:
        previous = _latest_materialization(context, key)
        kept = {name: previous[name] for name in ("dagster/row_count", "delta_version") if name in previous}
        results.append(
            MaterializeResult(asset_key=key, metadata={"input_unchanged": True, "rows_added": 0, **kept})
        )
    for key in check_keys:
        if key.name in per_run_checks:
            results.append(per_run_checks[key.name])
            continue
        record = latest[key]
        results.append(
            AssetCheckResult(
                asset_key=key.asset_key,
                check_name=key.name,
                passed=record.evaluation.passed,
                severity=record.evaluation.severity,
                metadata={
                    **record.evaluation.metadata,
                    "input_unchanged": True,
                    "evaluated_in_run": record.run_id,
                },
            )
        )
    return results


LAYERS = ("bronze", "silver", "gold")
#: Run tag of the full-refresh jobs: the layer from which tables are rebuilt from scratch.
FULL_REFRESH_TAG = "heartbeat/full_refresh"


def start_fresh(context: AssetExecutionContext, lakehouse, names: list[str]) -> bool:
    """Forget what the queries writing `names` have processed (their checkpoints) if this run is a
    full refresh of their layer or one upstream; say whether it is. The caller empties the tables."""
    layer = context.run.tags.get(FULL_REFRESH_TAG)
    if layer is None:
        return False
    if layer not in LAYERS:
        raise Failure(f"Run tag {FULL_REFRESH_TAG}={layer!r} is not a layer; use one of {', '.join(LAYERS)}.")
    if LAYERS.index(names[0].split("/")[0]) < LAYERS.index(layer):
        return False
    for name in names:
        lakehouse.reset(name)
    context.log.warning(f"Full refresh from {layer}: rebuilding {', '.join(names)} from scratch.")
    return True


def prepare_table(
    spark: SparkSession, lakehouse, name: str, rows: DataFrame | None = None, fresh: bool = False
) -> Path:
    """The folder of table `name`, with a Delta table in it: created empty if there is none yet, with
    the schema of `rows` (a streaming DataFrame will do), or the declared one (`checks.SCHEMAS`) for a
    table a step reads before the step that writes it has run; made anew on a full refresh (`fresh`)."""
    path = lakehouse.table(name)
    if fresh:
        storage.remove_tree(path)
    elif tables.load(path) is not None:
        return path
    elif path.is_dir() and any(path.iterdir()):
        raise Failure(
            f"{path} holds files but no Delta table: an earlier version of this project wrote {name} "
            "as plain Parquet. Rebuild the lakehouse from its landing folders with the "
            "`full_refresh_bronze` job (the landed files are kept)."
        )
    if rows is None:
        rows = spark.createDataFrame([], ", ".join(f"`{c}` {t}" for c, t in checks.SCHEMAS[name].items()))
    partition_by = checks.PARTITION_COLUMNS.get(name, [])
    tables.create_table(
        spark, path, rows.schema, partition_by, tables.retention_properties(lakehouse.retention_days)
    )
    return path


def latest_metadata(context: AssetExecutionContext, key: AssetKey, name: str):
    """Value of metadata entry `name` in the latest materialization of `key`, or None."""
    return _latest_materialization(context, key).get(name)


def _latest_materialization(context: AssetExecutionContext, key: AssetKey) -> dict:
    """The metadata values of the latest materialization of `key` (empty if none)."""
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return {}
    return {name: entry.value for name, entry in event.asset_materialization.metadata.items()}


def column_schema(df: DataFrame) -> dict[str, TableSchema]:
    """`dagster/column_schema` of a table, from the plan of the DataFrame that writes it (no data read)."""
    columns = [TableColumn(f.name, f.dataType.simpleString()) for f in df.schema.fields]
    return {"dagster/column_schema": TableSchema(columns=columns)}


def table_metadata(path: Path) -> dict:
    """What Dagster shows of a Delta table: its version (to find this materialization in the
    table's history, or to read it with `versionAsOf`), location and row count, read from its log."""
    table = tables.load(path)
    return {
        "delta_version": table.version(),
        "dagster/uri": MetadataValue.path(str(path)),
        "dagster/row_count": tables.row_count(table),
    }


def table_result(key: AssetKey, path: Path, rows: DataFrame, metadata: dict) -> MaterializeResult:
    """The materialization of a table after its query ran; `rows` is the (streaming) DataFrame its
    rows come from, for the column schema."""
    return MaterializeResult(
        asset_key=key, metadata={**metadata, **table_metadata(path), **column_schema(rows)}
    )
