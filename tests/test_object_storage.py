"""The lakehouse on S3: a real S3 server (moto's, on 127.0.0.1), files landed through the S3 API.

The medallion runs in a process of its own with `s3a://` as its data root, like a user's run, and its
tables (read by delta-rs from the bucket) equal those of the same feed run on a local path, whose gold
the plain-Python oracle checks. Crashes on S3 recover to the uninterrupted run's tables. The sensors
and the run lock work on a bucket.
"""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dagster import Failure, build_sensor_context
from deltalake import DeltaTable

from heartbeat_assets import sensors, simulator
from heartbeat_assets.killpoints import KILL_AT_ENV
from heartbeat_assets.simulator import Faults, Simulator
from resources import TABLES, LakehouseResource, storage
from resources.lakehouse import LakehouseBusyError
from tests.conftest import MOTO_SETTINGS, Lakehouse, delta_rs_rows
from tests.test_pipeline import assert_gold_matches_oracle, assert_silver_matches_oracle

PROJECT = Path(__file__).resolve().parent.parent
FAULTS = Faults(
    malformed=0.03, invalid_heartrate=0.03, duplicates=0.05, late=0.05, unknown_mrn=0.02,
    array_files=0.3, gzip_files=0.3, signal_gaps=0.3,
)  # fmt: skip


#: A run in a process and JVM of its own, configured from the environment as the product's runs are.
RUN = """
import sys
from dagster import DagsterInstance
from heartbeat_assets.definitions import build_definitions
from resources import resources_from_env

resources = resources_from_env()
job = build_definitions(**resources).resolve_job_def("medallion")
result = job.execute_in_process(instance=DagsterInstance.ephemeral(), raise_on_error=False)
sys.exit(0 if result.success else 1)
"""


def run_in_own_process(data_dir: str, kill_at: str | None = None) -> float:
    """Run the medallion job on `data_dir` in a process (and JVM) of its own; return its seconds.
    With `kill_at`, the run SIGKILLs itself and its JVM at that kill point."""
    env = {
        **os.environ,
        "HEARTBEAT_DATA_DIR": data_dir,
        "HEARTBEAT_SPARK_MASTER": "local[2]",
        "HEARTBEAT_WARM_JVM": "0",
        "HEARTBEAT_SPARK_CONF": json.dumps(MOTO_SETTINGS),
        **({KILL_AT_ENV: kill_at} if kill_at else {}),
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", RUN],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900, start_new_session=True,
    )  # fmt: skip
    if kill_at:
        assert done.returncode == -signal.SIGKILL, f"never reached {kill_at}: {done.stderr[-3000:]}"
    else:
        assert done.returncode == 0, done.stderr[-3000:]
    return time.monotonic() - started


def land_wave(root, wave: int) -> None:
    sim = Simulator(root, seed=5, patients=5, devices=5)
    if wave == 0:
        sim.land_patients(only=[0, 1, 2, 3])
    else:
        sim.land_patients("update.csv", renames={1: "Renamed"})
    sim.land_recordings(files=6, records=120, faults=FAULTS, wave=wave)


def tables_of(resource: LakehouseResource) -> dict[str, list]:
    """Every table's rows as delta-rs reads them (from a bucket or a disk), in comparable form."""
    return {name: delta_rs_rows(resource.table(name)) for name in TABLES}


@pytest.mark.slow
def test_the_medallion_on_s3_equals_the_same_feed_on_a_local_path(s3, tmp_path, spark):
    on_s3 = LakehouseResource(data_dir=f"{s3}/two-waves")
    local = Lakehouse(tmp_path / "data", spark)
    timings = []
    for wave in (0, 1):
        land_wave(on_s3.root, wave)
        land_wave(local.root, wave)
        s3_seconds = run_in_own_process(on_s3.data_dir)
        local_seconds = run_in_own_process(str(local.root))
        timings.append((s3_seconds, local_seconds))
        expected = assert_gold_matches_oracle(local)
        assert_silver_matches_oracle(local, expected)
        assert tables_of(on_s3) == tables_of(local.resource), f"wave {wave}"
    # Landed files are recorded by their S3 URIs.
    sources = DeltaTable(str(on_s3.table("bronze/patients"))).to_pyarrow_table().column("source_file")
    assert set(sources.to_pylist()) == {
        f"{s3}/two-waves/landing/patients/{name}" for name in ("patients.csv", "update.csv")
    }
    for wave, (s3_seconds, local_seconds) in enumerate(timings):
        print(f"wave {wave}: {s3_seconds:.1f} s on S3, {local_seconds:.1f} s on a local path")


def copy_prefix(source: str, target: str) -> None:
    root = storage.data_root(source)
    root.fs.copy(root.path, storage.data_root(target).path, recursive=True)


@pytest.fixture(scope="module")
def crash_base(s3):
    """Wave 0 processed and wave 1 landed on S3, and the tables of the uninterrupted run from there."""
    base = f"{s3}/crash-base"
    land_wave(storage.data_root(base), 0)
    run_in_own_process(base)
    land_wave(storage.data_root(base), 1)
    reference = f"{s3}/crash-reference"
    copy_prefix(base, reference)
    run_in_own_process(reference)
    return base, tables_of(LakehouseResource(data_dir=reference))


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["write:bronze/recordings:uncommitted", "write:gold/heartrate_by_patient:uncommitted"]
)
def test_a_crash_on_s3_then_a_run_equals_the_uninterrupted_run(crash_base, point):
    base, expected = crash_base
    root = f"{base.rsplit('/', 1)[0]}/crash-{point.split(':')[1].replace('/', '-')}"
    copy_prefix(base, root)
    run_in_own_process(root, kill_at=point)
    # The killed run's lock is not waited for: its process on this machine is gone.
    run_in_own_process(root)
    assert tables_of(LakehouseResource(data_dir=root)) == expected


def test_the_run_lock_on_s3_keeps_a_second_run_out_until_the_first_ends(s3):
    first = LakehouseResource(data_dir=f"{s3}/locked")
    second = LakehouseResource(data_dir=f"{s3}/locked")
    with first.exclusive_lock():
        with pytest.raises(LakehouseBusyError, match=rf"in use by pid {os.getpid()} on "):
            with second.exclusive_lock():
                pass
    with second.exclusive_lock():
        assert storage.data_root(f"{s3}/locked/.lakehouse.lock").exists()
    assert not storage.data_root(f"{s3}/locked/.lakehouse.lock").exists()


def test_an_expired_lease_of_another_machine_is_taken_over(s3):
    lock = storage.data_root(f"{s3}/expired/.lakehouse.lock")
    lock.write_text('{"holder": "pid 1 on elsewhere", "host": "elsewhere", "pid": 1, "expires_at": 0}')
    with LakehouseResource(data_dir=f"{s3}/expired").exclusive_lock():
        assert '"host": "elsewhere"' not in lock.read_text()
    held = {"holder": "pid 1 on elsewhere", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 60}
    lock.write_text(json.dumps(held))
    with pytest.raises(LakehouseBusyError, match="pid 1 on elsewhere"):
        with LakehouseResource(data_dir=f"{s3}/expired").exclusive_lock():
            pass


def test_a_run_whose_lease_was_taken_over_fails(s3):
    """A run that stalled past its lease (another took the lock over) fails rather than succeed."""
    resource = LakehouseResource(data_dir=f"{s3}/taken", lease_seconds=0.6)
    lock = storage.data_root(f"{s3}/taken/.lakehouse.lock")
    with pytest.raises(Failure, match="lost its lock.*another process took the lock over"):
        with resource.exclusive_lock():
            lock.write_text(json.dumps({"holder": "pid 1 on elsewhere", "host": "elsewhere", "pid": 1}))
            time.sleep(0.5)  # a renewal finds the lock changed


def test_a_missing_bucket_says_what_to_do(s3):
    with pytest.raises(Exception, match=r"bucket 'no-such-bucket' does not exist.*AWS_ENDPOINT_URL"):
        LakehouseResource(data_dir="s3a://no-such-bucket/lake").ensure_layout()


def test_sensors_on_a_bucket_start_one_run_per_new_objects(s3):
    lakehouse = LakehouseResource(data_dir=f"{s3}/sensed", landing_watch_seconds=0)
    landing = lakehouse.recordings_landing

    def tick(cursor=None):
        context = build_sensor_context(cursor=cursor, resources={"lakehouse": lakehouse})
        return sensors.recordings_landing_sensor(context)

    first = tick()
    assert not first.run_requests
    for i in range(3):
        (landing / f"r{i}.json").write_bytes(b"{}")
    (landing / "notes.txt").write_bytes(b"not a recording")
    result = tick(first.cursor)
    (request,) = result.run_requests
    assert request.tags["heartbeat/new_files"] == "3"
    assert not tick(result.cursor).run_requests
    (landing / "odd name [1]: é.json").write_bytes(b"{}")
    later = tick(result.cursor)
    (request_2,) = later.run_requests
    assert request_2.tags["heartbeat/new_files"] == "1" and request_2.run_key != request.run_key


def test_the_cursor_on_s3_keeps_only_the_upload_window(monkeypatch):
    """An object's Last-Modified is when its upload began: one listed after newer objects, with an
    older time, is still new; the cursor keeps the names of one upload window only."""
    window = storage.UPLOAD_WINDOW_S * 10**9
    listing = []
    monkeypatch.setattr(storage, "list_files", lambda folder: list(listing))
    monkeypatch.setattr(storage, "is_local", lambda path: False)

    def entry(name, at_ns):
        return storage.FileEntry(name, at_ns, datetime.fromtimestamp(at_ns / 1e9, UTC))

    t0 = 1_800_000_000 * 10**9
    listing += [entry(f"old-{i}.json", t0 + i) for i in range(1000)]
    scan = sensors.scan_new_objects("bucket/landing", sensors.LandingCursor(), (".json",))
    assert len(scan.files) == 1000
    listing.append(entry("newer.json", t0 + 2 * window))
    scan = sensors.scan_new_objects("bucket/landing", scan.cursor, (".json",))
    assert scan.files == ["newer.json"]
    assert scan.cursor.names == ("newer.json",)  # the old objects are out of the window now
    # A multipart upload that began a minute before `newer.json` and completed after it was seen.
    listing.append(entry("slow-upload.json", t0 + 2 * window - 60 * 10**9))
    scan = sensors.scan_new_objects("bucket/landing", scan.cursor, (".json",))
    assert scan.files == ["slow-upload.json"]
    assert not sensors.scan_new_objects("bucket/landing", scan.cursor, (".json",)).files


def test_the_simulator_lands_into_a_bucket(s3, capsys):
    simulator.main(["--data-dir", f"{s3}/simulated", "--files", "3", "--records", "10", "--faults"])
    landing = LakehouseResource(data_dir=f"{s3}/simulated")
    assert len(storage.list_files(landing.recordings_landing)) == 3
    assert [e.name for e in storage.list_files(landing.patients_landing)] == ["patients.csv"]
    assert f"landed 3 recording file(s) in {s3}/simulated/landing/recordings" in capsys.readouterr().out
