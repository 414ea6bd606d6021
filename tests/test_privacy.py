"""Dagster's event log (run logs and metadata) never holds raw recordings or patient names, except in
table previews, which one setting turns off."""

import pytest

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


@pytest.mark.parametrize("previews", [False, True])
def test_no_patient_names_or_recordings_in_dagster(tmp_path, spark, previews):
    lakehouse = Lakehouse(
        tmp_path / "data", spark, LakehouseResource(data_dir=str(tmp_path / "data"), table_previews=previews)
    )
    sim = Simulator(lakehouse.root, seed=6, patients=3, devices=3)
    sim.land_patients()
    sim.land_recordings(files=2, records=60, faults=Faults(malformed=0.1, invalid_heartrate=0.1))
    lakehouse.run()

    names = {r["name"] for r in lakehouse.read("silver/patients")}
    raw_lines = [r["raw"] for r in lakehouse.read("bronze/recordings_quarantine")]
    assert names and raw_lines
    leaks = [(where, text) for where, text in event_log_texts(lakehouse) if any(n in text for n in names)]
    assert {where for where, _ in leaks} == ({"preview"} if previews else set())
    for where, text in event_log_texts(lakehouse):
        assert not any(len(raw) > 8 and raw in text for raw in raw_lines), where
        assert '"heartrate"' not in text, where
