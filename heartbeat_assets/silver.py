"""Silver: the current patient dimension, and valid, deduplicated recordings with the patient's name."""

from dagster import AssetExecutionContext, AssetKey, AssetSpec, Config, MaterializeResult, asset, multi_asset
from pydantic import Field
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from heartbeat_assets import bronze, checks
from heartbeat_assets.streaming import (
    InputWatch,
    appended_table_result,
    column_schema,
    run_available_now,
    start_fresh,
    unchanged_results,
)
from heartbeat_assets.tables import append_split, data_files, ensure_exists, read_lineage, replace_table
from resources import LakehouseResource, SparkSessionResource

BRONZE_RECORDINGS_SCHEMA = (
    f"{bronze.RECORDING_SCHEMA}, _rescued string, source_file string, source_line int, "
    "source_element int, source_modified_at timestamp, ingested_at timestamp"
)
BRONZE_PATIENTS_SCHEMA = (
    "mrn string, name string, _extra string, raw string, source_file string, source_line int, "
    "source_modified_at timestamp, ingested_at timestamp"
)
PATIENTS_SCHEMA = "mrn bigint, name string"

MAX_HEARTRATE = 300.0
#: Recordings before this instant (2000-01-01T00:00:00Z) are not plausible.
DEFAULT_MIN_TIME = 946_684_800.0

RECORDING_COLUMNS = ["device_id", "mrn", "recorded_at", "heartrate", "patient_name", "date", "source_file"]
QUARANTINE_COLUMNS = [
    "device_id", "mrn", "time", "heartrate", "reason",
    "source_file", "source_line", "source_element", "ingested_at",
]  # fmt: skip

PATIENTS = AssetKey(["silver", "patients"])
RECORDINGS = AssetKey(["silver", "recordings"])
RECORDINGS_QUARANTINE = AssetKey(["silver", "recordings_quarantine"])


def current_patients(bronze_patients: DataFrame) -> DataFrame:
    """One row per mrn with its latest name: the newest file (modification time, then name) wins,
    and within a file the last line. Rows without a numeric mrn or a name are left out."""
    valid = bronze_patients.where(
        F.col("mrn").rlike("^[0-9]{1,18}$") & (F.col("name") != "") & F.col("_extra").isNull()
    )
    newest_first = F.struct("source_modified_at", "source_file", "source_line")
    return valid.groupBy(F.col("mrn").cast("bigint").alias("mrn")).agg(
        F.max_by("name", newest_first).alias("name")
    )


def validate_recordings(
    recordings: DataFrame, *, min_time: float = DEFAULT_MIN_TIME, max_clock_skew_s: float = 86_400.0
) -> DataFrame:
    """Add `reason`: null for a valid recording, else `invalid_heartrate` and/or `invalid_time`.

    Valid: 0 < heartrate <= 300, and `min_time` <= time <= the file's landing time + `max_clock_skew_s`
    (a device cannot record after its file landed; the margin allows for device clocks running ahead).
    """
    heartrate, time = F.col("heartrate"), F.col("time")
    bad_heartrate = F.isnan(heartrate) | (heartrate <= 0) | (heartrate > MAX_HEARTRATE)
    latest_time = F.unix_micros("source_modified_at") / 1e6 + max_clock_skew_s
    bad_time = F.isnan(time) | (time < min_time) | (time > latest_time)
    reason = F.concat_ws(
        ";", F.when(bad_heartrate, F.lit("invalid_heartrate")), F.when(bad_time, F.lit("invalid_time"))
    )
    return recordings.withColumn("reason", F.nullif(reason, F.lit("")))


def deduplicate(validated: DataFrame) -> DataFrame:
    """Drop repeated valid recordings, identified by (device_id, mrn, time), however late they come.

    Rejected rows each get a key of their own (their source position), so they are never taken for
    duplicates of a valid recording. On a stream the seen keys live in the state store.
    """
    valid = F.col("reason").isNull()
    key = F.struct(
        F.when(valid, F.col("device_id")).alias("device_id"),
        F.when(valid, F.col("mrn")).alias("mrn"),
        F.when(valid, F.col("time")).alias("time"),
        F.when(~valid, F.col("source_file")).alias("source_file"),
        F.when(~valid, F.col("source_line")).alias("source_line"),
        F.when(~valid, F.col("source_element")).alias("source_element"),
    )
    return validated.withColumn("_key", key).dropDuplicates(["_key"]).drop("_key")


def enrich(recordings: DataFrame, patients: DataFrame) -> DataFrame:
    """Add `recorded_at` (UTC timestamp from epoch seconds), `date` and the patient's current name."""
    names = F.broadcast(patients.select("mrn", F.col("name").alias("patient_name")))
    return (
        recordings.join(names, "mrn", "left")
        .withColumn("recorded_at", F.timestamp_seconds("time"))
        .withColumn("date", F.to_date("recorded_at"))
    )


def clean_recordings(bronze_recordings: DataFrame, patients: DataFrame, **validation) -> DataFrame:
    """Validated, deduplicated and enriched recordings; rejected ones carry a `reason`."""
    return enrich(deduplicate(validate_recordings(bronze_recordings, **validation)), patients)


def batch_quality(valid: DataFrame, min_time: float, max_clock_skew_s: float) -> dict[str, int]:
    """Counts behind the silver value checks, over the rows of one micro-batch (one pass, cached data)."""
    heartrate, recorded_at = F.col("heartrate"), F.col("recorded_at")
    latest = F.current_timestamp() + F.make_interval(secs=F.lit(max_clock_skew_s))
    out_of_range = (
        F.isnan(heartrate) | (heartrate <= 0) | (heartrate > MAX_HEARTRATE)
        | (recorded_at < F.timestamp_seconds(F.lit(min_time))) | (recorded_at > latest)
    )  # fmt: skip
    row = valid.agg(
        checks.count_nulls(valid, ["device_id", "mrn", "recorded_at"]).alias("null_keys"),
        F.sum(F.when(out_of_range, 1).otherwise(0)).alias("out_of_range"),
        (F.count("*") - F.count_distinct("device_id", "mrn", "recorded_at")).alias("duplicate_keys"),
    ).first()
    return {name: int(row[name] or 0) for name in ("null_keys", "out_of_range", "duplicate_keys")}


def read_patients(spark: SparkSession, lakehouse: LakehouseResource) -> DataFrame:
    """The current patient dimension; read with its declared schema (silver's schema check guards the
    table), which spares a Spark job that infers it from the file."""
    table = lakehouse.table("silver/patients")
    if data_files(table):
        return spark.read.schema(PATIENTS_SCHEMA).parquet(str(table))
    return spark.createDataFrame([], PATIENTS_SCHEMA)


#: Silver caches each micro-batch for its writers and quality counts; bronze's Parquet holds about
#: 8 bytes a recording, so this bounds a batch at about a million recordings, whatever the backlog
#: (a full refresh of silver reads all of bronze). Two million in one batch have run the driver's
#: 768 MiB heap out of memory here (with the cache uncompressed).
MAX_BRONZE_BYTES_PER_BATCH = 8 * 2**20


def read_table_stream(
    spark: SparkSession, lakehouse: LakehouseResource, name: str, schema: str, max_bytes_per_batch: int = 0
) -> DataFrame:
    """Stream the files appended to one of the lakehouse's own tables, in micro-batches of at most
    `max_bytes_per_batch` bytes of files (at least one file; 0: everything new at once)."""
    table = lakehouse.table(name)
    table.mkdir(parents=True, exist_ok=True)
    stream = spark.readStream.schema(schema).option("maxFileAge", "36500d")
    if max_bytes_per_batch:
        stream = stream.option("maxBytesPerTrigger", max_bytes_per_batch)
    return stream.parquet(str(table))


class SilverRecordingsConfig(Config):
    min_time: float = Field(
        default=DEFAULT_MIN_TIME, description="Earliest plausible recording time, epoch seconds (UTC)."
    )
    max_clock_skew_s: float = Field(
        default=86_400.0, description="How far after its file landed a recording's time may be."
    )


@asset(
    key=PATIENTS,
    deps=[bronze.PATIENTS],
    group_name="silver",
    description="The current patient dimension: one row per mrn with the latest name.",
    check_specs=[checks.schema_spec("silver/patients")],
    pool="heartbeat_lakehouse",
)
def silver_patients(
    context: AssetExecutionContext, spark: SparkSessionResource, lakehouse: LakehouseResource
):
    """Fold new bronze patient rows into the dimension (complete-mode aggregate, replaced atomically)."""
    start_fresh(context, lakehouse, ["silver/patients"], keep_data=True)
    table = lakehouse.table("silver/patients")
    watch = InputWatch(lakehouse.checkpoint("silver/patients"), [lakehouse.table("bronze/patients")])
    if (skipped := unchanged_results(context, watch, [PATIENTS])) is not None:
        yield from skipped
        return

    def write_batch(patients: DataFrame, batch_id: int) -> dict[str, int]:
        # Complete mode: every micro-batch carries the whole dimension; the last one is the table.
        replace_table(patients, table, {"batch_id": batch_id})
        return {}

    stream = read_table_stream(spark.spark_session, lakehouse, "bronze/patients", BRONZE_PATIENTS_SCHEMA)
    dimension = current_patients(stream)
    report = run_available_now(
        dimension,
        name="silver/patients",
        checkpoint=lakehouse.checkpoint("silver/patients"),
        write_batch=write_batch,
        output_mode="complete",
    )
    ensure_exists(dimension, table)
    # The table's lineage holds the row count of the batch that wrote it last.
    latest = {"dagster/row_count": read_lineage(table)["rows"]} if report.batches else {}
    yield MaterializeResult(metadata={**report.metadata(), **latest, **column_schema(dimension)})
    yield checks.schema_check("silver/patients", dimension)
    watch.record()


@multi_asset(
    specs=[
        AssetSpec(
            RECORDINGS,
            deps=[bronze.RECORDINGS, PATIENTS],
            description="Valid, deduplicated recordings with the patient's name, partitioned by UTC date.",
            group_name="silver",
        ),
        AssetSpec(
            RECORDINGS_QUARANTINE,
            deps=[bronze.RECORDINGS],
            description="Recordings rejected in silver, each with a reason.",
            group_name="silver",
        ),
    ],
    check_specs=[
        checks.schema_spec("silver/recordings"),
        *checks.value_specs("silver/recordings"),
        checks.accounting_spec("silver/recordings"),
        checks.schema_spec("silver/recordings_quarantine"),
        checks.quarantine_rate_spec("silver/recordings_quarantine"),
    ],
    pool="heartbeat_lakehouse",
)
def silver_recordings(
    context: AssetExecutionContext,
    config: SilverRecordingsConfig,
    spark: SparkSessionResource,
    lakehouse: LakehouseResource,
):
    """Validate, deduplicate and enrich new bronze recordings."""
    fresh = start_fresh(context, lakehouse, ["silver/recordings", "silver/recordings_quarantine"])
    watch = InputWatch(
        lakehouse.checkpoint("silver/recordings"), [lakehouse.table("bronze/recordings")], config.model_dump()
    )
    if (skipped := unchanged_results(context, watch, [RECORDINGS, RECORDINGS_QUARANTINE])) is not None:
        yield from skipped
        return
    session = spark.spark_session
    recordings_table = lakehouse.table("silver/recordings")
    quarantine_table = lakehouse.table("silver/recordings_quarantine")

    min_time, max_clock_skew_s = config.min_time, config.max_clock_skew_s  # plain values travel well

    def write_batch(batch: DataFrame, batch_id: int) -> dict[str, int]:
        batch = batch.persist()
        try:
            written, quarantined, _ = append_split(
                batch, batch_id, F.col("reason").isNotNull(),
                kept_to=(recordings_table, RECORDING_COLUMNS),
                rejected_to=(quarantine_table, QUARANTINE_COLUMNS),
                partition_by=["date"],
            )  # fmt: skip
            # The rows just written, read again from the cache for the value checks' counts.
            valid = batch.where(F.col("reason").isNull()).select(*RECORDING_COLUMNS)
            return {
                "recordings_written": written,
                "quarantined": quarantined,
                **batch_quality(valid, min_time, max_clock_skew_s),
            }
        finally:
            batch.unpersist()

    stream = read_table_stream(
        session, lakehouse, "bronze/recordings", BRONZE_RECORDINGS_SCHEMA, MAX_BRONZE_BYTES_PER_BATCH
    )
    cleaned = clean_recordings(
        stream,
        read_patients(session, lakehouse),
        min_time=config.min_time,
        max_clock_skew_s=config.max_clock_skew_s,
    )
    report = run_available_now(
        cleaned,
        name="silver/recordings",
        checkpoint=lakehouse.checkpoint("silver/recordings"),
        write_batch=write_batch,
    )
    duplicates = report.state_metrics.get("numDroppedDuplicateRows", 0)
    accounted = report.count("recordings_written") + report.count("quarantined") + duplicates
    common = {
        **report.metadata(),
        "duplicates_dropped": duplicates,
        "bronze_rows_read": report.input_rows,
        "unaccounted_rows": report.input_rows - accounted,
    }
    # The tables first: Dagster ties each check to the asset's latest materialization, which must
    # be this run's.
    yield appended_table_result(
        context, RECORDINGS, recordings_table, cleaned.select(*RECORDING_COLUMNS),
        report.count("recordings_written"), common, partition_by=["date"], fresh=fresh,
    )  # fmt: skip
    yield appended_table_result(
        context, RECORDINGS_QUARANTINE, quarantine_table, cleaned.select(*QUARANTINE_COLUMNS),
        report.count("quarantined"), common, fresh=fresh,
    )  # fmt: skip
    yield checks.schema_check("silver/recordings", cleaned.select(*RECORDING_COLUMNS))
    yield from checks.value_checks("silver/recordings", report.counts)
    yield checks.accounting_check(
        "silver/recordings", report.input_rows,
        {"written": report.count("recordings_written"), "quarantined": report.count("quarantined"),
         "duplicates": duplicates},
    )  # fmt: skip
    yield checks.schema_check("silver/recordings_quarantine", cleaned.select(*QUARANTINE_COLUMNS))
    yield checks.quarantine_rate_check(
        "silver/recordings_quarantine", report.count("quarantined"), report.input_rows,
        lakehouse.quarantine_warn_rate, lakehouse.quarantine_error_rate,
    )  # fmt: skip
    if accounted != report.input_rows:
        context.log.error(
            f"silver/recordings read {report.input_rows} bronze rows but accounted for {accounted} "
            f"(written, quarantined and duplicates)."
        )
    watch.record()
