"""Silver transformations on tiny DataFrames, with the exact rows expected."""

from datetime import date, datetime

from heartbeat_assets import tables
from heartbeat_assets.batch_writers import current_patients, merge_patients
from heartbeat_assets.silver import clean_recordings, deduplicate, validate_recordings
from tests.test_tables import write_while_a_double_commits

LANDED = datetime(2024, 1, 2)
BRONZE = (
    "device_id int, mrn bigint, time double, heartrate double, source_file string, source_line int, "
    "source_element int, source_modified_at timestamp"
)


def bronze(spark, *rows):
    return spark.createDataFrame(
        [(*row, f"file:/f{i}.json", i + 1, None, LANDED) for i, row in enumerate(rows)], BRONZE
    )


def test_validation_reasons(spark):
    landed = LANDED.timestamp()
    rows = bronze(
        spark,
        (1, 10, 1_704_067_200.0, 72.0),  # valid
        (1, 10, 1_704_067_201.0, 300.0),  # valid: the upper bound is included
        (1, 10, 1_704_067_202.0, 0.0),
        (1, 10, 1_704_067_203.0, -5.0),
        (1, 10, 1_704_067_204.0, 300.5),
        (1, 10, 1_704_067_205.0, float("nan")),
        (1, 10, 1_704_067_206.0, float("inf")),
        (1, 10, 1_704_067_200_000.0, 70.0),  # milliseconds by mistake
        (1, 10, landed + 86_400 + 1, 70.0),  # after the file landed, beyond the clock-skew margin
        (1, 10, 1.0, 70.0),  # 1970
        (1, 10, float("nan"), -1.0),
    )
    got = [(r.source_line, r.reason) for r in validate_recordings(rows).orderBy("source_line").collect()]
    assert got == [
        (1, None),
        (2, None),
        (3, "invalid_heartrate"),
        (4, "invalid_heartrate"),
        (5, "invalid_heartrate"),
        (6, "invalid_heartrate"),
        (7, "invalid_heartrate"),
        (8, "invalid_time"),
        (9, "invalid_time"),
        (10, "invalid_time"),
        (11, "invalid_heartrate;invalid_time"),
    ]


def test_dedupe_keeps_one_valid_recording_and_every_rejected_one(spark):
    rows = validate_recordings(
        bronze(
            spark,
            (1, 10, 1_704_067_200.0, 72.0),
            (1, 10, 1_704_067_200.0, 72.0),  # same key: a duplicate
            (1, 10, 1_704_067_200.0, -1.0),  # same key but invalid: kept for quarantine
            (1, 10, 1_704_067_200.0, -1.0),  # an invalid repeat is kept too
            (2, 10, 1_704_067_200.0, 72.0),  # another device
            (1, 10, 1_704_067_200.5, 72.0),  # another time
        )
    )
    got = sorted((r.device_id, r.time, r.heartrate, r.reason) for r in deduplicate(rows).collect())
    assert got == [
        (1, 1_704_067_200.0, -1.0, "invalid_heartrate"),
        (1, 1_704_067_200.0, -1.0, "invalid_heartrate"),
        (1, 1_704_067_200.0, 72.0, None),
        (1, 1_704_067_200.5, 72.0, None),
        (2, 1_704_067_200.0, 72.0, None),
    ]


def test_clean_recordings_enriches_with_name_utc_time_and_date(spark):
    patients = spark.createDataFrame([(10, "Ann")], "mrn bigint, name string")
    rows = bronze(spark, (1, 10, 1_709_337_599.25, 60.0), (2, 99, 1_709_337_601.0, 80.0))
    got = sorted(
        (r.device_id, r.mrn, r.patient_name, r.recorded_at, r.date)
        for r in clean_recordings(rows, patients).collect()
    )
    assert got == [
        (1, 10, "Ann", datetime(2024, 3, 1, 23, 59, 59, 250000), date(2024, 3, 1)),
        (2, 99, None, datetime(2024, 3, 2, 0, 0, 1), date(2024, 3, 2)),
    ]


def test_current_patients_newest_file_then_name_then_line_wins(spark):
    schema = (
        "mrn string, name string, _extra string, source_file string, source_line int, "
        "source_modified_at timestamp"
    )
    old, new = datetime(2024, 1, 1), datetime(2024, 1, 2)
    rows = spark.createDataFrame(
        [
            ("1", "Ann", None, "file:/b.csv", 1, old),
            ("1", "Annie", None, "file:/a.csv", 1, new),  # newer file wins over a later name
            ("2", "Bob", None, "file:/a.csv", 2, old),
            ("2", "Bobby", None, "file:/b.csv", 2, old),  # same time: the later name wins
            ("3", "Cy", None, "file:/a.csv", 3, old),
            ("3", "Cyrus", None, "file:/a.csv", 4, old),  # same file: the later line wins
            ("4", "Dee", None, "file:/a.csv", 5, old),
            ("4", "", None, "file:/a.csv", 6, new),  # an empty name is not an update
            ("x5", "Bad", None, "file:/a.csv", 7, old),
            ("6", "Too", "Many", "file:/a.csv", 8, old),
        ],
        schema,
    )
    assert sorted(tuple(r) for r in current_patients(rows).select("mrn", "name").collect()) == [
        (1, "Annie"),
        (2, "Bobby"),
        (3, "Cyrus"),
        (4, "Dee"),
    ]


def test_merging_batches_in_any_order_keeps_the_newest_row_of_each_patient(spark, tmp_path):
    schema = (
        "mrn string, name string, _extra string, source_file string, source_line int, "
        "source_modified_at timestamp"
    )
    old, new = datetime(2024, 1, 1), datetime(2024, 1, 2)
    newer = spark.createDataFrame(
        [("1", "Annie", None, "file:/b.csv", 1, new), ("2", "Bob", None, "file:/b.csv", 2, new)], schema
    )
    older = spark.createDataFrame(
        [("1", "Ann", None, "file:/a.csv", 1, old), ("3", "Cy", None, "file:/a.csv", 2, old)], schema
    )
    table = tmp_path / "patients"
    tables.create_table(spark, table, current_patients(newer).schema)
    merge_patients(newer, table, query_id="q", batch_id=0)
    merge_patients(older, table, query_id="q", batch_id=1)  # a late file with an older name
    merge_patients(newer, table, query_id="q", batch_id=0)  # a batch merged again changes nothing
    dimension = spark.read.format("delta").load(str(table)).select("mrn", "name", "source_file")
    assert sorted(tuple(r) for r in dimension.collect()) == [
        (1, "Annie", "file:/b.csv"),
        (2, "Bob", "file:/b.csv"),
        (3, "Cy", "file:/a.csv"),
    ]


def test_a_merge_whose_double_commits_first_changes_nothing_more(spark, tmp_path):
    """A killed run's MERGE of a patients batch (left running on a Connect server) commits while the
    next run merges the same batch: Delta's conflict makes the run merge again, which finds every row
    in place."""
    schema = (
        "mrn string, name string, _extra string, source_file string, source_line int, "
        "source_modified_at timestamp"
    )
    batch = spark.createDataFrame(
        [
            ("1", "Ann", None, "file:/a.csv", 1, datetime(2024, 1, 1)),
            ("2", "Bob", None, "file:/a.csv", 2, datetime(2024, 1, 1)),
        ],
        schema,
    ).coalesce(1)  # one task slot of two: the double needs the other
    table = tmp_path / "patients"
    tables.create_table(spark, table, current_patients(batch).schema)

    def merge(blocked):
        merge_patients(batch.withColumn("name", blocked("name")), table, query_id="q", batch_id=0)

    raised = write_while_a_double_commits(
        tmp_path, merge, lambda: merge_patients(batch, table, query_id="q", batch_id=0), data_type="string"
    )
    assert not raised, raised
    dimension = spark.read.format("delta").load(str(table)).select("mrn", "name")
    assert sorted(tuple(r) for r in dimension.collect()) == [(1, "Ann"), (2, "Bob")]
