"""Crash recovery: a run is SIGKILLed (with its JVM) at chosen points, then run again.

Right after the crash, a reader other than Spark (delta-rs) sees only committed versions, each with
the rows of the uninterrupted run's table at the same version: never half a batch. After the run
again, every table equals the tables of an uninterrupted run on the same input: no duplicate, no
loss.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from heartbeat_assets.killpoints import KILL_AT_ENV
from heartbeat_assets.simulator import Faults, Simulator
from resources import TABLES
from tests.conftest import Lakehouse, assert_readers_agree, delta_rs_rows, forget_delta_tables

PROJECT = Path(__file__).resolve().parent.parent
FAULTS = Faults(
    malformed=0.03, invalid_heartrate=0.03, duplicates=0.05, late=0.05, array_files=0.3, signal_gaps=0.3
)

CHILD = """
import sys
from dagster import DagsterInstance
from heartbeat_assets.definitions import build_definitions
from resources import LakehouseResource, SparkSessionResource

lakehouse = LakehouseResource(data_dir=sys.argv[1])
# A JVM of the run's own, killed with it (the warm driver's JIT settings cost a short run more).
spark = SparkSessionResource(lakehouse=lakehouse, master="local[2]", shuffle_partitions=2, keep_jvm_warm_s=0)
job = build_definitions(lakehouse=lakehouse, spark=spark).resolve_job_def("medallion")
result = job.execute_in_process(instance=DagsterInstance.ephemeral(), raise_on_error=False)
sys.exit(0 if result.success else 1)
"""


def land_wave(root: Path, wave: int) -> None:
    sim = Simulator(root, seed=21, patients=4, devices=4)
    if wave == 0:
        sim.land_patients(only=[0, 1, 2])
    else:
        sim.land_patients("update.csv", renames={1: "Renamed"})
    sim.land_recordings(files=3, records=90, faults=FAULTS, wave=wave)


def killed_run(root: Path, point: str) -> None:
    """Run the medallion job in a child process that kills itself (and its JVM) at `point`."""
    env = {**os.environ, KILL_AT_ENV: point}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(root)],
        cwd=PROJECT, env=env, start_new_session=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, f"never reached {point}: {done.stderr[-2000:]}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, spark):
    """Wave 0 processed and wave 1 landed (the start of every crash), and the uninterrupted result."""
    base = tmp_path_factory.mktemp("crash-base") / "data"
    first = Lakehouse(base, spark)
    land_wave(base, 0)
    first.run()
    land_wave(base, 1)
    reference_root = tmp_path_factory.mktemp("crash-reference") / "data"
    shutil.copytree(base, reference_root, symlinks=True)
    reference = Lakehouse(reference_root, spark)
    reference.run()
    return base, reference


def crash_and_recover(prepared, tmp_path, spark, point: str) -> None:
    base, reference = prepared
    root = tmp_path / "data"
    shutil.copytree(base, root, symlinks=True)
    killed_run(root, point)
    lakehouse = Lakehouse(root, spark)
    assert_committed_versions_match(lakehouse, reference)
    assert_readers_agree(lakehouse, TABLES)
    lakehouse.run()
    assert lakehouse.contents() == reference.contents()
    assert_readers_agree(lakehouse, TABLES)
    forget_delta_tables()


def assert_committed_versions_match(crashed: Lakehouse, reference: Lakehouse) -> None:
    """What delta-rs reads of each table after the crash is a version the uninterrupted run also
    committed, with the same rows: the crash left no partial batch visible."""
    for table in TABLES:
        path = crashed.resource.table(table)
        version = DeltaTable(str(path)).version()
        assert version <= DeltaTable(str(reference.resource.table(table))).version(), table
        expected = delta_rs_rows(reference.resource.table(table), version)
        assert delta_rs_rows(path, version) == expected, f"{table} at version {version}"


# One point per kind of moment the recovery must handle; the randomized test covers the rest.
CRASH_POINTS = [
    "write:bronze/recordings:uncommitted",  # while bronze writes a micro-batch's files
    "write:bronze/recordings:committed",  # between the two tables a bronze micro-batch writes
    "batch:silver/recordings:written",  # after a batch is written, before Spark commits it
    "write:gold/heartrate_by_patient:uncommitted",  # while gold replaces its table
]
#: One point per layer, in `make test`.
LAYER_POINTS = [CRASH_POINTS[0], CRASH_POINTS[2], CRASH_POINTS[3]]


def test_a_crash_in_each_layer_in_turn_then_rerun_equals_uninterrupted(prepared, tmp_path, spark):
    """Three runs in a row are killed, in bronze, then silver, then gold: each recovers from the crash
    before it and is killed further on. Then a run ends the job: every table is the uninterrupted run's."""
    base, reference = prepared
    root = tmp_path / "data"
    shutil.copytree(base, root, symlinks=True)
    lakehouse = Lakehouse(root, spark)
    for point in LAYER_POINTS:
        killed_run(root, point)
        try:
            assert_committed_versions_match(lakehouse, reference)
            assert_readers_agree(lakehouse, TABLES)
        except AssertionError as exc:
            raise AssertionError(f"after the crash at {point}: {exc}") from exc
    lakehouse.run()
    assert lakehouse.contents() == reference.contents()
    assert_readers_agree(lakehouse, TABLES)


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_at_point_then_rerun_equals_uninterrupted(prepared, tmp_path, spark, point):
    crash_and_recover(prepared, tmp_path, spark, point)


def reachable_points() -> list[str]:
    """Every kill point a medallion run passes: a write to each table (and to gold's aggregates)
    before it commits, after each write made from Python (all but Delta's own streaming sink, which
    writes bronze/patients and the aggregates), and the end of each `foreachBatch` micro-batch."""
    aggregates = ["gold/daily_patient_avg:aggregate", "gold/device_signal_loss:aggregate"]
    points = [f"write:{table}:uncommitted" for table in [*TABLES, *aggregates]]
    points += [f"write:{table}:committed" for table in TABLES if table != "bronze/patients"]
    points += [
        f"batch:{query}:written" for query in ("bronze/recordings", "silver/patients", "silver/recordings")
    ]
    return points


@pytest.mark.slow
def test_crash_at_random_points(prepared, tmp_path, spark):
    """More points, drawn at random: HEARTBEAT_CRASH_SAMPLES of them (default 1), seeded by
    HEARTBEAT_CRASH_SEED (default: a new seed each run, printed on failure)."""
    seed = int(os.environ.get("HEARTBEAT_CRASH_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    points = rng.sample(reachable_points(), int(os.environ.get("HEARTBEAT_CRASH_SAMPLES", "1")))
    for n, point in enumerate(points):
        try:
            crash_and_recover(prepared, tmp_path / str(n), spark, point)
        except AssertionError as exc:
            raise AssertionError(f"crash at {point} (HEARTBEAT_CRASH_SEED={seed}): {exc}") from exc
