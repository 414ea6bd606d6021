"""The one runner behind every layer: an availableNow streaming query with its own checkpoint.

Each layer defines a pure DataFrame transformation and a `foreachBatch` writer; this module starts
the query, waits for it, and sums the query's progress into numbers the Dagster assets report.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetExecutionContext,
    AssetKey,
    Failure,
    MaterializeResult,
    TableColumn,
    TableSchema,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as CheckStatus
from py4j.protocol import Py4JJavaError
from pyspark.errors import AnalysisException, StreamingQueryException
from pyspark.sql import DataFrame

from heartbeat_assets.killpoints import kill_point
from heartbeat_assets.tables import ensure_exists, write_atomically

BatchWriter = Callable[[DataFrame, int], dict[str, int]]


@dataclass
class QueryReport:
    """What one availableNow run of a streaming query did, summed over its micro-batches."""

    name: str
    batch_ids: list[int] = field(default_factory=list)
    input_rows: int = 0
    duration_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    #: Values the writer returned under `max:<name>` keys, combined with max over the batches.
    maxima: dict[str, float] = field(default_factory=dict)
    state_metrics: dict[str, int] = field(default_factory=dict)
    #: Spark's own time per phase of its micro-batches (queryPlanning, addBatch, walCommit, ...).
    phase_ms: dict[str, int] = field(default_factory=dict)

    @property
    def batches(self) -> int:
        return len(self.batch_ids)

    def count(self, key: str) -> int:
        return self.counts.get(key, 0)

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
    write_batch: BatchWriter,
    output_mode: str = "append",
) -> QueryReport:
    """Run `df` with `trigger(availableNow=True)` until it has consumed all available input.

    `write_batch(batch_df, batch_id)` writes a micro-batch and returns counts (rows written per
    table, ...), which are summed into the report (values under `max:<name>` keys are combined with
    max). The query name is `name` with `/` replaced.

    The counts travel through a file per batch beside the checkpoint, not through this process's
    memory: with Spark Connect, `write_batch` runs in a Python process of the Connect server (it and
    everything it refers to are pickled), so it cannot change anything here.
    """
    report = QueryReport(name=name)
    run_token = uuid.uuid4().hex  # tells this run's batches from those of earlier runs

    def on_batch(batch_df: DataFrame, batch_id: int) -> None:
        counts = write_batch(batch_df, batch_id)
        _record_batch(checkpoint, batch_id, run_token, counts)
        kill_point(f"batch:{name}:written")  # written, but Spark has not committed the batch

    started = time.monotonic()
    try:
        query = (
            df.writeStream.queryName(name.replace("/", "_"))
            .foreachBatch(on_batch)
            .outputMode(output_mode)
            .trigger(availableNow=True)
            .option("checkpointLocation", str(checkpoint))
            .start()
        )
        query.awaitTermination()
    except (StreamingQueryException, AnalysisException, Py4JJavaError) as exc:
        raise _query_failure(name, checkpoint, exc) from exc
    report.duration_s = time.monotonic() - started
    for progress in query.recentProgress:
        counts = _recorded_batch(checkpoint, progress.batchId, run_token)
        if counts is None:  # no data, so no batch was run
            continue
        report.batch_ids.append(progress.batchId)
        for key, value in counts.items():
            if key.startswith("max:"):
                metric = key.removeprefix("max:")
                report.maxima[metric] = max(float(value), report.maxima.get(metric, float(value)))
            else:
                report.counts[key] = report.counts.get(key, 0) + int(value)
        report.input_rows += progress.numInputRows
        for phase, ms in (progress.durationMs or {}).items():
            report.phase_ms[phase] = report.phase_ms.get(phase, 0) + int(ms)
        for operator in progress.stateOperators:
            for key, value in (operator.customMetrics or {}).items():
                if key.startswith("numDropped"):
                    report.state_metrics[key] = report.state_metrics.get(key, 0) + int(value)
    _prune_batch_records(checkpoint)
    return report


#: Folder beside a query's checkpoint data where each micro-batch's counts are recorded.
BATCH_RECORDS = "_batch_counts"
#: Records of this many of the latest batches are kept.
KEEP_BATCH_RECORDS = 100


def _record_batch(checkpoint: Path, batch_id: int, run_token: str, counts: dict) -> None:
    """Record what micro-batch `batch_id` wrote, atomically; a re-run of the batch replaces it."""
    target = Path(checkpoint) / BATCH_RECORDS / f"{batch_id:012d}.json"
    write_atomically(target, json.dumps({"run": run_token, "counts": counts}))


def _recorded_batch(checkpoint: Path, batch_id: int, run_token: str) -> dict | None:
    """The counts micro-batch `batch_id` recorded in the run with `run_token`, or None."""
    try:
        record = json.loads((Path(checkpoint) / BATCH_RECORDS / f"{batch_id:012d}.json").read_text())
    except FileNotFoundError:
        return None
    return record["counts"] if record.get("run") == run_token else None


def _prune_batch_records(checkpoint: Path) -> None:
    records = sorted((Path(checkpoint) / BATCH_RECORDS).glob("*.json"))
    for old in records[:-KEEP_BATCH_RECORDS]:
        old.unlink(missing_ok=True)


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

    The mark covers every folder the query reads, plus any settings. It is stored beside the
    checkpoint only after the query completed, so a crashed or failed run is never skipped after.
    The lakehouse's own tables change only inside a run, which holds the lock: their folders'
    modification times mark them (files are added by a rename or a create, which changes their
    folder's mtime). Landing folders are written by others at any time, and a file system keeps times
    at a coarse tick, so a file renamed in just after the mark was taken may leave the folder's mtime
    as it was: they are marked by the names of the files in them (`list_files`).
    """

    FILE = "_input_mark"

    def __init__(
        self, checkpoint: Path, folders: list[Path], settings: object = None, list_files: bool = False
    ):
        self.path = checkpoint / self.FILE
        self.mark = self._mark(folders, settings, list_files)

    @staticmethod
    def _mark(folders: list[Path], settings: object, list_files: bool) -> str:
        stamps = [repr(settings)]
        for top in folders:
            if not top.is_dir():
                stamps.append(f"{top}:missing")
                continue
            for folder, dirs, files in os.walk(top):
                dirs[:] = sorted(d for d in dirs if d != "_staging")
                if list_files:
                    stamps.append(folder)
                    stamps.extend(f"  {name}" for name in sorted(files) if not name.startswith("."))
                else:
                    stat = os.stat(folder)
                    stamps.append(f"{folder}:{stat.st_ino}:{stat.st_mtime_ns}")
        return hashlib.sha256("\n".join(stamps).encode()).hexdigest()

    @property
    def unchanged(self) -> bool:
        try:
            return self.path.read_text() == self.mark
        except FileNotFoundError:
            return False

    def record(self) -> None:
        """Remember the inputs as seen before the query ran (call after it completed)."""
        write_atomically(self.path, self.mark)


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
        rows = latest_metadata(context, key, "dagster/row_count")
        metadata = {"input_unchanged": True, "rows_added": 0}
        results.append(
            MaterializeResult(
                asset_key=key,
                metadata={**metadata, **({"dagster/row_count": int(rows)} if rows is not None else {})},
            )
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


def start_fresh(
    context: AssetExecutionContext, lakehouse, tables: list[str], keep_data: bool = False
) -> bool:
    """Reset `tables` if this run is a full refresh of their layer or one upstream; say whether it did."""
    layer = context.run.tags.get(FULL_REFRESH_TAG)
    if layer is None:
        return False
    if layer not in LAYERS:
        raise Failure(f"Run tag {FULL_REFRESH_TAG}={layer!r} is not a layer; use one of {', '.join(LAYERS)}.")
    if LAYERS.index(tables[0].split("/")[0]) < LAYERS.index(layer):
        return False
    for name in tables:
        lakehouse.reset(name, keep_data=keep_data)
    context.log.warning(f"Full refresh from {layer}: rebuilding {', '.join(tables)} from scratch.")
    return True


def row_count(
    context: AssetExecutionContext,
    key: AssetKey,
    rows_added: int,
    count_table: Callable[[], int],
    fresh: bool = False,
) -> dict[str, int]:
    """`dagster/row_count` of an append-only table: the last materialization's count plus this run's rows.

    Keeps the total without scanning the table; `fresh` starts it over (after a full refresh). A
    Dagster instance without a count yet (a new one, over tables an earlier instance wrote) counts
    the table once, with `count_table`.
    """
    previous = 0 if fresh else latest_metadata(context, key, "dagster/row_count")
    total = count_table() if previous is None else int(previous) + rows_added
    return {"dagster/row_count": total, "rows_added": rows_added}


def latest_metadata(context: AssetExecutionContext, key: AssetKey, name: str):
    """Value of metadata entry `name` in the latest materialization of `key`, or None."""
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    entry = event.asset_materialization.metadata.get(name)
    return entry.value if entry is not None else None


def column_schema(df: DataFrame) -> dict[str, TableSchema]:
    """`dagster/column_schema` of a table, from the plan of the DataFrame that writes it (no data read)."""
    columns = [TableColumn(f.name, f.dataType.simpleString()) for f in df.schema.fields]
    return {"dagster/column_schema": TableSchema(columns=columns)}


def appended_table_result(
    context: AssetExecutionContext,
    key: AssetKey,
    table: Path,
    rows: DataFrame,
    rows_added: int,
    metadata: dict,
    partition_by: list[str] | None = None,
    fresh: bool = False,
) -> MaterializeResult:
    """The materialization of an append-only table after its query ran.

    `rows` is the (streaming) DataFrame the table's rows come from: it gives the schema, which is
    also used to create the table empty if no row has reached it yet.
    """
    ensure_exists(rows, table, partition_by)
    return MaterializeResult(
        asset_key=key,
        metadata={
            **metadata,
            **row_count(
                context, key, rows_added, lambda: rows.sparkSession.read.parquet(str(table)).count(), fresh
            ),
            **column_schema(rows),
        },
    )
