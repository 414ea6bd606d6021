"""Two runs at once never drive queries on the same checkpoint: the lock on the data root stops runs
started by hand, and the shipped instance config queues runs started by sensors, schedule or UI."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from heartbeat_assets.simulator import Simulator
from tests.conftest import Lakehouse
from tests.test_pipeline import assert_gold_matches_oracle, assert_silver_matches_oracle

# In `make test-all` only: several Dagster processes at once.
pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def dagster_home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home)
    return home


def test_two_materializations_started_by_hand(tmp_path, spark):
    """`dagster asset materialize -m heartbeat_assets --select '*'` from the project root, twice at once."""
    data = tmp_path / "data"
    sim = Simulator(data, seed=2, patients=3, devices=3)
    sim.land_patients()
    sim.land_recordings(files=3, records=100)
    env = {**os.environ, "HEARTBEAT_DATA_DIR": str(data), "DAGSTER_HOME": str(dagster_home(tmp_path))}
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", "heartbeat_assets", "--select", "*"]

    def start():
        return subprocess.Popen(
            command, cwd=PROJECT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )

    first = start()
    lock = data / ".lakehouse.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip() == f"pid {first.pid}"):
        assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.2)
    second = start()  # while the first run holds the lock
    assert second.wait(timeout=300) != 0
    message = second.stderr.read()
    assert "is in use by pid" in message and "wait for that run to finish" in message
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    assert "RUN_SUCCESS" in first.stderr.read()
    assert list((tmp_path / "dagster_home").glob("history/runs/*.db")), (
        "the run is in DAGSTER_HOME's instance"
    )

    lakehouse = Lakehouse(data, spark)
    expected = assert_gold_matches_oracle(lakehouse)
    assert_silver_matches_oracle(lakehouse, expected)


def test_instance_config_queues_sensor_runs_one_at_a_time(tmp_path, spark):
    data = tmp_path / "data"
    home = dagster_home(tmp_path)
    sim = Simulator(data, seed=8, patients=3, devices=3)
    # Both sensors see files at their first tick: two run requests at once.
    sim.land_patients()
    sim.land_recordings(files=2, records=60)
    env = {**os.environ, "HEARTBEAT_DATA_DIR": str(data), "DAGSTER_HOME": str(home)}
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", str(PROJECT / "workspace.yaml")],
        cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        os.environ["DAGSTER_HOME"], previous_home = str(home), os.environ.get("DAGSTER_HOME")
        instance = DagsterInstance.get()
        landed_during_run = False
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            records = instance.get_run_records()
            if not landed_during_run and any(
                r.dagster_run.status == DagsterRunStatus.STARTED for r in records
            ):
                # A file landing while a run is in progress is picked up by a later run.
                sim.land_recordings(files=1, records=60, wave=1)
                landed_during_run = True
            done = [r for r in records if r.dagster_run.is_finished]
            if landed_during_run and len(records) >= 3 and len(done) == len(records):
                break
            time.sleep(2)
        records = instance.get_run_records(RunsFilter(job_name="medallion"))
    finally:
        os.killpg(daemon.pid, 9)
        daemon.wait()
        if previous_home is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = previous_home
    assert len(records) >= 3, [r.dagster_run.status for r in records]
    assert all(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in records)
    spans = sorted((r.start_time, r.end_time) for r in records)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False)), spans

    lakehouse = Lakehouse(data, spark)
    expected = assert_gold_matches_oracle(lakehouse)
    assert_silver_matches_oracle(lakehouse, expected)
    assert len(expected.silver) > 0 and any(
        "w01" in r["source_file"] for r in lakehouse.read("bronze/recordings")
    )
