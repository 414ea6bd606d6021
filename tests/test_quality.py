"""Asset checks: what a normal run reports, and a failing blocking check stopping gold."""

from dagster import AssetCheckSeverity
from pyspark.sql import functions as F

from heartbeat_assets import gold
from heartbeat_assets.simulator import Faults, Simulator, land_file


def evaluations(result) -> dict[tuple[str, str], object]:
    return {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}


def test_checks_of_a_normal_run_then_an_idle_one(lakehouse):
    sim = Simulator(lakehouse.root, seed=12, patients=3, devices=3)
    sim.land_patients()
    sim.land_recordings(files=3, records=120, faults=Faults(malformed=0.05, duplicates=0.05, signal_gaps=1.0))
    result = lakehouse.run()
    checks = evaluations(result)

    # Observability: the newest landed file, the latency from it to gold, Spark's own phase times.
    newest = max(p.stat().st_mtime for p in (lakehouse.root / "landing" / "recordings").iterdir())
    bronze = lakehouse.materialization_metadata(result, "bronze/recordings")
    assert abs(bronze["newest_file_modified_at"] - newest) < 0.01
    gold = lakehouse.materialization_metadata(result, "gold/heartrate_by_patient")
    assert 0 < gold["landing_to_gold_latency_s"] < 600
    assert bronze["spark_addBatch_ms"] > 0 and bronze["micro_batches"] == 1

    failed = {key for key, e in checks.items() if not e.passed}
    # Faults over 1 % of the input: a warning, not an error. New lost-signal windows: a warning.
    assert failed == {
        ("bronze/recordings_quarantine", "quarantine_rate"),
        ("gold/device_signal_loss", "no_new_lost_signal"),
    }
    assert all(checks[key].severity == AssetCheckSeverity.WARN for key in failed)
    alerts = checks[("gold/device_signal_loss", "no_new_lost_signal")].metadata
    assert alerts["new_alerts"].value > 0 and "| device_id |" in alerts["alerts"].value
    for table in (
        "bronze/recordings",
        "silver/recordings",
        "gold/heartrate_by_patient",
        "gold/device_signal_loss",
    ):
        assert checks[(table, "schema_as_declared")].passed
    assert checks[("silver/recordings", "nothing_lost")].metadata["duplicates"].value > 0
    assert checks[("gold/heartrate_by_patient", "counts_match_silver")].passed

    idle = evaluations(lakehouse.run())
    assert idle[("gold/device_signal_loss", "no_new_lost_signal")].passed  # nothing new to report

    # A later wave: the check lists the windows the table did not have before this run, no others.
    before = {tuple(row.values()) for row in lakehouse.read("gold/device_signal_loss")}
    sim.land_recordings(files=3, records=120, faults=Faults(signal_gaps=1.0), wave=1)
    later_run = lakehouse.run()
    # Each check is tied to its table's materialization by this run, not the one before (the UI
    # shows a check of an older materialization as not current).
    for evaluation in later_run.get_asset_check_evaluations():
        target = evaluation.target_materialization_data
        assert target is not None and target.run_id == later_run.run_id, evaluation.asset_check_key
    later = evaluations(later_run)[("gold/device_signal_loss", "no_new_lost_signal")]
    after = {tuple(row.values()) for row in lakehouse.read("gold/device_signal_loss")}
    assert before < after and later.metadata["new_alerts"].value == len(after - before)


def test_failing_blocking_check_keeps_gold_from_materializing(lakehouse, monkeypatch):
    sim = Simulator(lakehouse.root, seed=13, patients=2, devices=2)
    sim.land_patients()
    sim.land_recordings(files=2, records=60)
    monkeypatch.setattr(
        "heartbeat_assets.silver.quality_numbers",
        lambda *args: {"null_keys": F.lit(0), "out_of_range": F.lit(0), "duplicate_keys": F.lit(3)},
    )
    result = lakehouse.run(raise_on_error=False)
    checks = evaluations(result)
    assert not checks[("silver/recordings", "no_duplicate_keys")].passed
    assert checks[("silver/recordings", "no_duplicate_keys")].severity == AssetCheckSeverity.ERROR
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "silver/recordings" in materialized
    assert not {t for t in materialized if t.startswith("gold/")}


def test_counts_check_fails_when_gold_counts_a_patient_twice(lakehouse, monkeypatch):
    sim = Simulator(lakehouse.root, seed=14, patients=2, devices=2)
    sim.land_patients()
    sim.land_recordings(files=2, records=60)
    assert evaluations(lakehouse.run())[("gold/heartrate_by_patient", "counts_match_silver")].passed
    # A defect in gold's build: the patient dimension joined twice doubles every patient's count.
    build = gold.heartrate_by_patient
    monkeypatch.setattr(
        gold, "heartrate_by_patient", lambda totals, patients: build(totals, patients.union(patients))
    )
    sim.land_recordings(files=1, records=60, wave=1)

    results = evaluations(lakehouse.run())
    check = results[("gold/heartrate_by_patient", "counts_match_silver")]
    assert not check.passed
    # The daily table, built from the same aggregate with its own join, still adds up.
    assert results[("gold/daily_patient_avg", "counts_match_silver")].passed
    assert check.metadata["gold_count"].value == 2 * check.metadata["silver_rows_of_known_patients"].value
    assert check.metadata["aggregated_rows"].value == check.metadata["silver_rows"].value == 180


def test_schema_check_of_a_gold_table_catches_a_changed_build(lakehouse, monkeypatch):
    sim = Simulator(lakehouse.root, seed=16, patients=2, devices=2)
    sim.land_patients()
    sim.land_recordings(files=1, records=40)
    build = gold.daily_patient_avg
    # A defect in gold's build: `count` becomes an int.
    monkeypatch.setattr(gold, "daily_patient_avg", lambda *t: build(*t).withColumn("count", F.lit(1)))
    check = evaluations(lakehouse.run(raise_on_error=False))[("gold/daily_patient_avg", "schema_as_declared")]
    assert not check.passed
    assert check.metadata["unexpected"].value == "count int"


def test_counts_check_of_a_gold_table_its_run_did_not_rebuild(lakehouse):
    """A table whose inputs are as its last build saw them is not written again; its counts check then
    sums the table as stored (a rebuilt one is summed as it is written)."""
    sim = Simulator(lakehouse.root, seed=15, patients=2, devices=2)
    sim.land_patients()
    sim.land_recordings(files=1, records=40)
    lakehouse.run()
    (lakehouse.resource.checkpoint("gold/heartrate_by_patient") / "_input_mark").unlink()  # forces the step

    result = lakehouse.run()
    assert lakehouse.materialization_metadata(result, "gold/heartrate_by_patient")["table_rebuilt"] is False
    check = evaluations(result)[("gold/heartrate_by_patient", "counts_match_silver")]
    assert check.passed and check.metadata["gold_count"].value == 40


def test_quarantine_rate_above_the_error_threshold(lakehouse):
    landing = lakehouse.root / "landing" / "recordings"
    land_file(
        landing,
        "mostly-bad.json",
        b'{"device_id": 1, "mrn": 7, "time": 1704067200, "heartrate": 70}\nbad\nbad\n',
    )
    check = evaluations(lakehouse.run())[("bronze/recordings_quarantine", "quarantine_rate")]
    assert not check.passed and check.severity == AssetCheckSeverity.ERROR
    assert check.metadata["quarantine_rate"].value == round(2 / 3, 6)
