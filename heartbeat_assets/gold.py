"""Gold: per-patient and per-day heart-rate averages, and windows where a device lost its signal.

Gold tables are built from complete-mode streaming aggregates over silver/recordings, whose state
Spark keeps in the checkpoint. Delta's streaming sink writes each micro-batch's complete aggregate
to a Delta table beside the checkpoint; a gold table is then built from the aggregate's latest
version (joined with the *current* patient dimension) and replaced in one Delta commit, which
records what it was built from. A renamed patient or a patient row that lands after its recordings
therefore shows up in gold even when no new recording arrived, and a run with nothing new rewrites
nothing.

Two aggregates feed the three tables: per patient and day (daily_patient_avg, and heartrate_by_patient
as its roll-up over days: a streaming query fewer in every run) and per device and window
(device_signal_loss).

Sums are exact decimals (heart rates at 1e-6 precision), so averages do not depend on the order in
which recordings arrived.
"""

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import timedelta

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    Config,
    Failure,
    FreshnessPolicy,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)
from pydantic import Field
from pyspark.sql import DataFrame, Observation, SparkSession, Window
from pyspark.sql import functions as F

from heartbeat_assets import bronze, checks, silver, tables
from heartbeat_assets.killpoints import watch_writes
from heartbeat_assets.streaming import (
    InputWatch,
    QueryReport,
    column_schema,
    latest_metadata,
    prepare_table,
    run_available_now,
    start_fresh,
    table_metadata,
    unchanged_results,
)
from resources import LakehouseResource, SparkSessionResource

#: Heart rates are summed as exact decimals at this precision.
HEARTRATE_DECIMAL = "decimal(20,6)"

HEARTRATE_BY_PATIENT = AssetKey(["gold", "heartrate_by_patient"])
DAILY_PATIENT_AVG = AssetKey(["gold", "daily_patient_avg"])
DEVICE_SIGNAL_LOSS = AssetKey(["gold", "device_signal_loss"])


# Aggregates: valid on a stream (complete mode) and on a batch DataFrame.


def patient_daily_totals(recordings: DataFrame) -> DataFrame:
    return recordings.groupBy("mrn", "date").agg(
        F.sum(F.col("heartrate").cast(HEARTRATE_DECIMAL)).alias("heartrate_sum"), F.count("*").alias("count")
    )


def patient_totals(daily_totals: DataFrame) -> DataFrame:
    """Per patient, rolled up from `patient_daily_totals` (exact: the sums are decimals)."""
    # Back to the type a sum over the recordings has: a wider decimal would leave the mean fewer
    # digits after the point (Spark keeps 38 in all), and its ceiling could come out one too low.
    sum_type = daily_totals.schema["heartrate_sum"].dataType.simpleString()
    return daily_totals.groupBy("mrn").agg(
        F.sum("heartrate_sum").cast(sum_type).alias("heartrate_sum"), F.sum("count").alias("count")
    )


def device_window_counts(recordings: DataFrame, window_seconds: int) -> DataFrame:
    """Readings per device and tumbling event-time window (`window_start` in epoch seconds)."""
    window_start = F.floor(F.unix_seconds("recorded_at") / window_seconds) * window_seconds
    return recordings.groupBy("device_id", window_start.cast("bigint").alias("window_start")).agg(
        F.count("*").alias("readings")
    )


# Gold tables, built from an aggregate.


def heartrate_by_patient(totals: DataFrame, patients: DataFrame) -> DataFrame:
    """Per known patient: current name, ceil(mean heart rate) as a long, and the number of recordings."""
    return totals.join(patients, "mrn").select(
        "mrn",
        F.col("name").alias("patient_name"),
        F.ceil(F.col("heartrate_sum") / F.col("count")).cast("bigint").alias("avg_heartrate"),
        "count",
    )


def daily_patient_avg(daily_totals: DataFrame, patients: DataFrame) -> DataFrame:
    """Per known patient and UTC date: current name, mean heart rate, number of recordings."""
    return daily_totals.join(patients, "mrn").select(
        "mrn",
        F.col("name").alias("patient_name"),
        "date",
        (F.col("heartrate_sum") / F.col("count")).cast("double").alias("avg_heartrate"),
        "count",
    )


def device_signal_loss(
    window_counts: DataFrame, *, window_seconds: int, min_readings: int, max_silent_windows: int
) -> DataFrame:
    """Windows in which a device sent fewer than `min_readings` readings.

    Besides windows with a few readings, this finds silent ones (0 readings): after each window with
    readings, up to `max_silent_windows` windows without any, until the device's next reading or the
    newest window of any device. So a device that stops sending raises an alert, and one long outage
    (or a reading that arrived days late) adds a bounded number of rows.
    """
    by_device = Window.partitionBy("device_id").orderBy("window_start")
    newest = window_counts.agg(F.max("window_start").alias("newest_window"))
    spans = window_counts.crossJoin(newest).select(
        "device_id",
        "window_start",
        F.least(
            F.coalesce(F.lead("window_start").over(by_device) - window_seconds, F.col("newest_window")),
            F.col("window_start") + max_silent_windows * window_seconds,
        ).alias("last_silent"),
    )
    silent = spans.where(F.col("last_silent") > F.col("window_start")).select(
        "device_id",
        F.explode(
            F.sequence(F.col("window_start") + window_seconds, F.col("last_silent"), F.lit(window_seconds))
        ).alias("window_start"),
        F.lit(0).cast("bigint").alias("readings"),
    )
    sparse = window_counts.where(F.col("readings") < min_readings)
    return sparse.unionByName(silent).select(
        "device_id",
        F.timestamp_seconds("window_start").alias("window_start"),
        F.timestamp_seconds(F.col("window_start") + window_seconds).alias("window_end"),
        "readings",
    )


def markdown_preview(table: DataFrame, rows: int = 10) -> str:
    """The first rows of a (small, gold) table as a Markdown table."""
    columns = table.columns
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.orderBy(*columns[:2]).limit(rows).collect():
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines)


class SignalLossConfig(Config):
    window_seconds: int = Field(default=60, description="Length of the tumbling event-time window.")
    min_readings: int = Field(default=30, description="A window with fewer readings raises an alert.")
    max_silent_windows: int = Field(
        default=5, description="At most this many silent windows are reported after a window with readings."
    )


class GoldConfig(Config):
    device_signal_loss: SignalLossConfig = Field(
        default_factory=SignalLossConfig, description="When gold/device_signal_loss raises an alert."
    )


class GoldAggregate:
    """A complete-mode streaming aggregate over silver/recordings, written by Delta's streaming sink
    to a Delta table beside its checkpoint (`_aggregate`): each micro-batch commits the whole
    aggregate as a new version.

    Tables built from the same aggregate share one run of its query per step: `run` is called from
    each table's thread, and the first call runs the query while the others wait for its outcome.
    The rows it counts per patient (`counted_rows`, for the counts checks) are summed once too.
    """

    def __init__(self, name: str, lakehouse: LakehouseResource, aggregate: Callable[[DataFrame], DataFrame]):
        self.name, self.lakehouse, self.aggregate = name, lakehouse, aggregate
        self.checkpoint = lakehouse.checkpoint(name)
        self.path = self.checkpoint / "_aggregate"
        self._lock = threading.Lock()
        self._outcome: tuple[QueryReport | None, BaseException | None] | None = None
        self._snapshot: tuple[str, DataFrame] | None = None
        self._counted: tuple[int, int] | None = None

    def run(self, spark: SparkSession) -> QueryReport:
        """Bring the aggregate up to date, once per step: later calls get the first call's outcome."""
        with self._lock:
            if self._outcome is None:
                try:
                    self._outcome = (self._run_query(spark), None)
                except Exception as exc:  # each table using the aggregate fails with it
                    self._outcome = (None, exc)
        report, error = self._outcome
        if error is not None:
            raise error
        return report

    def _run_query(self, spark: SparkSession) -> QueryReport:
        recordings = silver.read_table_stream(spark, self.lakehouse, "silver/recordings")
        aggregated = self.aggregate(recordings)
        if tables.load(self.path) is None:  # so that an aggregate of nothing reads as empty
            retention = tables.retention_properties(self.lakehouse.retention_days)
            tables.create_table(spark, self.path, aggregated.schema, properties=retention)
        return run_available_now(
            aggregated,
            name=self.name,
            checkpoint=self.checkpoint,
            writes={f"{self.name}:aggregate": self.path},
            output_mode="complete",
        )

    def snapshot(self, spark: SparkSession) -> tuple[str, DataFrame]:
        """The aggregate's identity (table id and version) and its rows at that version: after `run`,
        the same for every table of this step."""
        with self._lock:
            if self._snapshot is None:
                table = tables.load(self.path)
                reader = spark.read.format("delta").option("versionAsOf", table.version())
                # Cached: its tables and checks read it several times, and each read of a Delta
                # version costs Spark jobs (the log's state, the files to scan) before the rows.
                self._snapshot = (tables.identity(table), reader.load(str(self.path)).persist())
            return self._snapshot

    def release(self) -> None:
        """Drop this step's cached snapshot."""
        if self._snapshot is not None:
            self._snapshot[1].unpersist()

    def counted_rows(self, patients: DataFrame) -> tuple[int, int]:
        """(rows counted for the known `patients`, all rows counted) in this step's `snapshot`; one
        Spark job per step, whichever table asks first."""
        with self._lock:
            if self._counted is None:
                if self._snapshot is None:
                    raise RuntimeError("counted_rows needs this step's snapshot: call `snapshot` first")
                aggregated = self._snapshot[1]
                # Each known mrn once: a patient listed twice would count its recordings twice.
                known = patients.select("mrn").distinct().withColumn("known", F.lit(True))
                row = (
                    aggregated.join(known, "mrn", "left")
                    .agg(
                        F.sum(F.when(F.col("known"), F.col("count"))).alias("of_known"),
                        F.sum("count").alias("in_aggregate"),
                    )
                    .first()
                )
                self._counted = (row["of_known"] or 0, row["in_aggregate"] or 0)
            return self._counted


class Patients:
    """The patient dimension as one gold step sees it: one version of silver/patients for every table."""

    def __init__(self, lakehouse: LakehouseResource):
        self.lakehouse = lakehouse
        table = tables.load(lakehouse.table("silver/patients"))
        self.version = table.version() if table is not None else None
        self.identity = tables.identity(table)

        self._lock = threading.Lock()
        self._rows: DataFrame | None = None

    def read(self, spark: SparkSession) -> DataFrame:
        """The patients at this step's version, read once and cached for every table and check."""
        with self._lock:
            if self._rows is None:
                self._rows = silver.read_patients(spark, self.lakehouse, self.version).persist()
            return self._rows

    def release(self) -> None:
        if self._rows is not None:
            self._rows.unpersist()


class GoldTable:
    """Builds one gold table from its aggregate, rebuilding it when its inputs changed.

    `prepare` deals with Dagster (the step's run, event log and logger); `update` and `check` only
    with Spark and the table's files, so the step can run them for its tables in threads at once.
    """

    def __init__(
        self,
        context: AssetExecutionContext,
        name: str,
        lakehouse: LakehouseResource,
        *,
        aggregate: GoldAggregate,
        build: Callable[[DataFrame], DataFrame],
        settings: dict,
        patients: Patients | None,
        reports_new_rows: bool = False,
    ):
        self.context = context
        self.name = name
        self.key = AssetKey(name.split("/"))
        self.lakehouse = lakehouse
        self.path = lakehouse.table(name)
        # The table's own, for the mark of the inputs it was last built from; its aggregate's may be
        # another table's.
        self.checkpoint = lakehouse.checkpoint(name)
        self.aggregate, self.build, self.patients = aggregate, build, patients
        self.settings, self.reports_new_rows = settings, reports_new_rows

    def prepare(self) -> list | None:
        """Reset the table's aggregate on a full refresh and check its settings; the step's results
        if its inputs are unchanged, else None (then `update` and `check` must run)."""
        names = [self.name] if self.aggregate.name == self.name else [self.aggregate.name, self.name]
        self.fresh = start_fresh(self.context, self.lakehouse, names)
        self._check_settings(self.settings)
        inputs_read = [self.lakehouse.table("silver/recordings")]
        if self.patients is not None:
            inputs_read.append(self.lakehouse.table("silver/patients"))
        self.watch = InputWatch(self.checkpoint, tables_read=inputs_read, settings=self.settings)
        nothing_new = {"no_new_lost_signal": self._new_alerts_check([])} if self.reports_new_rows else {}
        return unchanged_results(self.context, self.watch, [self.key], nothing_new)

    def update(self, spark: SparkSession, landed: float | None) -> MaterializeResult:
        """Bring the aggregate up to date and rebuild the table if its inputs changed; the table's
        materialization.

        `landed` is when bronze's newest file landed. `check` then gives the table's checks.
        """
        report = self.aggregate.run(spark)
        aggregate_identity, self.aggregated = self.aggregate.snapshot(spark)
        inputs = {"aggregate": aggregate_identity, "settings": self.settings}
        if self.patients is not None:
            inputs["patients"] = self.patients.identity
        table = self.build(self.aggregated)
        current = tables.load(self.path)
        built_from = tables.last_commit(current)["userMetadata"].get("inputs") if current else None
        self.rebuilt = self.fresh or built_from != inputs
        metadata = {
            **report.metadata(),
            "aggregate_query": self.aggregate.name,
            **column_schema(table),
            "table_rebuilt": self.rebuilt,
        }
        self.counted_in_gold = None  # the counts check's gold side, summed as the table is written
        self.previous_rows: Counter = Counter()
        if self.rebuilt:
            if current is None:  # (a full refresh replaces a folder of plain Parquet, too)
                prepare_table(spark, self.lakehouse, self.name, table, fresh=self.fresh)
            elif self.reports_new_rows:  # the check compares the new version with this one: few rows
                before = spark.read.format("delta").load(str(self.path)).collect()
                self.previous_rows = Counter(tuple(row) for row in before)
            if self.patients is not None:
                counted = Observation()
                table = table.observe(counted, F.sum("count").alias("in_gold"))
            # The rows of the version written, computed once: its preview and checks read them
            # rather than the new version (each Delta read costs jobs of its own).
            table = self.written = table.persist()
            with watch_writes({self.name: self.path}):
                tables.overwrite(table, self.path, {"inputs": inputs})
            if self.patients is not None:
                self.counted_in_gold = counted.get["in_gold"] or 0
            if landed:  # seconds from the newest recording file landing (as bronze saw it)
                metadata["landing_to_gold_latency_s"] = round(time.time() - landed, 3)
        metadata.update(table_metadata(self.path))
        if not self.rebuilt:
            self.written = spark.read.format("delta").option("versionAsOf", metadata["delta_version"])
            self.written = self.written.load(str(self.path))
        if self.lakehouse.table_previews:
            metadata["preview"] = MetadataValue.md(markdown_preview(self.written))
        return MaterializeResult(asset_key=self.key, metadata=metadata)

    def check(self, silver_rows: int) -> list[AssetCheckResult]:
        """The checks of the table `update` wrote; `silver_rows` is silver/recordings' row count."""
        results = [checks.schema_check(self.name, self.written)]
        if self.patients is not None:
            results.append(self._counts_check(silver_rows))
        if self.reports_new_rows:
            results.append(self._new_alerts_check(self._rows_not_in_previous_version()))
        self.watch.record()
        return results

    def release(self) -> None:
        """Drop the rows `update` cached."""
        if getattr(self, "written", None) is not None:
            self.written.unpersist()

    def _new_alerts_check(self, new_alerts: list[tuple]) -> AssetCheckResult:
        return AssetCheckResult(
            asset_key=self.key,
            check_name="no_new_lost_signal",
            passed=not new_alerts,
            severity=AssetCheckSeverity.WARN,
            metadata={"new_alerts": len(new_alerts), "alerts": checks.alerts_markdown(new_alerts)},
        )

    def _rows_not_in_previous_version(self) -> list[tuple]:
        """Rows of the table that its version before this run lacked. (Read before the new version
        replaced it: Delta refuses to time-travel to a version older than the table's retention, and
        the version before may be that old.)"""
        if not self.rebuilt:
            return []
        new = Counter(tuple(row) for row in self.written.collect()) - self.previous_rows
        return sorted(new.elements())

    def _counts_check(self, silver_rows: int) -> AssetCheckResult:
        """Gold's counts add up to the silver rows of known patients, and the aggregate covers silver."""
        in_gold = self.counted_in_gold
        if in_gold is None:  # the table was not rebuilt in this run
            in_gold = self.written.agg(F.sum("count")).first()[0] or 0
        of_known, in_aggregate = self.aggregate.counted_rows(self.patients.read(self.written.sparkSession))
        return AssetCheckResult(
            asset_key=self.key,
            check_name="counts_match_silver",
            passed=in_gold == of_known and in_aggregate == silver_rows,
            metadata={"gold_count": in_gold, "silver_rows_of_known_patients": of_known,
                      "aggregated_rows": in_aggregate, "silver_rows": silver_rows},
        )  # fmt: skip

    def _check_settings(self, settings: dict) -> None:
        """Settings baked into the aggregate's state cannot change without rebuilding it."""
        stored = self.aggregate.checkpoint / "_settings.json"
        state = {k: v for k, v in settings.items() if k == "window_seconds"}
        if not state:
            return
        if stored.exists():
            before = json.loads(stored.read_text())
            if before != state:
                raise Failure(
                    f"{self.name}: the aggregate in {self.aggregate.checkpoint} was built with {before}, "
                    f"this run asks for {state}. Rebuild gold with the new setting with the "
                    "`full_refresh_gold` job (a full refresh), or run with the old setting."
                )
        else:
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_text(json.dumps(state))


GOLD_DEPS = [silver.RECORDINGS, silver.PATIENTS]
# The hourly schedule and the sensors keep gold fresh; a gold older than this shows as stale in the UI.
GOLD_FRESHNESS = FreshnessPolicy.time_window(fail_window=timedelta(hours=2), warn_window=timedelta(hours=1))
COUNTS_CHECK = (
    "Gold's counts sum to the silver rows of known patients, and its aggregate covers every silver row."
)


def gold_tables(context: AssetExecutionContext, config: GoldConfig, lakehouse: LakehouseResource) -> list:
    """Every gold table: the aggregate over silver/recordings it is built from, and how."""
    signal_loss = config.device_signal_loss.model_dump()
    patients = Patients(lakehouse)

    def with_patients(build):
        return lambda totals: build(totals, patients.read(totals.sparkSession))

    # Each aggregate's checkpoint is named after the table it was first made for. A table that groups
    # or windows its aggregate again reads it as one partition: it is as small as the table, and the
    # build then needs no shuffle (here heartrate_by_patient took 0.49 s instead of 0.63 s,
    # device_signal_loss 0.44 s instead of 0.50 s; a join alone gains nothing).
    daily_totals = GoldAggregate("gold/daily_patient_avg", lakehouse, patient_daily_totals)
    window_counts = GoldAggregate(
        "gold/device_signal_loss",
        lakehouse,
        lambda recordings: device_window_counts(recordings, signal_loss["window_seconds"]),
    )
    return [
        GoldTable(
            context, "gold/heartrate_by_patient", lakehouse,
            aggregate=daily_totals,
            build=with_patients(
                lambda daily, names: heartrate_by_patient(patient_totals(daily.coalesce(1)), names)
            ),
            settings={}, patients=patients,
        ),
        GoldTable(
            context, "gold/daily_patient_avg", lakehouse,
            aggregate=daily_totals,
            build=with_patients(daily_patient_avg),
            settings={}, patients=patients,
        ),
        GoldTable(
            context, "gold/device_signal_loss", lakehouse,
            aggregate=window_counts,
            build=lambda counts: device_signal_loss(counts.coalesce(1), **signal_loss),
            settings=signal_loss, patients=None, reports_new_rows=True,
        ),
    ]  # fmt: skip


@multi_asset(
    name="gold",
    specs=[
        AssetSpec(
            HEARTRATE_BY_PATIENT,
            deps=GOLD_DEPS,
            description="Per known patient: current name, ceil of the mean heart rate, number of recordings.",
            group_name="gold",
            freshness_policy=GOLD_FRESHNESS,
            skippable=True,
        ),
        AssetSpec(
            DAILY_PATIENT_AVG,
            deps=GOLD_DEPS,
            description="Per known patient and UTC date: current name, mean heart rate, number of "
            "recordings.",
            group_name="gold",
            freshness_policy=GOLD_FRESHNESS,
            skippable=True,
        ),
        AssetSpec(
            DEVICE_SIGNAL_LOSS,
            deps=[silver.RECORDINGS],
            description="Device and event-time windows with fewer readings than the threshold: lost signal.",
            group_name="gold",
            freshness_policy=GOLD_FRESHNESS,
            skippable=True,
        ),
    ],
    check_specs=[
        checks.schema_spec("gold/heartrate_by_patient"),
        checks.spec("gold/heartrate_by_patient", "counts_match_silver", COUNTS_CHECK),
        checks.schema_spec("gold/daily_patient_avg"),
        checks.spec("gold/daily_patient_avg", "counts_match_silver", COUNTS_CHECK),
        checks.schema_spec("gold/device_signal_loss"),
        checks.spec(
            "gold/device_signal_loss",
            "no_new_lost_signal",
            "Warns when a run finds windows in which a device lost its signal; the new ones are listed.",
        ),
    ],
    can_subset=True,
    pool="heartbeat_lakehouse",
)
def gold(
    context: AssetExecutionContext,
    config: GoldConfig,
    spark: SparkSessionResource,
    lakehouse: LakehouseResource,
):
    """Bring the selected gold tables up to date. Their queries run at the same time: each is small,
    and one after another they would leave the cores idle between Spark jobs."""
    selected = [t for t in gold_tables(context, config, lakehouse) if t.key in context.selected_asset_keys]
    try:
        yield from _update_and_check(context, selected, spark)
    finally:  # the rows this step cached: each table's, its aggregate's, the patients'
        cached = {id(s): s for t in selected for s in (t, t.aggregate, t.patients) if s is not None}
        for source in cached.values():
            source.release()


def _update_and_check(context: AssetExecutionContext, selected: list[GoldTable], spark: SparkSessionResource):
    to_build, failed = [], []
    for table in selected:
        try:
            skipped = table.prepare()
        except Exception as exc:  # reported below: the other tables are still built
            failed.append((table.name, exc))
            continue
        if skipped is None:
            to_build.append(table)
        else:
            yield from skipped
    if to_build:
        # Read once for every table, here: the threads touch only Spark and files.
        silver_rows = latest_metadata(context, silver.RECORDINGS, "dagster/row_count") or 0
        landed = latest_metadata(context, bronze.RECORDINGS, "newest_file_modified_at")
        session = spark.spark_session  # started before the threads, which share it
        with ThreadPoolExecutor(len(to_build), thread_name_prefix="gold") as pool:
            # Every table first, then the checks: gold is up to date (and reported) without waiting
            # for the checks of the other tables.
            updated = []
            for table, materialization in _each_completed(
                pool, to_build, failed, lambda t: t.update(session, landed)
            ):
                updated.append(table)
                yield materialization
            for _, results in _each_completed(pool, updated, failed, lambda t: t.check(silver_rows)):
                yield from results
    for name, exc in failed[1:]:
        context.log.error(f"{name} failed too: {exc}")
    if failed:
        raise failed[0][1]


def _each_completed(pool: ThreadPoolExecutor, tables: list[GoldTable], failed: list, work: Callable):
    """`(table, work(table))` for each table, in the threads of `pool`, as each completes. A table
    whose work raised is added to `failed` instead (reported at the end: the others go on)."""
    futures = {pool.submit(work, table): table for table in tables}
    for future in as_completed(futures):
        table = futures[future]
        try:
            result = future.result()
        except Exception as exc:
            failed.append((table.name, exc))
            continue
        yield table, result
