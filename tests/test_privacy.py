"""Dagster's event log (run logs and metadata) never holds raw recordings or patient names, except in
table previews, which one setting turns off."""

from heartbeat_assets.simulator import Faults, Simulator
from resources import LakehouseResource
from tests.conftest import Lakehouse


def event_log_texts(lakehouse: Lakehouse) -> list[tuple[str, str]]:
    """(where, text) for every message and metadata entry of every run."""
    texts = []
    for run in lakehouse.instance.get_runs():
        for entry in lakehouse.instance.all_logs(run.run_id):
            texts.append(("message", entry.user_message or ""))
            event = entry.dagster_event
            materialization = (
                event.step_materialization_data.materialization
                if event and event.is_step_materialization
                else None
            )
            if materialization is not None:
                for key, value in materialization.metadata.items():
                    texts.append((key, repr(value.value)))
    return texts


def test_no_patient_names_or_recordings_in_dagster(tmp_path, spark):
    root = tmp_path / "data"
    lakehouse = Lakehouse(root, spark, LakehouseResource(data_dir=str(root), table_previews=True))
    sim = Simulator(lakehouse.root, seed=6, patients=3, devices=3)
    sim.land_patients()
    sim.land_recordings(files=2, records=60, faults=Faults(malformed=0.1, invalid_heartrate=0.1))
    lakehouse.run()

    names = {r["name"] for r in lakehouse.read("silver/patients")}
    raw_lines = [r["raw"] for r in lakehouse.read("bronze/recordings_quarantine")]
    assert names and raw_lines
    texts = event_log_texts(lakehouse)
    assert {where for where, text in texts if any(n in text for n in names)} == {"preview"}
    for where, text in texts:
        assert not any(len(raw) > 8 and raw in text for raw in raw_lines), where
        assert '"heartrate"' not in text, where

    # With previews off, not even the gold metadata holds a name.
    private = Lakehouse(root, spark, LakehouseResource(data_dir=str(root), table_previews=False))
    private.instance = lakehouse.instance
    result = private.run()
    for table in ("gold/heartrate_by_patient", "gold/daily_patient_avg"):
        metadata = private.materialization_metadata(result, table)
        assert "preview" not in metadata
        assert not any(n in repr(v) for v in metadata.values() for n in names)
