"""A run skips each query whose inputs did not change, without starting Spark, and says so."""

import os

from dagster import AssetCheckSeverity

from heartbeat_assets.simulator import Faults, Simulator, land_file
from resources import LakehouseResource, SparkSessionResource
from tests.conftest import Lakehouse
from tests.test_pipeline import assert_gold_matches_oracle, snapshot_tables


def materialized(result) -> dict[str, dict]:
    return {
        e.step_materialization_data.materialization.asset_key.to_user_string(): {
            k: v.value for k, v in e.step_materialization_data.materialization.metadata.items()
        }
        for e in result.get_asset_materialization_events()
    }


def check_verdicts(result) -> dict[tuple[str, str], tuple[bool, AssetCheckSeverity, dict]]:
    return {
        (e.asset_check_key.asset_key.to_user_string(), e.asset_check_key.name): (
            e.passed, e.severity, {k: v.value for k, v in e.metadata.items()}
        )
        for e in result.get_asset_check_evaluations()
    }  # fmt: skip


def test_unchanged_inputs_skip_every_query_and_carry_over_check_verdicts(tmp_path, spark, monkeypatch):
    # Warn at any quarantined row, so that one check fails and its verdict must carry over.
    lakehouse = Lakehouse(
        tmp_path, spark, LakehouseResource(data_dir=str(tmp_path), quarantine_warn_rate=0.0)
    )
    sim = Simulator(tmp_path, seed=4, patients=3, devices=3)
    sim.land_patients()
    files = sim.land_recordings(files=3, records=50)
    land_file(files[0].parent, "garbled.json", b"not json\n")
    first = lakehouse.run()
    first_checks = check_verdicts(first)
    assert first_checks[("bronze/recordings_quarantine", "quarantine_rate")][:2] == (
        False,
        AssetCheckSeverity.WARN,
    )
    before = snapshot_tables(tmp_path)

    def no_spark(self):
        raise AssertionError("an idle run started Spark")

    with monkeypatch.context() as patched:
        patched.setattr(SparkSessionResource, "_init_session", no_spark)
        idle = lakehouse.run()
    assert snapshot_tables(tmp_path) == before
    metadata = materialized(idle)
    assert len(metadata) == 9 and all(
        m["input_unchanged"] and m["rows_added"] == 0 for m in metadata.values()
    )
    assert {t: m["dagster/row_count"] for t, m in metadata.items()} == {
        t: m["dagster/row_count"] for t, m in materialized(first).items()
    }
    idle_checks = check_verdicts(idle)
    assert idle_checks.keys() == first_checks.keys()
    for key, (passed, severity, meta) in idle_checks.items():
        if key == ("gold/device_signal_loss", "no_new_lost_signal"):  # about this run: nothing new
            assert passed and meta["new_alerts"] == 0
            continue
        assert (passed, severity) == first_checks[key][:2], key
        assert meta["evaluated_in_run"] == first.run_id and meta["input_unchanged"]

    # Only a patient renamed: the patient queries and the gold tables that join patients run again.
    sim.land_patients("patients-update.csv", renames={0: "Renamed Patient"})
    renamed = materialized(lakehouse.run())
    ran = {t for t, m in renamed.items() if not m.get("input_unchanged")}
    assert ran == {
        "bronze/patients",
        "silver/patients",
        "gold/heartrate_by_patient",
        "gold/daily_patient_avg",
    }
    assert_gold_matches_oracle(lakehouse)
    names = {r["mrn"]: r["patient_name"] for r in lakehouse.read("gold/heartrate_by_patient")}
    assert names[sim.mrn(0)] == "Renamed Patient"


def test_a_fresh_dagster_instance_runs_the_queries_once(tmp_path, spark):
    """Without earlier check verdicts to carry over, nothing is skipped; row counts are the tables'."""
    sim = Simulator(tmp_path, seed=7, patients=2, devices=2)
    sim.land_patients()
    sim.land_recordings(files=2, records=40, faults=Faults(malformed=0.1))
    Lakehouse(tmp_path, spark).run()
    lakehouse = Lakehouse(tmp_path, spark)  # a new, empty instance
    result = lakehouse.run()
    again = materialized(result)
    assert not any(m.get("input_unchanged") for m in again.values())
    for table in ("bronze/recordings", "bronze/recordings_quarantine", "silver/recordings"):
        assert again[table]["dagster/row_count"] == len(lakehouse.read(table)) > 0, table
    counts_checks = [e for e in result.get_asset_check_evaluations() if e.check_name == "counts_match_silver"]
    assert len(counts_checks) == 2 and all(e.passed for e in counts_checks)


def test_a_file_landing_within_the_clock_tick_of_a_run_is_not_skipped(tmp_path, spark):
    """A landing folder's mark is its file names: a file renamed in just after a run read the folder,
    within the file system's clock tick, leaves the folder's mtime unchanged but is still new."""
    lakehouse = Lakehouse(tmp_path, spark)
    sim = Simulator(tmp_path, seed=9, patients=2, devices=2)
    sim.land_patients()
    sim.land_recordings(files=1, records=40)
    lakehouse.run()  # right after the landing: the marks are recorded all the same
    landing = lakehouse.resource.recordings_landing
    folder_times = (landing.stat().st_atime_ns, landing.stat().st_mtime_ns)
    sim.land_recordings(files=1, records=40, wave=1)
    os.utime(landing, ns=folder_times)  # as if it landed in the same clock tick
    ran = {t for t, m in materialized(lakehouse.run()).items() if not m.get("input_unchanged")}
    assert {"bronze/recordings", "silver/recordings"} <= ran and "bronze/patients" not in ran
    assert_gold_matches_oracle(lakehouse)
