"""Operating the lakehouse: moving the data root, full refresh, checkpoints that no longer fit."""

import json
import shutil
import uuid

import pytest
from dagster import AssetSelection

from heartbeat_assets.gold import DEVICE_SIGNAL_LOSS, HEARTRATE_BY_PATIENT
from heartbeat_assets.simulator import Faults, Simulator
from resources import TABLES
from tests.conftest import Lakehouse
from tests.test_pipeline import assert_gold_matches_oracle, assert_silver_matches_oracle, snapshot_tables

# In `make test-all` only: full refreshes and moved data roots, each a run or more.
pytestmark = pytest.mark.slow


def test_moved_data_root_reads_nothing_twice(lakehouse, tmp_path):
    """Spark logs absolute paths in checkpoints; a moved root is relocated at the next run."""
    sim = Simulator(lakehouse.root, seed=9, patients=3, devices=3)
    sim.land_patients()
    sim.land_recordings(files=3, records=80, faults=Faults(duplicates=0.05))
    lakehouse.run()

    moved_root = tmp_path / "elsewhere" / "data"
    moved_root.parent.mkdir()
    shutil.move(lakehouse.root, moved_root)
    moved = Lakehouse(moved_root, lakehouse.spark)
    moved.instance = lakehouse.instance
    before = snapshot_tables(moved_root)
    moved.run()
    assert snapshot_tables(moved_root) == before, "an idle run after the move changes nothing"
    logs = "".join(p.read_text() for p in (moved_root / "checkpoints").glob("**/sources/*/*"))
    assert str(lakehouse.root) + "/" not in logs and str(moved_root) in logs

    Simulator(moved_root, seed=9, patients=3, devices=3).land_recordings(files=2, records=80, wave=1)
    moved.run()
    expected = assert_gold_matches_oracle(moved)
    assert_silver_matches_oracle(moved, expected)


def two_waves(lakehouse):
    sim = Simulator(lakehouse.root, seed=4, patients=4, devices=4)
    faults = Faults(malformed=0.03, invalid_heartrate=0.03, duplicates=0.05, late=0.05, array_files=0.3)
    sim.land_patients(only=[0, 1, 2])
    sim.land_recordings(files=4, records=100, faults=faults)
    lakehouse.run()
    sim.land_patients("update.csv", renames={0: "New Name"})
    sim.land_recordings(files=3, records=100, faults=faults, wave=1)
    lakehouse.run()


@pytest.fixture(scope="module")
def two_waves_root(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("two-waves") / "data"
    two_waves(Lakehouse(root, spark))
    return root


@pytest.fixture
def after_two_waves(two_waves_root, tmp_path, spark) -> Lakehouse:
    """A lakehouse that has processed two waves (a copy, so each test may change it)."""
    root = tmp_path / "data"
    shutil.copytree(two_waves_root, root)
    return Lakehouse(root, spark)


@pytest.mark.parametrize("layer", ["silver", "bronze"])
def test_full_refresh_rebuilds_the_same_tables(after_two_waves, layer):
    lakehouse = after_two_waves
    # silver/recordings.patient_name is the name known when a row was processed: a rebuild takes
    # today's names. And of duplicates that meet in one micro-batch, which delivery's source_file
    # is kept is not specified. Everything else comes out the same.
    ignore = ("patient_name", "source_file")
    before, bronze_before = lakehouse.contents(ignore), _bronze(lakehouse.contents())
    result = lakehouse.run(job_name=f"full_refresh_{layer}")
    assert lakehouse.contents(ignore) == before
    assert _bronze(lakehouse.contents()) == bronze_before
    expected = assert_gold_matches_oracle(lakehouse)
    assert {(r["mrn"], r["patient_name"]) for r in lakehouse.read("silver/recordings")} == {
        (mrn, expected.patients.get(mrn)) for mrn in {r["mrn"] for r in expected.silver.values()}
    }
    silver = lakehouse.materialization_metadata(result, "silver/recordings")
    assert silver["dagster/row_count"] == len(before["silver/recordings"])
    steps = {e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
    assert ("bronze_recordings" in steps) == (layer == "bronze")
    lakehouse.run()  # and the medallion job goes on from the rebuilt checkpoints
    assert lakehouse.contents(ignore) == before


def _bronze(contents: dict) -> dict:
    return {table: rows for table, rows in contents.items() if table.startswith("bronze/")}


def test_checkpoint_of_another_query_fails_with_the_remedy(after_two_waves):
    lakehouse = after_two_waves
    checkpoints = lakehouse.root / "checkpoints" / "gold"
    # The checkpoint of another aggregate stands in for one written by an older version of the query
    # (with a query id of its own, as that would have).
    shutil.rmtree(checkpoints / "device_signal_loss")
    shutil.copytree(checkpoints / "daily_patient_avg", checkpoints / "device_signal_loss")
    (checkpoints / "device_signal_loss" / "metadata").write_text(json.dumps({"id": str(uuid.uuid4())}))
    (checkpoints / "device_signal_loss" / ".metadata.crc").unlink()  # Hadoop's checksum of the old id
    Simulator(lakehouse.root, seed=4, patients=4, devices=4).land_recordings(files=1, records=50, wave=2)
    result = lakehouse.run(raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "gold/device_signal_loss" in message and "full_refresh_gold" in message, message
    # The other gold tables, built in the same step, are up to date and checked.
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {"gold/heartrate_by_patient", "gold/daily_patient_avg"} <= materialized
    assert "gold/device_signal_loss" not in materialized
    schema_checks = {
        e.asset_key.to_user_string(): e.passed
        for e in result.get_asset_check_evaluations()
        if e.check_name == "schema_as_declared" and e.asset_key.path[0] == "gold"
    }
    assert schema_checks == {"gold/heartrate_by_patient": True, "gold/daily_patient_avg": True}

    lakehouse.run(job_name="full_refresh_gold")
    assert_gold_matches_oracle(lakehouse)


def test_tables_of_the_parquet_era_fail_with_the_remedy_then_rebuild(after_two_waves):
    """Before Delta Lake, every table was a plain Parquet folder: a run refuses to write into one,
    saying what to do, and `full_refresh_bronze` rebuilds the lakehouse from its landing folders."""
    lakehouse = after_two_waves
    for table in TABLES:
        path = lakehouse.resource.table(table)
        plain = path.with_name(f"{path.name}-parquet")
        lakehouse.table(table).write.parquet(str(plain))
        shutil.rmtree(path)
        plain.rename(path)
    result = lakehouse.run(raise_on_error=False)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failures[0].event_specific_data.error.message
    assert "no Delta table" in message and "full_refresh_bronze" in message, message
    lakehouse.run(job_name="full_refresh_bronze")
    expected = assert_gold_matches_oracle(lakehouse)
    assert_silver_matches_oracle(lakehouse, expected)
    assert all((lakehouse.resource.table(t) / "_delta_log").is_dir() for t in TABLES)


def test_new_signal_loss_window_through_a_gold_refresh(after_two_waves):
    lakehouse = after_two_waves
    config = {"ops": {"gold": {"config": {"device_signal_loss": {"window_seconds": 30, "min_readings": 10}}}}}
    result = lakehouse.run(config, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "full_refresh_gold" in failure.event_specific_data.error.message
    # The step's other tables are still materialized.
    gold = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {"gold/heartrate_by_patient", "gold/daily_patient_avg"} <= gold
    assert "gold/device_signal_loss" not in gold
    lakehouse.run(config, job_name="full_refresh_gold")
    rows = lakehouse.read("gold/device_signal_loss")
    assert rows and all((r["window_end"] - r["window_start"]).total_seconds() == 30 for r in rows)


GOLD_TABLES = ("gold/heartrate_by_patient", "gold/daily_patient_avg", "gold/device_signal_loss")


# heartrate_by_patient shares its aggregate with daily_patient_avg: alone, it runs the aggregate's
# query, and daily_patient_avg is rebuilt from it on its next run.
@pytest.mark.parametrize("alone", [DEVICE_SIGNAL_LOSS, HEARTRATE_BY_PATIENT], ids=lambda key: key.path[-1])
def test_one_gold_table_materialized_alone(after_two_waves, alone):
    lakehouse = after_two_waves
    Simulator(lakehouse.root, seed=4, patients=4, devices=4).land_recordings(files=1, records=50, wave=2)
    before = lakehouse.contents()
    job = lakehouse.defs.resolve_job_def("medallion")
    # Gold's tables share one step; selected alone, one table is built and the others are untouched.
    graph = lakehouse.defs.resolve_asset_graph()
    selection = AssetSelection.assets(alone).upstream().required_multi_asset_neighbors()
    selection = selection.resolve(graph)
    result = job.execute_in_process(instance=lakehouse.instance, asset_selection=list(selection))
    table, others = alone.to_user_string(), set(GOLD_TABLES) - {alone.to_user_string()}
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert table in materialized
    assert not materialized & others
    checked = {e.asset_key.to_user_string() for e in result.get_asset_check_evaluations()}
    assert not checked & others
    after = lakehouse.contents()
    for other in others:
        assert after[other] == before[other]
    assert after[table] != before[table]

    lakehouse.run()  # the whole job then brings the other two up to date
    assert_gold_matches_oracle(lakehouse)
