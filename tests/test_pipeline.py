"""End to end through Dagster: generated data with faults, in waves, against the independent oracle."""

import math

from deltalake import DeltaTable

from heartbeat_assets import silver, tables
from heartbeat_assets.simulator import Faults, Simulator, land_file
from resources import TABLES
from tests import oracle
from tests.conftest import assert_readers_agree


def snapshot_tables(root) -> dict[str, tuple[int, int]]:
    lakehouse = root / "lakehouse"
    return {
        str(path.relative_to(lakehouse)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in lakehouse.rglob("*")
        if path.is_file()
    }


def assert_gold_matches_oracle(lakehouse):
    expected = oracle.compute(lakehouse.root)

    by_patient = {
        r["mrn"]: (r["patient_name"], r["avg_heartrate"], r["count"])
        for r in lakehouse.read("gold/heartrate_by_patient")
    }
    assert by_patient == oracle.heartrate_by_patient(expected)

    daily = {
        (r["mrn"], r["date"]): (r["patient_name"], r["avg_heartrate"], r["count"])
        for r in lakehouse.read("gold/daily_patient_avg")
    }
    want_daily = oracle.daily_patient_avg(expected)
    assert daily.keys() == want_daily.keys()
    for key, (name, avg, count) in want_daily.items():
        assert daily[key][0] == name and daily[key][2] == count
        assert math.isclose(daily[key][1], avg, rel_tol=1e-12), key

    alerts = {
        (r["device_id"], int(r["window_start"].timestamp()), r["readings"])
        for r in lakehouse.read("gold/device_signal_loss")
    }
    assert alerts == oracle.device_signal_loss(expected)
    return expected


def assert_silver_matches_oracle(lakehouse, expected):
    silver = lakehouse.read("silver/recordings")
    keys = [(r["device_id"], r["mrn"], r["recorded_at"]) for r in silver]
    assert len(keys) == len(set(keys)), "duplicate recordings in silver"
    assert len(silver) == len(expected.silver)
    assert {(r["device_id"], r["mrn"], r["heartrate"]) for r in silver} == {
        (r["device_id"], r["mrn"], r["heartrate"]) for r in expected.silver.values()
    }
    assert len(lakehouse.read("silver/recordings_quarantine")) == expected.silver_bad
    assert len(lakehouse.read("bronze/recordings")) == len(expected.bronze)
    assert len(lakehouse.read("bronze/recordings_quarantine")) == expected.bronze_bad


def assert_run_accounts_for_every_row(lakehouse, result):
    bronze = lakehouse.materialization_metadata(result, "bronze/recordings")
    assert bronze["elements_read"] == bronze["recordings_written"] + bronze["quarantined"]
    silver = lakehouse.materialization_metadata(result, "silver/recordings")
    assert silver["bronze_rows_read"] == bronze["recordings_written"]
    assert silver["unaccounted_rows"] == 0
    assert (
        silver["recordings_written"] + silver["quarantined"] + silver["duplicates_dropped"]
        == silver["bronze_rows_read"]
    )
    return bronze, silver


def assert_metadata_schema_matches_tables(lakehouse, result):
    for table in TABLES:
        declared = lakehouse.materialization_metadata(result, table)["dagster/column_schema"]
        written = lakehouse.table(table).schema
        # Partition columns come last when Spark reads a partitioned table back.
        assert sorted((c.name, c.type) for c in declared.columns) == sorted(
            (f.name, f.dataType.simpleString()) for f in written.fields
        ), table
    assert [
        c.name
        for c in lakehouse.materialization_metadata(result, "silver/recordings")[
            "dagster/column_schema"
        ].columns
    ][:6] == ["device_id", "mrn", "recorded_at", "heartrate", "patient_name", "date"]


def test_two_waves_then_idle_match_the_oracle(lakehouse):
    sim = Simulator(lakehouse.root, seed=3, patients=6, devices=6)
    faults = Faults(
        malformed=0.02,
        invalid_heartrate=0.02,
        duplicates=0.03,
        late=0.03,
        unknown_mrn=0.02,
        array_files=0.3,
        gzip_files=0.3,
        signal_gaps=0.5,
    )
    sim.land_patients(only=[0, 1, 2, 3])  # patients 4 and 5 land only in the second wave
    first = sim.land_recordings(files=8, records=150, faults=faults, wave=0)

    result = lakehouse.run()
    expected = assert_gold_matches_oracle(lakehouse)
    assert_silver_matches_oracle(lakehouse, expected)
    bronze, silver = assert_run_accounts_for_every_row(lakehouse, result)
    assert bronze["files_read"] == 8
    assert_metadata_schema_matches_tables(lakehouse, result)
    assert silver["duplicates_dropped"] == expected.duplicates > 0

    # Wave 2: late data, new and renamed patients, a file delivered again under another name.
    sim.land_patients("patients-update.csv", renames={1: "Renamed Patient"})
    sim.land_recordings(
        files=6, records=150, faults=Faults(late=0.2, duplicates=0.05, unknown_mrn=0.05), wave=1
    )
    land_file(first[0].parent, "redelivered-" + first[0].name, first[0].read_bytes())
    duplicates_before = expected.duplicates
    result = lakehouse.run()
    expected = assert_gold_matches_oracle(lakehouse)
    assert_silver_matches_oracle(lakehouse, expected)
    _, silver = assert_run_accounts_for_every_row(lakehouse, result)
    names = {r["mrn"]: r["patient_name"] for r in lakehouse.read("gold/heartrate_by_patient")}
    assert names[sim.mrn(1)] == "Renamed Patient"
    assert sim.mrn(5) in names  # its recordings landed in wave 1, its patient row in wave 2
    # The redelivered file's valid recordings are all duplicates now.
    assert silver["duplicates_dropped"] == expected.duplicates - duplicates_before > 100
    assert_readers_agree(lakehouse, [t for t in TABLES if not t.startswith("bronze/")])

    # Wave 3: nothing new. No table changes.
    before = snapshot_tables(lakehouse.root)
    result = lakehouse.run()
    assert snapshot_tables(lakehouse.root) == before
    bronze = lakehouse.materialization_metadata(result, "bronze/recordings")
    # Skipped: the runs before recorded what they read, though they ran right after the landings.
    assert bronze["rows_added"] == 0 and bronze["input_unchanged"]


def test_reruns_after_failed_runs_neither_duplicate_nor_lose(lakehouse, monkeypatch):
    sim = Simulator(lakehouse.root, seed=5, patients=4, devices=4)
    sim.land_patients()
    sim.land_recordings(files=4, records=100, faults=Faults(duplicates=0.05, invalid_heartrate=0.05))
    lakehouse.run()

    sim.land_recordings(files=4, records=100, faults=Faults(duplicates=0.05, invalid_heartrate=0.05), wave=1)
    real_append = tables.append

    def crash_after_silver_recordings(df, path, **options):
        real_append(df, path, **options)
        if tables.table_name(path) == "silver/recordings":
            raise RuntimeError("injected crash between the two writes of a silver micro-batch")

    with monkeypatch.context() as patched:
        patched.setattr(tables, "append", crash_after_silver_recordings)
        assert not lakehouse.run(raise_on_error=False).success

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure after silver")

    # The next run completes silver, then fails in gold (which replaces its tables with `overwrite`).
    with monkeypatch.context() as patched:
        patched.setattr(tables, "overwrite", fail)
        result = lakehouse.run(raise_on_error=False)
        assert not result.success
    # The first attempt committed the batch's recordings; this run skipped that write and still
    # counts them, from the commit the attempt left (bronze, done before, is skipped).
    silver_counts = lakehouse.materialization_metadata(result, "silver/recordings")
    assert silver_counts["unaccounted_rows"] == 0 and silver_counts["recordings_written"] > 0
    assert silver_counts["bronze_rows_read"] == sum(
        silver_counts[k] for k in ("recordings_written", "quarantined", "duplicates_dropped")
    )

    # A query's mark is recorded only after it completes: gold, which failed, runs again though its
    # inputs are as the failed run saw them.
    result = lakehouse.run()
    assert not any(
        lakehouse.materialization_metadata(result, t).get("input_unchanged")
        for t in TABLES
        if t.startswith("gold/")
    )
    expected = assert_gold_matches_oracle(lakehouse)
    assert_silver_matches_oracle(lakehouse, expected)


def test_signal_loss_settings_are_run_config(lakehouse):
    sim = Simulator(lakehouse.root, seed=1, patients=2, devices=2)
    sim.land_patients()
    sim.land_recordings(files=2, records=120, faults=Faults(signal_gaps=1.0))
    config = {"ops": {"gold": {"config": {"device_signal_loss": {"window_seconds": 30, "min_readings": 20}}}}}
    lakehouse.run(config)
    rows = lakehouse.read("gold/device_signal_loss")
    assert rows and all((r["window_end"] - r["window_start"]).total_seconds() == 30 for r in rows)
    expected = oracle.compute(lakehouse.root)
    assert {
        (r["device_id"], int(r["window_start"].timestamp()), r["readings"]) for r in rows
    } == oracle.device_signal_loss(expected, window=30, min_readings=20)


def test_empty_lakehouse_run_creates_empty_tables(lakehouse):
    lakehouse.run()
    for table in (
        "gold/heartrate_by_patient",
        "gold/daily_patient_avg",
        "gold/device_signal_loss",
        "silver/patients",
    ):
        assert lakehouse.read(table) == []
    lakehouse.run()  # and an idle run on it changes nothing


def test_silver_reads_a_large_bronze_in_bounded_micro_batches(lakehouse, monkeypatch):
    """Silver caches each micro-batch: a backlog is read a few files at a time, and duplicates that
    fall in different micro-batches are still dropped once."""
    monkeypatch.setattr(silver, "MAX_BRONZE_BYTES_PER_BATCH", 1)  # one bronze file per micro-batch
    sim = Simulator(lakehouse.root, seed=4, patients=3, devices=3)
    sim.land_patients()
    sim.land_recordings(files=2, records=100, wave=0)
    sim.land_recordings(files=2, records=100, faults=Faults(duplicates=0.2, invalid_heartrate=0.05), wave=1)
    result = lakehouse.run()
    expected = assert_gold_matches_oracle(lakehouse)
    assert_silver_matches_oracle(lakehouse, expected)
    _, silver_counts = assert_run_accounts_for_every_row(lakehouse, result)
    bronze_files = DeltaTable(str(lakehouse.resource.table("bronze/recordings"))).file_uris()
    assert silver_counts["micro_batches"] == len(bronze_files) > 1
    assert silver_counts["duplicates_dropped"] == expected.duplicates > 0
