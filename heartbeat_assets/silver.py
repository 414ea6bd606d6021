"""Silver: the current patient dimension, and valid, deduplicated recordings with the patient's name."""

from dagster import AssetExecutionContext, AssetKey, AssetSpec, Config, asset, multi_asset
from pydantic import Field
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from heartbeat_assets import bronze, checks
from heartbeat_assets.batch_writers import (
    current_patients,
    patients_merger,
    split_writer,
)
from heartbeat_assets.streaming import (
    InputWatch,
    prepare_table,
    run_available_now,
    start_fresh,
    table_result,
    unchanged_results,
)
from resources import LakehouseResource, SparkSessionResource

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


def quality_numbers(min_time: float, max_clock_skew_s: float) -> dict[str, Column]:
    """Aggregates behind the silver value checks, over the valid rows of a micro-batch (`reason` null)."""
    valid, heartrate, recorded_at = F.col("reason").isNull(), F.col("heartrate"), F.col("recorded_at")
    latest = F.current_timestamp() + F.make_interval(secs=F.lit(max_clock_skew_s))
    out_of_range = (
        F.isnan(heartrate) | (heartrate <= 0) | (heartrate > MAX_HEARTRATE)
        | (recorded_at < F.timestamp_seconds(F.lit(min_time))) | (recorded_at > latest)
    )  # fmt: skip
    null_key = F.greatest(*[F.col(c).isNull() for c in ("device_id", "mrn", "recorded_at")])
    return {
        "null_keys": F.count_if(valid & null_key),
        "out_of_range": F.count_if(valid & out_of_range),
        "duplicate_keys": F.count_if(valid)
        - F.count_distinct(F.when(valid, F.struct("device_id", "mrn", "recorded_at"))),
    }


def read_patients(spark: SparkSession, lakehouse: LakehouseResource, version: int | None = None) -> DataFrame:
    """The patient dimension (mrn, name), at `version` if given, else the latest (empty before any
    patient landed)."""
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(str(prepare_table(spark, lakehouse, "silver/patients"))).select("mrn", "name")


#: Silver caches each micro-batch for its writers and quality counts; bronze's Parquet holds about
#: 8 bytes a recording, so this bounds a batch at about a million recordings, whatever the backlog
#: (a full refresh of silver reads all of bronze). Two million in one batch have run the driver's
#: 768 MiB heap out of memory here (with the cache uncompressed).
MAX_BRONZE_BYTES_PER_BATCH = 8 * 2**20
#: Delta's source reads at most 1,000 files per micro-batch by default: a stream without a byte
#: bound takes everything new at once.
ALL_FILES = 1_000_000


def read_table_stream(
    spark: SparkSession, lakehouse: LakehouseResource, name: str, max_bytes_per_batch: int = 0
) -> DataFrame:
    """Stream the rows appended to one of the lakehouse's tables (made empty if its step has never
    run), in micro-batches of at most `max_bytes_per_batch` bytes of files (at least one file; 0:
    everything new at once)."""
    stream = spark.readStream.format("delta").option("maxFilesPerTrigger", ALL_FILES)
    if max_bytes_per_batch:
        stream = stream.option("maxBytesPerTrigger", max_bytes_per_batch)
    return stream.load(str(prepare_table(spark, lakehouse, name)))


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
    description="The current patient dimension: one row per mrn with the latest name, and its source.",
    check_specs=[checks.schema_spec("silver/patients")],
    pool="heartbeat_lakehouse",
)
def silver_patients(
    context: AssetExecutionContext, spark: SparkSessionResource, lakehouse: LakehouseResource
):
    """Merge new bronze patient rows into the dimension (newest source wins)."""
    fresh = start_fresh(context, lakehouse, ["silver/patients"])
    checkpoint = lakehouse.checkpoint("silver/patients")
    bronze_table = lakehouse.table("bronze/patients")
    watch = InputWatch(checkpoint, tables_read=[bronze_table])
    if (skipped := unchanged_results(context, watch, [PATIENTS])) is not None:
        yield from skipped
        return
    session = spark.spark_session
    stream = read_table_stream(session, lakehouse, "bronze/patients")
    dimension = current_patients(stream)
    table = prepare_table(session, lakehouse, "silver/patients", dimension, fresh=fresh)
    report = run_available_now(
        stream,
        name="silver/patients",
        checkpoint=checkpoint,
        writes={"silver/patients": table},
        write_batch=patients_merger(table),
    )
    merged = report.operations.get("silver/patients", {})
    inserted, updated = merged.get("numTargetRowsInserted", 0), merged.get("numTargetRowsUpdated", 0)
    metadata = {**report.metadata(), "patients_added": inserted, "patients_updated": updated}
    yield table_result(PATIENTS, table, dimension, {**metadata, "rows_added": inserted})
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
    checkpoint = lakehouse.checkpoint("silver/recordings")
    bronze_table = lakehouse.table("bronze/recordings")
    watch = InputWatch(checkpoint, tables_read=[bronze_table], settings=config.model_dump())
    if (skipped := unchanged_results(context, watch, [RECORDINGS, RECORDINGS_QUARANTINE])) is not None:
        yield from skipped
        return
    session = spark.spark_session
    stream = read_table_stream(session, lakehouse, "bronze/recordings", MAX_BRONZE_BYTES_PER_BATCH)
    cleaned = clean_recordings(
        stream,
        read_patients(session, lakehouse),
        min_time=config.min_time,
        max_clock_skew_s=config.max_clock_skew_s,
    )
    recordings, quarantine = cleaned.select(*RECORDING_COLUMNS), cleaned.select(*QUARANTINE_COLUMNS)
    recordings_table = prepare_table(session, lakehouse, "silver/recordings", recordings, fresh=fresh)
    quarantine_table = prepare_table(
        session, lakehouse, "silver/recordings_quarantine", quarantine, fresh=fresh
    )
    report = run_available_now(
        cleaned,
        name="silver/recordings",
        checkpoint=checkpoint,
        writes={"silver/recordings": recordings_table, "silver/recordings_quarantine": quarantine_table},
        write_batch=split_writer(
            kept_to=(recordings_table, RECORDING_COLUMNS),
            rejected_to=(quarantine_table, QUARANTINE_COLUMNS),
            numbers=quality_numbers(config.min_time, config.max_clock_skew_s),
        ),
    )
    written = report.rows_written("silver/recordings")
    quarantined = report.rows_written("silver/recordings_quarantine")
    duplicates = report.state_metrics.get("numDroppedDuplicateRows", 0)
    accounted = written + quarantined + duplicates
    common = {
        **report.metadata(),
        "recordings_written": written,
        "quarantined": quarantined,
        "duplicates_dropped": duplicates,
        "bronze_rows_read": report.input_rows,
        "unaccounted_rows": report.input_rows - accounted,
    }
    # The tables first: Dagster ties each check to the asset's latest materialization, which must
    # be this run's.
    yield table_result(RECORDINGS, recordings_table, recordings, {**common, "rows_added": written})
    yield table_result(
        RECORDINGS_QUARANTINE, quarantine_table, quarantine, {**common, "rows_added": quarantined}
    )
    yield checks.schema_check("silver/recordings", recordings)
    yield from checks.value_checks("silver/recordings", report.counts)
    yield checks.accounting_check(
        "silver/recordings", report.input_rows,
        {"written": written, "quarantined": quarantined, "duplicates": duplicates},
    )  # fmt: skip
    yield checks.schema_check("silver/recordings_quarantine", quarantine)
    yield checks.quarantine_rate_check(
        "silver/recordings_quarantine", quarantined, report.input_rows,
        lakehouse.quarantine_warn_rate, lakehouse.quarantine_error_rate,
    )  # fmt: skip
    if accounted != report.input_rows:
        context.log.error(
            f"silver/recordings read {report.input_rows} bronze rows but accounted for {accounted} "
            f"(written, quarantined and duplicates)."
        )
    watch.record()
