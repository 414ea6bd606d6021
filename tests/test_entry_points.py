"""The commands a user runs: the Dagster CLI on the project module, and the simulator."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from heartbeat_assets.simulator import main as simulate
from tests import oracle

PROJECT = Path(__file__).resolve().parent.parent


def test_dagster_asset_materialize_from_the_project_root(tmp_path, spark):
    data = tmp_path / "data"
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home)
    simulate(["--data-dir", str(data), "--files", "3", "--records", "120", "--faults", "--seed", "11"])
    env = {**os.environ, "HEARTBEAT_DATA_DIR": str(data), "DAGSTER_HOME": str(home)}
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "asset", "materialize", "-m", "heartbeat_assets", "--select", "*"]
    done = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RUN_SUCCESS" in done.stderr

    expected = oracle.compute(data)
    rows = spark.read.parquet(str(data / "lakehouse" / "gold" / "heartrate_by_patient")).collect()
    assert {
        r.mrn: (r.patient_name, r.avg_heartrate, r["count"]) for r in rows
    } == oracle.heartrate_by_patient(expected)
    assert list(home.glob("history/runs/*.db")), "the run is recorded in the instance of DAGSTER_HOME"


def test_simulator_is_deterministic(tmp_path):
    for target in ("a", "b"):
        simulate(
            [
                "--data-dir",
                str(tmp_path / target),
                "--files",
                "4",
                "--records",
                "50",
                "--faults",
                "--seed",
                "3",
            ]
        )
    files_a = sorted((tmp_path / "a").rglob("*.*"))
    files_b = sorted((tmp_path / "b").rglob("*.*"))
    assert [p.relative_to(tmp_path / "a") for p in files_a] == [
        p.relative_to(tmp_path / "b") for p in files_b
    ]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(files_a, files_b, strict=True))
    assert not list((tmp_path / "a").rglob(".*")), "no temporary files are left behind"
