"""Where the lakehouse lives: landing folders, tables and checkpoints under one data root."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from dagster import ConfigurableResource, Failure
from pydantic import Field, field_validator

from resources import storage

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR_ENV = "HEARTBEAT_DATA_DIR"

#: Every table of the lakehouse, as "<layer>/<table>"; the asset key, the table folder and the
#: checkpoint folder all use this name.
TABLES = (
    "bronze/recordings",
    "bronze/recordings_quarantine",
    "bronze/patients",
    "silver/patients",
    "silver/recordings",
    "silver/recordings_quarantine",
    "gold/heartrate_by_patient",
    "gold/daily_patient_avg",
    "gold/device_signal_loss",
)


def default_data_dir() -> str:
    """`HEARTBEAT_DATA_DIR`, or the project's `data/` folder."""
    return os.environ.get(DATA_DIR_ENV) or str(PROJECT_ROOT / "data")


class LakehouseBusyError(Failure):
    """Another process holds the lakehouse lock."""


class LakehouseResource(ConfigurableResource):
    """Paths of the lakehouse under one data root, and the lock that keeps runs from overlapping.

    Layout under the data root::

        landing/recordings/   device files (.json / .json.gz), placed atomically
        landing/patients/     patient CSV files (header mrn,name)
        lakehouse/<layer>/<table>/   Delta tables
        checkpoints/<layer>/<table>/ streaming checkpoints (and gold's aggregates, as Delta tables)
    """

    data_dir: str = Field(
        default_factory=default_data_dir,
        validate_default=True,
        description="Root of the lakehouse: a local path or file:// URI (on a cluster: storage that the "
        "Dagster run, the Spark driver or Connect server and every executor see at the same path), or "
        "an S3 prefix, s3a://bucket/prefix. Defaults to $HEARTBEAT_DATA_DIR or the project's data/.",
    )

    table_previews: bool = Field(
        default=True,
        description="Show the first rows of gold tables in Dagster's metadata. They hold patient names: "
        "turn off where the Dagster UI must not show them.",
    )

    quarantine_warn_rate: float = Field(
        default=0.01,
        description="The quarantine_rate checks warn when a run quarantines more than this share.",
    )
    quarantine_error_rate: float = Field(
        default=0.2,
        description="The quarantine_rate checks fail when a run quarantines more than this share.",
    )

    retention_days: int = Field(
        default=7,
        ge=0,
        description="Days each table keeps its history: versions older than this can no longer be "
        "read (time travel) once the maintenance job's VACUUM has deleted the files only they used. "
        "0 keeps no history.",
    )

    landing_watch_seconds: float = Field(
        default=4.0,
        ge=0,
        description="How long a landing sensor's tick watches an unchanged folder (one stat every "
        "0.1 s) before it returns. The daemon starts ticks every 5 s, so a file that lands while a "
        "tick watches starts its run at once instead of waiting for the next one. 0: look once.",
    )

    lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="On S3: how long the run lock outlives a run that died without releasing it (a run "
        "of the same machine whose process is gone is not waited for). A live run renews it.",
    )

    @field_validator("data_dir")
    @classmethod
    def _supported_root(cls, value: str) -> str:
        return data_root_url(value)

    @property
    def root(self):
        """The data root: a `Path`, or a `UPath` on S3 (the same API; see `resources.storage`)."""
        return storage.data_root(self.data_dir)

    @property
    def on_object_storage(self) -> bool:
        return not storage.is_local(self.root)

    @property
    def recordings_landing(self) -> Path:
        return self.root / "landing" / "recordings"

    @property
    def patients_landing(self) -> Path:
        return self.root / "landing" / "patients"

    def table(self, name: str) -> Path:
        """Folder of table `name` ("<layer>/<table>")."""
        _check_table(name)
        return self.root / "lakehouse" / name

    def checkpoint(self, name: str) -> Path:
        """Checkpoint folder of the streaming query that writes table `name`."""
        _check_table(name)
        return self.root / "checkpoints" / name

    def ensure_layout(self) -> None:
        """Create the landing folders and check the data root is writable; fail with a remedy if not."""
        root = self.root
        try:
            storage.check_writable(root)
        except OSError as exc:
            remedy = (
                "Check the bucket and the AWS_* settings (credentials, AWS_ENDPOINT_URL, AWS_REGION)"
                if self.on_object_storage
                else f"Point {DATA_DIR_ENV} at a folder you can write to, or fix its permissions"
            )
            raise Failure(
                f"The lakehouse data root {root} is not writable ({exc.strerror}). {remedy}."
            ) from exc

    @contextmanager
    def exclusive_lock(self):
        """Hold an exclusive lock on the data root for the duration of a run.

        Streaming checkpoints tolerate one writer only. The Dagster instance's pool limit keeps
        queued runs apart; this lock also stops a second `dagster asset materialize` started by hand.
        The OS releases the lock if the process dies, so a crashed run never leaves it stale. On S3
        the lock is a lease object (`storage.ObjectLease`) that a dead run's successor takes over.
        """
        self.ensure_layout()
        if self.on_object_storage:
            with self._object_lease():
                self.relocate_checkpoints()
                yield
            return
        lock_path = self.root / ".lakehouse.lock"
        handle = open(lock_path, "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise LakehouseBusyError(
                    f"The lakehouse at {self.root} is in use by {holder}. Only one run may drive its "
                    "streaming queries at a time: wait for that run to finish, then start this one again."
                ) from exc
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            self.relocate_checkpoints()
            yield
        finally:
            handle.close()

    @contextmanager
    def _object_lease(self):
        lease = storage.ObjectLease(self.root / ".lakehouse.lock", self.lease_seconds)
        try:
            lease.acquire()
        except storage.LockHeld as exc:
            raise LakehouseBusyError(
                f"The lakehouse at {self.root} is in use by {exc.holder}. Only one run may drive its "
                "streaming queries at a time: wait for that run to finish, then start this one again "
                f"(a run that died releases it within {self.lease_seconds:g} s)."
            ) from exc
        try:
            yield
        finally:
            lease.release()
        if lease.lost:
            raise Failure(f"The run lost its lock on {self.root} while it ran: {lease.lost}")

    def reset(self, name: str) -> None:
        """Forget what the query writing table `name` has processed: delete its checkpoint."""
        storage.remove_tree(self.checkpoint(name))

    def relocate_checkpoints(self) -> list:
        """Point the checkpoints at this data root if it was moved or copied; return the files changed.

        Spark's file sources log every file they read by absolute URI and replay the last batch's
        list at restart, so a checkpoint made under another path would fail. The root each run used
        is kept in `.lakehouse.json`; when it differs, the old root's URI is replaced in the source
        logs (each file rewritten atomically, the marker updated last, so a crash midway is redone).
        """
        marker = self.root / ".lakehouse.json"
        previous = json.loads(marker.read_text())["root"] if marker.exists() else str(self.root)
        changed = []
        if previous != str(self.root):
            old_uri = previous if "://" in previous else Path(previous).as_uri()
            new_uri = storage.uri(self.root)
            for log in (self.root / "checkpoints").glob("**/sources/*/*"):
                if not re.fullmatch(r"\d+(\.compact)?", log.name):
                    continue
                text = log.read_text()
                if old_uri + "/" in text:
                    storage.write_text_atomic(log, text.replace(old_uri + "/", new_uri + "/"))
                    # Hadoop's checksum of the old content would reject the new one.
                    if storage.is_local(log):
                        log.with_name(f".{log.name}.crc").unlink(missing_ok=True)
                    changed.append(log)
        storage.write_text_atomic(marker, json.dumps({"root": str(self.root)}))
        return changed


def data_root_url(value: str) -> str:
    """The data root as a local path (a `file://` URI turned into one) or an `s3a://` URL; other
    schemes are refused with what to do."""
    scheme = urlparse(value).scheme
    if not scheme or scheme in storage.OBJECT_STORE_SCHEMES:
        return value
    if scheme == "file":
        uri = urlparse(value)
        if uri.netloc not in ("", "localhost"):
            raise ValueError(
                f"The data root {value!r} names host {uri.netloc!r}; a file:// data root must be local "
                "(file:///path). Mount the shared folder on this machine and use its path."
            )
        return unquote(uri.path)
    if scheme == "s3":
        raise ValueError(
            f"The data root {value!r} uses s3://: write it s3a://{value[len('s3://') :]} (Hadoop's S3 "
            "connector, which Spark and Delta Lake use)."
        )
    raise ValueError(
        f"The data root {value!r} is on {scheme}://, which this lakehouse does not support as its data "
        "root: use a local path (shared POSIX storage on a cluster) or an S3 bucket, s3a://bucket/prefix "
        "(an S3-compatible server too, through AWS_ENDPOINT_URL)."
    )


def _check_table(name: str) -> None:
    if name not in TABLES:
        raise ValueError(f"Unknown table {name!r}; expected one of {', '.join(TABLES)}")
