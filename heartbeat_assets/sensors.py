"""Sensors that start a `medallion` run when files land.

The cursor is a high-water mark, not a list of files: the newest change time (ctime) seen and the
names that share it. A rename into the folder sets a file's ctime, so a file written long ago and
renamed in now is still new. The mark does not move past files changed in the last `SETTLE_SECONDS`,
so a file renamed in while the folder is being listed cannot fall behind it. Such files still start a
run at once: the run key is the newest change time of the new files, so when the next tick sees them
again, settled, Dagster skips the request as a duplicate.

The cursor also keeps the folder's own mtime once every file in it was seen: adding, renaming or
removing a file changes it, so a tick on an unchanged folder costs one `stat`, however many files
have landed over time.

The daemon starts a tick every 5 s (a fixed loop), so a file would wait 2.5 s on average for the next
one. A tick that finds nothing therefore watches the folder for `landing_watch_seconds` (a `stat`
every 0.1 s) and returns as soon as a file lands. With the daemon's sensor threads on (the instance
configs do), each sensor watches on its own thread.

On S3 (`scan_new_objects`) an object appears whole when its upload completes, under a Last-Modified
time of when its upload began, which may be older than objects already seen. The cursor keeps the
newest Last-Modified seen and the names seen within `storage.UPLOAD_WINDOW_S` before it: any object
listed later with an older time is new unless its name is there. The cursor grows with the objects of
that window only, however many have landed. A tick lists the prefix (1,000 keys a request).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    load_assets_from_modules,
    sensor,
)

from heartbeat_assets import bronze, gold, silver
from heartbeat_assets.jobs import medallion_job
from resources import LakehouseResource, storage

SETTLE_SECONDS = 1.0
#: How often a watching tick looks at the folder's mtime.
WATCH_POLL_SECONDS = 0.1
#: How often a watching tick lists an S3 prefix (each listing is a request per 1,000 objects).
OBJECT_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class LandingCursor:
    ctime_ns: int = -1
    names: tuple[str, ...] = ()
    #: The folder's mtime when all its files had settled and been seen; -1 when not known.
    folder_mtime_ns: int = -1

    @classmethod
    def parse(cls, raw: str | None) -> LandingCursor:
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(int(data["ctime_ns"]), tuple(data["names"]), int(data.get("folder_mtime_ns", -1)))

    def serialize(self) -> str:
        return json.dumps(
            {"ctime_ns": self.ctime_ns, "names": sorted(self.names), "folder_mtime_ns": self.folder_mtime_ns}
        )


def is_landed_file(name: str, suffixes: tuple[str, ...]) -> bool:
    """Files the pipeline reads: the right suffix, not hidden or in progress (leading `.` or `_`)."""
    return name.endswith(suffixes) and not name.startswith((".", "_"))


@dataclass(frozen=True)
class LandingScan:
    #: Files that landed after the cursor, settled or not.
    files: list[str]
    #: The cursor to store next: past the settled files only.
    cursor: LandingCursor
    #: The newest change time of `files`: it names the run they start.
    newest_ctime_ns: int = -1

    @property
    def run_key(self) -> str:
        """The same files seen again (on a local disk, unsettled then settled) give the same key."""
        if self.cursor.folder_mtime_ns == OBJECT_STORE:
            return f"{self.newest_ctime_ns}-{hashlib.sha1(' '.join(self.files).encode()).hexdigest()[:12]}"
        return str(self.newest_ctime_ns)


#: `folder_mtime_ns` of a cursor of an S3 prefix, which has no mtime.
OBJECT_STORE = -2


def scan_new_objects(folder, cursor: LandingCursor, suffixes: tuple[str, ...]) -> LandingScan:
    """Objects under the S3 prefix `folder` not seen before, and the cursor to store next."""
    window = storage.change_margin_ns(folder)
    mark = cursor.ctime_ns - window
    listed = [
        entry
        for entry in storage.list_files(folder)
        if is_landed_file(entry.name, suffixes) and entry.changed_ns > mark
    ]
    seen = set(cursor.names)
    new = [entry for entry in listed if entry.name not in seen]
    newest = max([cursor.ctime_ns, *(entry.changed_ns for entry in listed)])
    recent = {entry.name for entry in listed if entry.changed_ns > newest - window}
    return LandingScan(
        sorted(entry.name for entry in new),
        LandingCursor(newest, tuple(sorted(recent)), OBJECT_STORE),
        max((entry.changed_ns for entry in new), default=-1),
    )


def scan_new_files(
    folder: Path, cursor: LandingCursor, suffixes: tuple[str, ...], now_ns: int | None = None
) -> LandingScan:
    """Files that landed after `cursor`, and the cursor to store next."""
    settled_before = (now_ns if now_ns is not None else time.time_ns()) - int(SETTLE_SECONDS * 1e9)
    try:
        folder_mtime = folder.stat().st_mtime_ns
    except FileNotFoundError:
        return LandingScan([], cursor)
    if folder_mtime == cursor.folder_mtime_ns:
        return LandingScan([], cursor)
    new: list[tuple[int, str]] = []
    unsettled = folder_mtime > settled_before
    with os.scandir(folder) as entries:
        for entry in entries:
            if not is_landed_file(entry.name, suffixes):
                continue
            try:
                ctime = entry.stat().st_ctime_ns
            except FileNotFoundError:  # renamed away while listing
                continue
            if ctime > cursor.ctime_ns or (ctime == cursor.ctime_ns and entry.name not in cursor.names):
                new.append((ctime, entry.name))
            unsettled = unsettled or ctime > settled_before
    mark = -1 if unsettled else folder_mtime
    settled = [(ctime, name) for ctime, name in new if ctime <= settled_before]
    next_cursor = LandingCursor(cursor.ctime_ns, cursor.names, mark)
    if settled:
        newest = max(ctime for ctime, _ in settled)
        names = {name for ctime, name in settled if ctime == newest}
        if newest == cursor.ctime_ns:
            names |= set(cursor.names)
        next_cursor = LandingCursor(newest, tuple(sorted(names)), mark)
    newest_new = max((ctime for ctime, _ in new), default=-1)
    return LandingScan(sorted(name for _, name in new), next_cursor, newest_new)


def watch_for_new_files(
    folder: Path, cursor: LandingCursor, suffixes: tuple[str, ...], seconds: float
) -> LandingScan:
    """`scan_new_files`, and while it finds nothing, again whenever the folder's mtime changes, for
    up to `seconds`: a file landing in that time is found at once. On S3: `scan_new_objects`, again
    every `OBJECT_POLL_SECONDS`."""
    deadline = time.monotonic() + seconds
    if not storage.is_local(folder):
        scan = scan_new_objects(folder, cursor, suffixes)
        while not scan.files and time.monotonic() + OBJECT_POLL_SECONDS <= deadline:
            time.sleep(OBJECT_POLL_SECONDS)
            scan = scan_new_objects(folder, scan.cursor, suffixes)
        return scan
    listed_mtime = _mtime_ns(folder)  # before the listing: a file landing during it changes the mtime
    scan = scan_new_files(folder, cursor, suffixes)
    while not scan.files and time.monotonic() + WATCH_POLL_SECONDS <= deadline:
        time.sleep(WATCH_POLL_SECONDS)
        mtime = _mtime_ns(folder)
        if mtime != listed_mtime:
            listed_mtime = mtime
            scan = scan_new_files(folder, scan.cursor, suffixes)
    return scan


def _mtime_ns(folder: Path) -> int | None:
    try:
        return folder.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _landing_sensor(name: str, folder_of, suffixes: tuple[str, ...], table: str, description: str):
    # A run for new files materializes what they reach: the table they land in and everything
    # downstream of it (with the other outputs of the same steps), not the other landing folder's
    # steps. Files landing in both folders start two runs, which the queue runs one after the other.
    reached = sorted(
        AssetSelection.assets(AssetKey(table.split("/")))
        .downstream()
        .required_multi_asset_neighbors()
        .resolve(load_assets_from_modules([bronze, silver, gold]))
    )

    @sensor(
        name=name,
        job=medallion_job,
        # The daemon evaluates sensors at most every 5 s (its loop). A minimum of 5 s would skip the
        # next loop whenever a tick started a little late, so files would wait 10 s; a tick on an
        # unchanged folder is one `stat`.
        minimum_interval_seconds=1,
        default_status=DefaultSensorStatus.RUNNING,
        description=description,
    )
    def _sensor(context: SensorEvaluationContext, lakehouse: LakehouseResource):
        scan = watch_for_new_files(
            folder_of(lakehouse),
            LandingCursor.parse(context.cursor),
            suffixes,
            lakehouse.landing_watch_seconds,
        )
        files = scan.files
        if not files:
            return SensorResult(
                skip_reason=SkipReason(f"No new files in {folder_of(lakehouse)}"),
                cursor=scan.cursor.serialize(),
            )
        preview = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        context.log.info(f"{len(files)} new file(s): {preview}")
        return SensorResult(
            run_requests=[
                RunRequest(
                    asset_selection=reached,
                    # A run started by these files lists the folder after this tick, so it ingests
                    # them; the same key on a later tick (the files now settled) is skipped.
                    run_key=f"{name}:{scan.run_key}",
                    tags={"heartbeat/trigger": name, "heartbeat/new_files": str(len(files))},
                )
            ],
            cursor=scan.cursor.serialize(),
        )

    return _sensor


recordings_landing_sensor = _landing_sensor(
    "recordings_landing_sensor",
    lambda lakehouse: lakehouse.recordings_landing,
    (".json", ".json.gz"),
    "bronze/recordings",
    "Starts a medallion run of bronze/recordings and everything downstream when recording files land "
    "in landing/recordings.",
)
patients_landing_sensor = _landing_sensor(
    "patients_landing_sensor",
    lambda lakehouse: lakehouse.patients_landing,
    (".csv",),
    "bronze/patients",
    "Starts a medallion run of bronze/patients and everything downstream when patient CSV files land "
    "in landing/patients.",
)
