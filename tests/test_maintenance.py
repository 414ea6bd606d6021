"""The maintenance job: compaction, history retention and VACUUM, through Dagster, losing no row."""

import pytest
from deltalake import DeltaTable

from heartbeat_assets.simulator import Faults, Simulator
from resources import TABLES, LakehouseResource
from tests.conftest import Lakehouse
from tests.test_pipeline import assert_gold_matches_oracle

# In `make test-all` only: a maintenance job over a larger history.
pytestmark = pytest.mark.slow


def observations(result) -> dict[str, dict]:
    return {
        e.asset_key.to_user_string(): {
            k: v.value for k, v in e.event_specific_data.asset_observation.metadata.items()
        }
        for e in result.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
    }


def test_maintenance_compacts_vacuums_and_loses_no_row(tmp_path, spark):
    root = tmp_path / "data"
    # No history kept: VACUUM may remove every file the latest versions do not use.
    lakehouse = Lakehouse(root, spark, LakehouseResource(data_dir=str(root), retention_days=0))
    sim = Simulator(root, seed=17, patients=3, devices=3)
    sim.land_patients()
    for wave in range(3):
        sim.land_recordings(files=2, records=60, faults=Faults(malformed=0.05), wave=wave)
        lakehouse.run()
    bronze = lakehouse.resource.table("bronze/recordings")
    gold = lakehouse.resource.table("gold/heartrate_by_patient")
    bronze_files = len(DeltaTable(str(bronze)).file_uris())
    first_gold = DeltaTable(str(gold)).history()[-2]["version"]  # its first rows, replaced since
    before = lakehouse.contents()

    result = lakehouse.run(job_name="lakehouse_maintenance")
    seen = observations(result)
    assert set(seen) == set(TABLES)
    assert seen["bronze/recordings"]["files_compacted"] == bronze_files > 1
    assert len(DeltaTable(str(bronze)).file_uris()) == seen["bronze/recordings"]["files_written"] == 1
    assert seen["gold/heartrate_by_patient"]["files_vacuumed"] > 0
    assert all(
        m["delta_version"] == DeltaTable(str(lakehouse.resource.table(t))).version() for t, m in seen.items()
    )
    assert lakehouse.contents() == before
    for table in TABLES:
        configuration = DeltaTable(str(lakehouse.resource.table(table))).metadata().configuration
        assert configuration["delta.deletedFileRetentionDuration"] == "interval 0 days", table
    # The replaced version's files are gone: it can no longer be read.
    with pytest.raises(Exception, match="(?i)not found|no such file"):
        DeltaTable(str(gold), version=first_gold).to_pyarrow_table()

    # The streaming queries go on from the compacted tables: nothing is read twice or lost.
    sim.land_recordings(files=1, records=60, wave=3)
    lakehouse.run()
    assert_gold_matches_oracle(lakehouse)
