"""Bronze: every landed recording and patient row as received, and every unreadable element kept aside."""

import functools
import gzip
import operator
import re
import time
import zlib

from dagster import AssetExecutionContext, AssetKey, AssetSpec, asset, multi_asset
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from heartbeat_assets import checks, tables
from heartbeat_assets.batch_writers import split_writer
from heartbeat_assets.streaming import (
    InputWatch,
    prepare_table,
    run_available_now,
    start_fresh,
    table_result,
    unchanged_results,
)
from resources import LakehouseResource, SparkSessionResource, storage

RECORDING_FIELDS = {"device_id": "int", "mrn": "bigint", "time": "double", "heartrate": "double"}
RECORDING_SCHEMA = ", ".join(f"{name} {kind}" for name, kind in RECORDING_FIELDS.items())

RECORDINGS_GLOB = "*.{json,json.gz}"
PATIENTS_GLOB = "*.csv"

# Characters Spark's file source cannot read in a file name: glob characters make it read other
# files of the folder a second time, and ':' fails the query.
UNREADABLE_NAME_CHARS = re.compile(r"[\[\]{}*?\\:]")

# Standard JSON: Spark would also take 'single quoted' strings. NaN and Infinity stay readable (the
# simulator's and many devices' encoders write them); silver rejects them as heart rates.
STRICT_JSON = {"allowSingleQuotes": "false"}

#: Columns of bronze/recordings (besides the recording fields).
LINEAGE = ["source_file", "source_line", "source_element", "source_modified_at", "ingested_at"]


MAX_BYTES_PER_BATCH = 128 * 2**20

#: The characters of a blank line (what `\s` matches in a regular expression).
BLANK = " \t\n\u000b\f\r"


def read_landing(spark: SparkSession, folder, glob: str) -> DataFrame:
    """Stream of landed files, one row per file: `value` (whole text), `source_file`, `source_modified_at`.

    Whole-file reads let a file be either JSON Lines or one (pretty-printed) JSON array; `.gz` files
    are decompressed by Spark. Names starting with `.` or `_` are in progress and skipped.
    """
    return (
        spark.readStream.format("text")
        .option("wholetext", True)
        .option("pathGlobFilter", glob)
        # Spark forgets files older than maxFileAge relative to the newest one; a file renamed in
        # keeps its old modification time, so it would be skipped. Remember every file.
        .option("maxFileAge", "36500d")
        # Corrupt .gz files are moved aside before the query (reject_corrupt_gzip); one that lands
        # while it runs is skipped here rather than failing the run, and rejected by the next run.
        .option("ignoreCorruptFiles", True)
        # Micro-batches of at most this many bytes of landed files: a backlog is ingested in a few
        # batches of bounded memory, not one batch of everything (nor the seeds' one file each).
        .option("maxBytesPerTrigger", MAX_BYTES_PER_BATCH)
        .load(str(folder))
        .select(
            "value",
            F.col("_metadata.file_path").alias("source_file"),
            F.col("_metadata.file_modification_time").alias("source_modified_at"),
        )
    )


REJECTED_FOLDER = "_rejected"


def reject_corrupt_gzip(folder, mark_file) -> list:
    """Move landed `.gz` files that do not decompress to `<folder>/_rejected/`; return their new paths.

    Only files changed since the last check are read (a change-time mark in `mark_file`).
    """
    mark = int(mark_file.read_text()) if mark_file.exists() else -1
    started = time.time_ns()
    rejected = []
    for entry in storage.list_files(folder):
        if not entry.name.endswith(".gz") or entry.name.startswith((".", "_")) or entry.changed_ns <= mark:
            continue
        path = folder / entry.name
        try:
            with path.open("rb") as raw, gzip.open(raw) as stream:
                while stream.read(1 << 20):
                    pass
        except (OSError, EOFError, zlib.error):
            target = folder / REJECTED_FOLDER / entry.name
            storage.move(path, target)
            rejected.append(target)
    # Files renamed in while the folder was read have a change time after `started` (less a margin
    # for coarse file system clocks, or for uploads to S3 still under way): the next check reads them.
    storage.write_text_atomic(mark_file, str(started - storage.change_margin_ns(folder)))
    return rejected


def rejected_file_rows(spark: SparkSession, files: list) -> DataFrame:
    """One bronze quarantine row per rejected file."""
    rows = [
        (None, "corrupt_gzip", storage.uri(path), None, None, storage.modified_at(path)) for path in files
    ]
    schema = (
        "raw string, reason string, source_file string, source_line int, source_element int, "
        "source_modified_at timestamp"
    )
    return spark.createDataFrame(rows, schema).withColumn("ingested_at", F.current_timestamp())


def rename_unreadable_files(folder) -> list[tuple[str, str]]:
    """Give landed files whose names Spark cannot read a percent-encoded name; return (old, new) pairs."""
    renamed = []
    for entry in storage.list_files(folder):
        if UNREADABLE_NAME_CHARS.search(entry.name) and not entry.name.startswith((".", "_")):
            new_name = UNREADABLE_NAME_CHARS.sub(lambda m: f"%{ord(m.group()):02X}", entry.name)
            storage.move(folder / entry.name, folder / new_name)
            renamed.append((entry.name, new_name))
    return renamed


def _lines(files: DataFrame) -> DataFrame:
    """One row per non-blank line: `line` (1-based `source_line`) with the file's lineage columns."""
    return (
        files.select("*", F.posexplode(F.split("value", r"\r?\n")).alias("pos", "line"))
        .where(F.col("line").rlike(r"\S"))
        .select(
            "line",
            (F.col("pos") + 1).alias("source_line"),
            "source_file",
            "source_modified_at",
        )
    )


def parse_recordings(files: DataFrame) -> DataFrame:
    """Split landed recording files into elements and parse each one.

    Input: one row per file (`value`, `source_file`, `source_modified_at`). Output: one row per JSON
    Lines line or array element, with the recording fields, `_rescued` (unknown fields as a JSON
    object string), `raw` (the element's text), lineage columns and `reason`: null for a well-formed
    recording, else why it is not one (several reasons joined by `;`).
    """
    # A JSON array spread over many lines is one document; any other file is read line by line,
    # which also salvages the complete elements of a truncated array. Spark's JSON parser ignores
    # what follows the first value, so a file whose first line is a whole array is JSON Lines.
    # Plain string functions, not regular expressions: a regex runs over every line of every file
    # (a quarter of bronze's time went to splitting lines on `\r?\n` and matching `^\s*\[`).
    value = F.col("value")
    files = files.withColumn(  # a UTF-8 byte order mark
        "value", F.when(value.startswith("\ufeff"), F.expr("substring(value, 2)")).otherwise(value)
    )
    text = F.ltrim("value", F.lit(BLANK))
    whole_file_array = (
        text.startswith("[")
        & F.from_json(F.substring_index(text, "\n", 1), "array<string>", STRICT_JSON).isNull()
        & F.from_json("value", "array<string>", STRICT_JSON).isNotNull()
    )
    line = F.col("document")
    documents = (
        files.select(
            "*",
            F.posexplode(F.when(whole_file_array, F.array("value")).otherwise(F.split("value", "\n"))).alias(
                "pos", "document"
            ),
        )
        # A line ends at `\n`; a `\r` before it (Windows line ends) is not part of the line.
        .withColumn(
            "document",
            F.when(line.endswith("\r"), F.expr("substring(document, 1, length(document) - 1)")).otherwise(
                line
            ),
        )
        .where(F.length(F.ltrim(line, F.lit(BLANK))) > 0)
        .select("document", (F.col("pos") + 1).alias("source_line"), "source_file", "source_modified_at")
    )
    # Whatever depends on a whole document is computed once per document, before the explode: after
    # it, each of an array's elements would carry the document and parse it again (quadratic time).
    is_array = F.ltrim("document", F.lit(BLANK)).startswith("[")
    array = F.col("_array")
    documents = documents.select(
        "*", F.when(is_array, F.from_json("document", "array<string>", STRICT_JSON)).alias("_array")
    ).select(
        F.when(array.isNotNull(), array).otherwise(F.array("document")).alias("_elements"),
        (is_array & array.isNull()).alias("_malformed_array"),
        array.isNotNull().alias("_is_array"),
        "source_line",
        "source_file",
        "source_modified_at",
    )
    elements = documents.select("*", F.posexplode("_elements").alias("_index", "raw")).select(
        F.coalesce("raw", F.lit("null")).alias("raw"),  # a JSON null element reads as a SQL NULL
        "source_file",
        "source_line",
        F.when(F.col("_is_array"), F.col("_index") + 1).cast("int").alias("source_element"),
        "source_modified_at",
        "_malformed_array",
    )

    # Every element is parsed once, into the recording's types. Only elements that are not clean
    # recordings are parsed again, to tell why (each parse costs as much as the rest of bronze).
    typed = F.from_json(
        "raw",
        f"{RECORDING_SCHEMA}, _corrupt string",
        {**STRICT_JSON, "mode": "PERMISSIVE", "columnNameOfCorruptRecord": "_corrupt"},
    )
    parsed = elements.select("*", typed.alias("_t"))
    as_text = F.from_json("raw", ", ".join(f"{name} string" for name in RECORDING_FIELDS), STRICT_JSON)
    as_object = F.from_json("raw", "map<string, variant>", STRICT_JSON)

    clean = (
        F.col("_t._corrupt").isNull()
        & ~F.col("_malformed_array")
        & ~F.col("raw").contains("\ufffd")
        & ~functools.reduce(operator.or_, [F.col(f"_t.{name}").isNull() for name in RECORDING_FIELDS])
    )
    field_problems = [_field_problem(name, as_text, as_object) for name in RECORDING_FIELDS]
    reason = F.when(clean, F.lit(None).cast("string")).otherwise(
        F.when(F.col("raw").contains("\ufffd"), F.lit("not_utf8")).otherwise(
            F.when(F.col("_malformed_array") | as_object.isNull(), F.lit("malformed_json")).otherwise(
                F.nullif(F.concat_ws(";", *field_problems), F.lit(""))
            )
        )
    )
    # Every key in JSON is followed by a `:`. So a clean recording with no more `:` than it has
    # fields has no other key, and is not scanned again: most elements are such.
    colons = F.length("raw") - F.length(F.replace("raw", F.lit(":"), F.lit("")))
    no_other_key = clean & (colons == len(RECORDING_FIELDS))
    # Else the top-level keys of an element (a strict scan: null where the parse allows more, e.g.
    # NaN) tell whether it has fields beyond the recording's; only then are they rescued.
    unknown_keys = F.array_except(F.json_object_keys("raw"), F.array(*map(F.lit, RECORDING_FIELDS)))
    extras = F.map_filter(as_object, lambda key, _: ~key.isin(*RECORDING_FIELDS))
    rescued = F.when(no_other_key | (F.size(unknown_keys) == 0), F.lit(None).cast("string")).otherwise(
        F.when(F.size(extras) > 0, F.to_json(extras))
    )
    return parsed.select(
        *[F.col(f"_t.{name}").alias(name) for name in RECORDING_FIELDS],
        rescued.alias("_rescued"),
        "raw",
        reason.alias("reason"),
        "source_file",
        "source_line",
        "source_element",
        "source_modified_at",
    )


def _field_problem(name: str, as_text: Column, as_object: Column) -> Column:
    return F.when(
        F.col(f"_t.{name}").isNull(),
        F.when(as_text[name].isNotNull(), F.lit(f"wrong_type:{name}"))
        .when(F.array_contains(F.map_keys(as_object), name), F.lit(f"null_field:{name}"))
        .otherwise(F.lit(f"missing_field:{name}")),
    )


def parse_patients(files: DataFrame) -> DataFrame:
    """One row per patient CSV data line: `mrn` and `name` as received (strings), with lineage.

    A first line reading `mrn,name` is the header and is skipped; a file without it loses no row.
    Fields beyond the second land in `_extra`.
    """
    lines = _lines(files)
    is_header = (F.col("source_line") == 1) & (
        F.lower(F.regexp_replace(F.trim("line"), "^\ufeff|\\s", "")) == "mrn,name"
    )
    fields = F.from_csv("line", "mrn string, name string, _extra string", {"mode": "PERMISSIVE"})
    return (
        lines.where(~is_header)
        .select("*", fields.alias("_f"))
        .select(
            F.trim("_f.mrn").alias("mrn"),
            F.trim("_f.name").alias("name"),
            F.col("_f._extra").alias("_extra"),
            F.col("line").alias("raw"),
            "source_file",
            "source_line",
            "source_modified_at",
        )
    )


def _rename_unreadable_files(context: AssetExecutionContext, folder) -> None:
    for old, new in rename_unreadable_files(folder):
        context.log.warning(
            f"Renamed landed file {old!r} to {new!r} in {folder}: Spark cannot read that name."
        )


RECORDING_COLUMNS = [*RECORDING_FIELDS, "_rescued", *LINEAGE]
QUARANTINE_COLUMNS = ["raw", "reason", *LINEAGE]

RECORDINGS = AssetKey(["bronze", "recordings"])
RECORDINGS_QUARANTINE = AssetKey(["bronze", "recordings_quarantine"])
PATIENTS = AssetKey(["bronze", "patients"])


@multi_asset(
    specs=[
        AssetSpec(
            RECORDINGS,
            description="Every well-formed recording as received, with its source file and ingestion time.",
            group_name="bronze",
        ),
        AssetSpec(
            RECORDINGS_QUARANTINE,
            description="Every landed line or array element that is not a well-formed recording, and why.",
            group_name="bronze",
        ),
    ],
    check_specs=[
        checks.schema_spec("bronze/recordings"),
        checks.accounting_spec("bronze/recordings"),
        checks.schema_spec("bronze/recordings_quarantine"),
        checks.quarantine_rate_spec("bronze/recordings_quarantine"),
    ],
    pool="heartbeat_lakehouse",
)
def bronze_recordings(
    context: AssetExecutionContext, spark: SparkSessionResource, lakehouse: LakehouseResource
):
    """Ingest new files of landing/recordings into bronze/recordings and bronze/recordings_quarantine."""
    fresh = start_fresh(context, lakehouse, ["bronze/recordings", "bronze/recordings_quarantine"])
    landing = lakehouse.recordings_landing
    _rename_unreadable_files(context, landing)
    checkpoint = lakehouse.checkpoint("bronze/recordings")
    for path in reject_corrupt_gzip(landing, checkpoint / "_gzip_checked_ctime_ns"):
        context.log.warning(f"{path.name} is not a valid gzip file; moved to {path.parent}.")
    # The rejected folder is marked too: a run that moved a file there and died before recording it
    # leaves the landing folder as it was before the file landed.
    watch = InputWatch(checkpoint, landing=[landing, landing / REJECTED_FOLDER])
    if (skipped := unchanged_results(context, watch, [RECORDINGS, RECORDINGS_QUARANTINE])) is not None:
        yield from skipped
        return
    session = spark.spark_session
    # Parsed in the stream, so the plan is built once per run (each micro-batch gets it from Spark);
    # `ingested_at` is then the micro-batch's time.
    elements = parse_recordings(read_landing(session, landing, RECORDINGS_GLOB))
    elements = elements.withColumn("ingested_at", F.current_timestamp())
    recordings = elements.select(*RECORDING_COLUMNS)
    quarantine = elements.select(*QUARANTINE_COLUMNS)
    recordings_table = prepare_table(session, lakehouse, "bronze/recordings", recordings, fresh=fresh)
    quarantine_table = prepare_table(
        session, lakehouse, "bronze/recordings_quarantine", quarantine, fresh=fresh
    )
    rejected = record_rejected_files(session, landing / REJECTED_FOLDER, quarantine_table)

    report = run_available_now(
        elements,
        name="bronze/recordings",
        checkpoint=checkpoint,
        writes={"bronze/recordings": recordings_table, "bronze/recordings_quarantine": quarantine_table},
        write_batch=split_writer(
            kept_to=(recordings_table, RECORDING_COLUMNS),
            rejected_to=(quarantine_table, QUARANTINE_COLUMNS),
            numbers={
                "elements_read": F.count("*"),
                "max:newest_file_modified_at": F.unix_micros(F.max("source_modified_at")) / 1e6,
            },
            raw_of_rejected_only=True,
        ),
    )
    read = report.count("elements_read")
    written = report.rows_written("bronze/recordings")
    quarantined = report.rows_written("bronze/recordings_quarantine")
    common = {
        **report.metadata(),
        "recordings_written": written,
        "quarantined": quarantined,
        "files_read": report.input_rows,
        "files_rejected": rejected,
        **report.maxima,  # newest_file_modified_at
    }
    yield table_result(RECORDINGS, recordings_table, recordings, {**common, "rows_added": written})
    yield table_result(
        RECORDINGS_QUARANTINE, quarantine_table, quarantine, {**common, "rows_added": quarantined + rejected}
    )
    yield checks.schema_check("bronze/recordings", recordings)
    yield checks.accounting_check("bronze/recordings", read, {"written": written, "quarantined": quarantined})
    yield checks.schema_check("bronze/recordings_quarantine", quarantine)
    yield checks.quarantine_rate_check(
        "bronze/recordings_quarantine", quarantined + rejected, read + rejected,
        lakehouse.quarantine_warn_rate, lakehouse.quarantine_error_rate,
    )  # fmt: skip
    watch.record()


def record_rejected_files(spark: SparkSession, rejected_folder, quarantine) -> int:
    """Add a quarantine row for each file in the rejected folder that has none yet; return how many.

    Each file's row is an idempotent write of its own (`txnAppId` from the file's name): recorded
    once, however often a run is retried, and again into a quarantine made anew.
    """
    files = [rejected_folder / name for name in sorted(e.name for e in storage.list_files(rejected_folder))]
    if not files:
        return 0
    table = tables.load(quarantine)
    added = 0
    for path in files:
        app_id = f"{REJECTED_FOLDER}/{path.name}"
        if table.transaction_version(app_id) is None:
            tables.append(rejected_file_rows(spark, [path]), quarantine, query_id=app_id, batch_id=0)
            added += 1
    return added


@asset(
    key=PATIENTS,
    group_name="bronze",
    description="Patient rows as received from landing/patients, with source file, line and ingestion time.",
    check_specs=[checks.schema_spec("bronze/patients")],
    pool="heartbeat_lakehouse",
)
def bronze_patients(
    context: AssetExecutionContext, spark: SparkSessionResource, lakehouse: LakehouseResource
):
    """Ingest new files of landing/patients into bronze/patients (Delta's streaming sink)."""
    fresh = start_fresh(context, lakehouse, ["bronze/patients"])
    _rename_unreadable_files(context, lakehouse.patients_landing)
    checkpoint = lakehouse.checkpoint("bronze/patients")
    watch = InputWatch(checkpoint, landing=[lakehouse.patients_landing])
    if (skipped := unchanged_results(context, watch, [PATIENTS])) is not None:
        yield from skipped
        return
    session = spark.spark_session
    landed = read_landing(session, lakehouse.patients_landing, PATIENTS_GLOB)
    rows = parse_patients(landed).withColumn("ingested_at", F.current_timestamp())
    table = prepare_table(session, lakehouse, "bronze/patients", rows, fresh=fresh)
    report = run_available_now(
        rows, name="bronze/patients", checkpoint=checkpoint, writes={"bronze/patients": table}
    )
    written = report.rows_written("bronze/patients")
    metadata = {**report.metadata(), "files_read": report.input_rows, "rows_written": written}
    yield table_result(PATIENTS, table, rows, {**metadata, "rows_added": written})
    yield checks.schema_check("bronze/patients", rows)
    watch.record()
