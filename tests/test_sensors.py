"""The landing sensors: new files start one run, the cursor stays small, restarts lose nothing."""

import json
import os
import threading
import time

from dagster import RunRequest, build_sensor_context

from heartbeat_assets import sensors
from heartbeat_assets.definitions import build_definitions
from heartbeat_assets.sensors import (
    LandingCursor,
    LandingScan,
    patients_landing_sensor,
    recordings_landing_sensor,
    scan_new_files,
    watch_for_new_files,
)
from heartbeat_assets.simulator import land_file
from resources import LakehouseResource


def tick(sensor, lakehouse, cursor=None):
    context = build_sensor_context(cursor=cursor, resources={"lakehouse": lakehouse})
    return sensor(context), context


def skipped(result) -> bool:
    return result.skip_reason is not None and not result.run_requests


def settle():
    time.sleep(1.1)  # files changed in the last second wait for the next tick


def changed_ns(path) -> int:
    return os.stat(path).st_ctime_ns


def lakehouse_at(root, watch_seconds: float = 0.0) -> LakehouseResource:
    """Ticks look at the folder once, unless a test is about watching it."""
    return LakehouseResource(data_dir=str(root), landing_watch_seconds=watch_seconds)


def test_new_files_start_one_run_and_advance_the_cursor(tmp_path):
    lakehouse = lakehouse_at(tmp_path)
    landing = lakehouse.recordings_landing
    result, _ = tick(recordings_landing_sensor, lakehouse)
    assert skipped(result)

    for i in range(3):
        land_file(landing, f"r{i}.json", b"{}")
    land_file(landing, "ignored.json.tmp", b"{}")
    land_file(landing, ".hidden.json", b"{}")
    settle()
    result, _ = tick(recordings_landing_sensor, lakehouse)
    assert len(result.run_requests) == 1
    request: RunRequest = result.run_requests[0]
    assert request.job_name in (None, "medallion") and request.tags["heartbeat/new_files"] == "3"

    again, _ = tick(recordings_landing_sensor, lakehouse, cursor=result.cursor)
    assert skipped(again)


def test_a_run_materializes_what_its_landing_folder_reaches(tmp_path):
    """New recordings reach neither patient table; new patients reach every table downstream of
    silver/patients (silver/recordings' step, which then finds no new recording, and gold)."""
    lakehouse = lakehouse_at(tmp_path)
    land_file(lakehouse.recordings_landing, "r.json", b"{}")
    land_file(lakehouse.patients_landing, "p.csv", b"mrn,name\n")
    settle()
    gold = ["gold/daily_patient_avg", "gold/device_signal_loss", "gold/heartrate_by_patient"]
    silver_recordings = ["silver/recordings", "silver/recordings_quarantine"]
    expected = {
        recordings_landing_sensor: [
            "bronze/recordings",
            "bronze/recordings_quarantine",
            *gold,
            *silver_recordings,
        ],
        patients_landing_sensor: ["bronze/patients", *gold, "silver/patients", *silver_recordings],
    }
    for sensor, tables in expected.items():
        (request,) = tick(sensor, lakehouse)[0].run_requests
        assert sorted(key.to_user_string() for key in request.asset_selection) == tables
        # Those tables' checks run too (Dagster adds them to the selection).
        assert request.asset_check_keys is None


def test_cursor_stays_small_with_many_files_and_restart_loses_nothing(tmp_path):
    lakehouse = lakehouse_at(tmp_path)
    landing = lakehouse.recordings_landing
    for i in range(2000):
        land_file(landing, f"r{i:05d}.json", b"{}")
    settle()
    result, _ = tick(recordings_landing_sensor, lakehouse)
    assert result.run_requests[0].tags["heartbeat/new_files"] == "2000"
    assert len(result.cursor) < 200 + 20 * len(LandingCursor.parse(result.cursor).names)
    assert len(LandingCursor.parse(result.cursor).names) < 2000

    # A file written long ago and renamed in now is new: its change time moves with the rename.
    old = landing.parent / "old.json"
    old.write_bytes(b"{}")
    os.utime(old, (1_000_000_000, 1_000_000_000))
    os.replace(old, landing / "old.json")
    settle()
    later, _ = tick(recordings_landing_sensor, lakehouse, cursor=result.cursor)
    assert later.run_requests[0].tags["heartbeat/new_files"] == "1"

    # A sensor whose cursor was reset sees every file once more: one run, which ingests nothing twice.
    restarted, _ = tick(recordings_landing_sensor, lakehouse, cursor=None)
    assert restarted.run_requests[0].tags["heartbeat/new_files"] == "2001"


def test_a_tick_on_an_unchanged_folder_does_not_list_it(tmp_path, monkeypatch):
    """The cost of an idle tick does not grow with the number of files ever landed."""
    landing = tmp_path
    for i in range(50):
        land_file(landing, f"r{i}.json", b"{}")
    settle()
    scan = scan_new_files(landing, LandingCursor(), (".json",))
    cursor = scan.cursor
    assert len(scan.files) == 50 and cursor.folder_mtime_ns == landing.stat().st_mtime_ns

    def no_listing(path):
        raise AssertionError("listed an unchanged folder")

    with monkeypatch.context() as patched:
        patched.setattr(os, "scandir", no_listing)
        assert scan_new_files(landing, cursor, (".json",)) == LandingScan([], cursor)
        # A tick that watches the folder for new files does not list it either while it is unchanged.
        assert watch_for_new_files(landing, cursor, (".json",), seconds=0.5) == LandingScan([], cursor)
    land_file(landing, "new.json", b"{}")  # changes the folder: the next settled tick lists it
    settle()
    scan = scan_new_files(landing, cursor, (".json",))
    assert scan.files == ["new.json"]
    # The restored cursor of an older version, without the folder's mtime, still works.
    legacy = LandingCursor.parse(json.dumps({"ctime_ns": scan.cursor.ctime_ns, "names": ["new.json"]}))
    assert scan_new_files(landing, legacy, (".json",)).files == []


def test_a_file_that_has_not_settled_starts_a_run_once(tmp_path, monkeypatch):
    # The listings are dated by the files' own change times, and the sensor's settle time is patched,
    # so a slow machine cannot let a file settle before the listing that is to find it unsettled.
    landing = tmp_path
    land_file(landing, "a.json", b"{}")
    first = scan_new_files(
        landing, LandingCursor(), (".json",), now_ns=changed_ns(landing / "a.json") + 2_000_000_000
    )
    assert first.files == ["a.json"] and first.cursor.names == ("a.json",)
    land_file(landing, "b.json", b"{}")  # lands right after the listing
    unsettled = scan_new_files(landing, first.cursor, (".json",), now_ns=changed_ns(landing / "b.json"))
    # It starts a run now, but the mark stays behind it: a file renamed in with the same change time
    # while the folder was listed cannot be passed over.
    assert unsettled.files == ["b.json"]
    assert (unsettled.cursor.ctime_ns, unsettled.cursor.names) == (first.cursor.ctime_ns, ("a.json",))
    settled = scan_new_files(
        landing, unsettled.cursor, (".json",), now_ns=changed_ns(landing / "b.json") + 2_000_000_000
    )
    assert settled.files == ["b.json"] and settled.cursor.names == ("b.json",)
    # The same run key both times, so Dagster starts one run for it.
    assert settled.newest_ctime_ns == unsettled.newest_ctime_ns != first.newest_ctime_ns
    assert scan_new_files(landing, settled.cursor, (".json",)).files == []

    # Through the sensor: the two requests carry one run key.
    lakehouse = lakehouse_at(tmp_path / "root")
    result, _ = tick(recordings_landing_sensor, lakehouse)
    land_file(lakehouse.recordings_landing, "c.json", b"{}")
    monkeypatch.setattr(sensors, "SETTLE_SECONDS", 3600.0)  # c.json has not settled
    now_result, _ = tick(recordings_landing_sensor, lakehouse, cursor=result.cursor)
    monkeypatch.setattr(sensors, "SETTLE_SECONDS", 0.0)  # now it has
    later, _ = tick(recordings_landing_sensor, lakehouse, cursor=now_result.cursor)
    assert len(now_result.run_requests) == 1 and now_result.cursor == result.cursor
    assert [r.run_key for r in now_result.run_requests] == [r.run_key for r in later.run_requests]
    assert len(later.run_requests) == 1
    assert skipped(tick(recordings_landing_sensor, lakehouse, cursor=later.cursor)[0])


def test_a_tick_that_finds_nothing_watches_and_starts_a_run_for_a_file_that_lands(tmp_path):
    lakehouse = lakehouse_at(tmp_path, watch_seconds=30)
    land_file(lakehouse.recordings_landing, "seen.json", b"{}")
    settle()
    first, _ = tick(recordings_landing_sensor, lakehouse)
    assert first.run_requests[0].tags["heartbeat/new_files"] == "1"  # found at once: no watching

    landing = threading.Timer(0.5, land_file, (lakehouse.recordings_landing, "while-watching.json", b"{}"))
    landing.start()
    watched, _ = tick(recordings_landing_sensor, lakehouse, cursor=first.cursor)
    landing.join()
    assert watched.run_requests[0].tags["heartbeat/new_files"] == "1"
    # However the file had settled when the watch found it, it starts one run.
    settle()
    later, _ = tick(recordings_landing_sensor, lakehouse_at(tmp_path), cursor=watched.cursor)
    assert {r.run_key for r in watched.run_requests + later.run_requests} == {watched.run_requests[0].run_key}


def test_patients_sensor_and_definitions_wire_up(tmp_path):
    lakehouse = lakehouse_at(tmp_path)
    land_file(lakehouse.patients_landing, "p.csv", b"mrn,name\n1,A\n")
    settle()
    result, _ = tick(patients_landing_sensor, lakehouse)
    assert len(result.run_requests) == 1
    defs = build_definitions(lakehouse=lakehouse)
    assert {s.name for s in defs.sensors} == {"recordings_landing_sensor", "patients_landing_sensor"}
    assert defs.resolve_job_def("medallion") is not None
    assert [s.name for s in defs.schedules] == ["hourly_medallion", "daily_maintenance"]
    assert defs.resolve_job_def("lakehouse_maintenance") is not None
