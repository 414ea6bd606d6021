"""The idempotent batch writers behind exactly-once, and the atomic replace readers rely on."""

import datetime
import threading

from heartbeat_assets.tables import append_batch, data_files, ensure_exists, read_lineage, replace_table


def rows_of(spark, table):
    return sorted(tuple(r) for r in spark.read.parquet(str(table)).collect())


def test_append_batch_again_replaces_the_earlier_attempt(spark, tmp_path):
    table = tmp_path / "t"
    first = spark.createDataFrame([(1, "a"), (2, "b")], "id int, v string")
    assert append_batch(first, table, batch_id=0) == 2
    attempt = spark.createDataFrame([(3, "c")], "id int, v string")
    append_batch(attempt, table, batch_id=1)
    # Batch 1 runs again after a crash (with its full output this time): nothing doubles.
    retry = spark.createDataFrame([(3, "c"), (4, "d")], "id int, v string")
    assert append_batch(retry, table, batch_id=1) == 2
    assert rows_of(spark, table) == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
    assert not (table / "_staging" / "batch-1").exists()


def test_append_batch_known_empty_runs_no_job_and_clears_an_earlier_attempt(spark, tmp_path):
    table = tmp_path / "t"
    rows = spark.createDataFrame([(1, "a")], "id int, v string")
    append_batch(rows, table, batch_id=0)
    append_batch(rows, table, batch_id=1)  # an earlier attempt of batch 1 ...
    (table / "_staging" / "rows-b000000000001").mkdir(parents=True)  # ... that crashed while staging
    never_run = spark.range(1).selectExpr("raise_error('a Spark job ran') AS id")  # fails if computed
    assert append_batch(never_run, table, batch_id=1, known_empty=True) == 0
    assert rows_of(spark, table) == [(1, "a")]
    assert not (table / "_staging" / "rows-b000000000001").exists()


def test_append_batch_partitioned_and_empty(spark, tmp_path):
    table = tmp_path / "t"
    schema = "id int, day string"
    assert append_batch(spark.createDataFrame([], schema), table, 0, partition_by=["day"]) == 0
    assert data_files(table) == []
    append_batch(spark.createDataFrame([(1, "x"), (2, "y")], schema), table, 1, partition_by=["day"])
    append_batch(spark.createDataFrame([], schema), table, 2, partition_by=["day"])
    assert rows_of(spark, table) == [(1, "x"), (2, "y")]
    assert sorted(p.parent.name for p in data_files(table)) == ["day=x", "day=y"]


def test_a_table_without_rows_exists_with_its_schema_until_rows_arrive(spark, tmp_path):
    table = tmp_path / "t"
    schema = "id int, day date"
    ensure_exists(spark.createDataFrame([], schema), table, partition_by=["day"])
    assert spark.read.parquet(str(table)).schema.simpleString() == "struct<id:int,day:date>"
    assert spark.read.parquet(str(table)).count() == 0
    ensure_exists(spark.createDataFrame([], schema), table, partition_by=["day"])  # no second file
    assert len(data_files(table)) == 1
    day = datetime.date(2024, 5, 1)
    append_batch(spark.createDataFrame([(1, day)], schema), table, 0, partition_by=["day"])
    assert [p.parent.name for p in data_files(table)] == ["day=2024-05-01"]
    assert sorted(p.name for p in table.iterdir() if not p.name.startswith("_")) == ["day=2024-05-01"]

    plain = tmp_path / "plain"
    ensure_exists(spark.createDataFrame([], "id int"), plain)
    replace_table(spark.createDataFrame([(5,)], "id int"), plain, {})
    assert rows_of(spark, plain) == [(5,)] and len(data_files(plain)) == 1


def test_replace_table_is_never_missing_empty_or_partial_for_a_reader(spark, tmp_path):
    """A reader polling the table during replacements gets the old or the new table, whole.

    pyarrow looks up a file's size, then opens it by path; if the rename lands in between it reads the
    new file with the old size and raises (documented in the README). It never returns rows of a
    missing, empty or half-written table.
    """
    import pyarrow.parquet as pq

    table = tmp_path / "gold"
    sizes = [1000, 3000]
    replace_table(spark.range(sizes[0]).toDF("id"), table, {"v": 0})
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(pq.read_table(str(table)).num_rows)
            except (OSError, ValueError) as exc:  # a torn read raises, it never returns rows
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 9):
            replace_table(spark.range(sizes[version % 2]).toDF("id"), table, {"v": version})
    finally:
        stop.set()
        thread.join()
    assert seen and set(seen) <= set(sizes)
    assert len(errors) <= len(seen) // 10, errors[:3]
    assert read_lineage(table) == {"v": 8, "rows": 1000}
    assert [p.name for p in data_files(table)] == ["part-00000.parquet"]
