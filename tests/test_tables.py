"""The Delta writes behind exactly-once, the commits runs count from, and whole versions for readers."""

import threading

from deltalake import DeltaTable
from pyspark.sql import functions as F

from heartbeat_assets import tables


def rows_of(spark, table, version=None):
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return sorted(tuple(r) for r in reader.load(str(table)).collect())


def test_a_micro_batch_written_again_is_skipped(spark, tmp_path):
    table = tmp_path / "t"
    tables.create_table(spark, table, spark.createDataFrame([], "id int, v string").schema)
    first = spark.createDataFrame([(1, "a"), (2, "b")], "id int, v string")
    tables.append(first, table, query_id="q1", batch_id=0, metadata={"seen": 2})
    attempt = spark.createDataFrame([(3, "c")], "id int, v string")
    tables.append(attempt, table, query_id="q1", batch_id=1, metadata={"seen": 1})
    # Batch 1 runs again after a crash: its write is skipped, nothing doubles.
    tables.append(attempt, table, query_id="q1", batch_id=1, metadata={"seen": 1})
    never_run = spark.range(1).selectExpr("raise_error('a Spark job ran') AS id", "'x' AS v")
    tables.append(never_run, table, query_id="q1", batch_id=0)  # skipped before it is computed
    assert rows_of(spark, table) == [(1, "a"), (2, "b"), (3, "c")]
    # Another query (a new checkpoint) writes its own batch 0.
    tables.append(attempt, table, query_id="q2", batch_id=0)
    assert len(rows_of(spark, table)) == 4

    delta = DeltaTable(str(table))
    assert delta.version() == 3  # the creation and three appends; the skipped writes made no commit
    commits = tables.batch_commits(delta, "q1", [0, 1])
    assert [c["userMetadata"] for c in commits] == [
        {"seen": 2, "query": "q1", "batch": 0},
        {"seen": 1, "query": "q1", "batch": 1},
    ]
    assert [int(c["operationMetrics"]["numOutputRows"]) for c in commits] == [2, 1]
    assert tables.batch_commits(delta, "q1", [1]) == commits[1:]


def test_commits_of_deltas_own_streaming_sink_are_found_by_batch(spark, tmp_path):
    source = tmp_path / "source"
    tables.create_table(spark, source, spark.createDataFrame([], "id long").schema)
    sink = tmp_path / "sink"
    for n in (3, 2):
        spark.range(n).write.format("delta").mode("append").save(str(source))
        query = (
            spark.readStream.format("delta").load(str(source)).writeStream.format("delta")
            .option("checkpointLocation", str(tmp_path / "checkpoint")).trigger(availableNow=True)
            .start(str(sink))
        )  # fmt: skip
        query.awaitTermination()
    batches = [p.batchId for p in query.recentProgress if "addBatch" in p.durationMs]
    (commit,) = tables.batch_commits(DeltaTable(str(sink)), query.id, batches)
    assert int(commit["operationMetrics"]["numOutputRows"]) == 2
    assert tables.batch_commits(DeltaTable(str(sink)), "another query", batches) == []


def test_a_split_batch_records_its_numbers_and_writes_the_quarantine_only_when_needed(spark, tmp_path):
    kept, quarantine = tmp_path / "kept", tmp_path / "quarantine"
    for path in (kept, quarantine):
        tables.create_table(spark, path, spark.createDataFrame([], "id long").schema)

    def split(batch_id, rows):
        batch = spark.range(rows).withColumn("bad", F.col("id") >= 3)
        tables.append_split(
            batch, query_id="q", batch_id=batch_id, rejected=F.col("bad"),
            kept_to=(kept, ["id"]), rejected_to=(quarantine, ["id"]), numbers={"read": F.count("*")},
        )  # fmt: skip

    split(0, 3)  # nothing rejected
    split(1, 5)
    assert DeltaTable(str(quarantine)).version() == 1  # its creation, and batch 1
    (commit,) = tables.batch_commits(DeltaTable(str(quarantine)), "q", [0, 1])
    assert commit["userMetadata"] == {"query": "q", "batch": 1}
    assert [c["userMetadata"]["read"] for c in tables.batch_commits(DeltaTable(str(kept)), "q", [0, 1])] == [
        3,
        5,
    ]
    assert rows_of(spark, kept) == [(0,), (0,), (1,), (1,), (2,), (2,)]
    assert rows_of(spark, quarantine) == [(3,), (4,)]


def test_tables_are_created_once_readable_by_delta_rs(spark, tmp_path):
    table = tmp_path / "t"
    schema = spark.createDataFrame([], "id int, day date").schema
    tables.create_table(spark, table, schema, ["day"], tables.retention_properties(3))
    tables.create_table(spark, table, schema, ["day"])  # exists: no second commit
    delta = DeltaTable(str(table))
    assert delta.version() == 0 and delta.metadata().partition_columns == ["day"]
    # The basic protocol (no table features such as deletion vectors) that every reader supports.
    protocol = delta.protocol()
    assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)
    assert protocol.reader_features is None
    assert delta.metadata().configuration == {
        "delta.enableDeletionVectors": "false",
        "delta.logRetentionDuration": "interval 3 days",
        "delta.deletedFileRetentionDuration": "interval 3 days",
    }
    assert tables.identity(delta) == f"{delta.metadata().id}@0"
    assert tables.load(tmp_path / "none") is None and tables.identity(None) is None


def test_a_reader_polling_a_replaced_table_sees_whole_versions_only(spark, tmp_path):
    """delta-rs reads the table again and again while Spark replaces it: every read is one committed
    version, whole (never empty, missing, or a mix of two)."""
    table = tmp_path / "gold"
    versions = {0: 1000, 1: 3000}  # rows of the two alternating contents, told apart by their ids
    tables.create_table(spark, table, spark.range(0).schema)
    tables.overwrite(spark.range(versions[0]), table, {"v": 0})
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                ids = DeltaTable(str(table)).to_pyarrow_table().column("id").to_pylist()
            except Exception as exc:  # noqa: BLE001 (a failed read is counted, never rows)
                errors.append(exc)
                continue
            seen.append(sorted(ids))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 9):
            tables.overwrite(spark.range(versions[version % 2]), table, {"v": version})
    finally:
        stop.set()
        thread.join()
    wholes = [list(range(n)) for n in versions.values()]
    assert seen and all(ids in wholes for ids in seen)
    assert not errors, errors[:3]
    assert tables.last_commit(DeltaTable(str(table)))["userMetadata"] == {"v": 8}
    # Every version stays readable (time travel), until the retention lets VACUUM remove it.
    assert len(rows_of(spark, table, version=1)) == versions[0]  # version 0 is the empty table's creation
    assert len(rows_of(spark, table, version=2)) == versions[1]


def blocked_until(started, go, data_type="int"):
    """A UDF that marks `started`, then waits for `go`: holds a write open between its transaction's
    start and its commit."""

    def wait(value):
        import time as _time
        from pathlib import Path as _Path

        _Path(started).touch()
        deadline = _time.monotonic() + 120
        while not _Path(go).exists() and _time.monotonic() < deadline:
            _time.sleep(0.05)
        return value

    return F.udf(wait, data_type, useArrow=False)


def write_while_a_double_commits(tmp_path, write, double, data_type="int"):
    """Run `write` in a thread until its data job is underway, then `double` (the same batch, written by
    another writer) to completion, then let `write` commit. What `write` raised, if anything."""
    started, go = tmp_path / "started", tmp_path / "go"
    raised = []

    def run():
        try:
            write(blocked_until(str(started), str(go), data_type))
        except Exception as exc:  # noqa: BLE001 (handed to the test)
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        for _ in range(1200):
            if started.exists() or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert started.exists(), raised
        double()
    finally:
        go.touch()
        thread.join()
    return raised


def append_while_its_double_commits(session, root):
    """Batch 0 of query q (three rows) appended to a new table at `root`/t while a double of it commits:
    the table, and what the append raised."""
    table = root / "t"
    tables.create_table(session, table, session.createDataFrame([], "id int").schema)
    rows = session.range(0, 3, 1, numPartitions=1).selectExpr("CAST(id AS int) AS id")  # one task slot of two

    def write(blocked):
        tables.append(rows.select(blocked("id").alias("id")), table, query_id="q", batch_id=0)

    return table, write_while_a_double_commits(
        root, write, lambda: tables.append(rows, table, query_id="q", batch_id=0)
    )


def test_a_batch_whose_double_commits_first_is_written_once(spark, tmp_path):
    """A killed run's writer of batch 0 (left running on a Connect server) commits while the next run
    writes batch 0 again: Delta's conflict (DELTA_CONCURRENT_TRANSACTION) makes the run's write read that
    commit and skip, and the batch is in the table once."""
    table, raised = append_while_its_double_commits(spark, tmp_path)
    assert not raised, raised
    assert rows_of(spark, table) == [(0,), (1,), (2,)]
    delta = DeltaTable(str(table))
    assert delta.version() == 1 and len(tables.batch_commits(delta, "q", [0])) == 1


def test_a_replacement_whose_double_commits_first_is_made_again(spark, tmp_path):
    """A killed run's replacement of a gold table (finished by a Connect server) commits while the
    next run replaces the table: Delta's conflict makes the run replace it again, so its newer rows win."""
    table = tmp_path / "gold"
    tables.create_table(spark, table, spark.createDataFrame([], "id int").schema)
    newer = spark.range(0, 3, 1, numPartitions=1).selectExpr("CAST(id AS int) AS id")

    def replace(blocked):
        tables.overwrite(newer.select(blocked("id").alias("id")), table, {"build": "newer"})

    older = spark.createDataFrame([(7,)], "id int")
    raised = write_while_a_double_commits(
        tmp_path, replace, lambda: tables.overwrite(older, table, {"build": "older"})
    )
    assert not raised, raised
    assert rows_of(spark, table) == [(0,), (1,), (2,)]
    assert tables.last_commit(DeltaTable(str(table)))["userMetadata"] == {"build": "newer"}
