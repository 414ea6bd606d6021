"""Where the data root lives: a local folder, or a prefix of an S3 bucket (`s3a://bucket/prefix`).

Paths under a local root are `pathlib.Path`s. Under an S3 root they are `upath.UPath`s (universal-
pathlib on s3fs): the same pathlib API, so most code needs no branch. The few operations pathlib
does not give alike on both (listing with change times, atomic replace, removing a tree) are here.

S3's endpoint, credentials and region come from where every AWS client finds them: the AWS_*
environment variables (AWS_ENDPOINT_URL for an S3-compatible server) and ~/.aws profiles. Spark's
S3A connector is given the endpoint, region and path-style access from the same variables
(`s3a_settings`); any `spark.hadoop.fs.s3a.*` setting of the run wins.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

#: The schemes a data root may have besides a local path. `s3a` is Hadoop's S3 connector, the one
#: Spark, Delta Lake and delta-rs all read.
OBJECT_STORE_SCHEMES = ("s3a",)


def data_root(data_dir: str):
    """The data root as a path object: `Path` for a local folder, `UPath` for `s3a://bucket/prefix`."""
    if urlparse(data_dir).scheme in OBJECT_STORE_SCHEMES:
        try:
            from upath import UPath
        except ImportError as exc:
            raise ImportError(
                f"A data root on S3 ({data_dir}) needs the `s3` extra of this project: pip install -e '.[s3]'"
            ) from exc
        # Listings are never cached: sensors and runs must see objects that landed a moment ago.
        return UPath(data_dir.rstrip("/"), use_listings_cache=False)
    return Path(data_dir).expanduser().resolve()


def is_local(path) -> bool:
    return isinstance(path, Path)


def uri(path) -> str:
    """The URI Spark records for `path` (file:///... or s3a://...)."""
    return path.as_uri() if is_local(path) else str(path)


#: An object's Last-Modified is when its upload began, so an object can appear under a time already
#: passed. Marks of "changed since" on S3 keep this much overlap: an upload that took longer may
#: not start a sensor run (the next run's listing still ingests it).
UPLOAD_WINDOW_S = 600


def change_margin_ns(folder) -> int:
    """How far behind a listing's start a "changed since" mark must stay to miss no file."""
    return int((1 if is_local(folder) else UPLOAD_WINDOW_S) * 1e9)


@dataclass(frozen=True)
class FileEntry:
    name: str
    #: When the file appeared under this name: a local file's change time (a rename sets it), an
    #: object's Last-Modified (when its upload began).
    changed_ns: int
    modified_at: datetime


def list_files(folder) -> list[FileEntry]:
    """The files directly in `folder` (none if it does not exist)."""
    if is_local(folder):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            try:
                if entry.is_file():
                    stat = entry.stat()
                    found.append(FileEntry(entry.name, stat.st_ctime_ns, _utc(stat.st_mtime)))
            except FileNotFoundError:  # renamed away while listing
                continue
        return found
    try:
        listed = folder.fs.ls(folder.path, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return [
        FileEntry(
            item["name"].rsplit("/", 1)[-1],
            int(item["LastModified"].timestamp() * 1e9),
            item["LastModified"].astimezone(UTC),
        )
        for item in listed
        if item["type"] == "file"
    ]


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def modified_at(path) -> datetime:
    """When the file at `path` was last written."""
    if is_local(path):
        return _utc(path.stat().st_mtime)
    return path.fs.info(path.path)["LastModified"].astimezone(UTC)


def move(source, target) -> None:
    """Move a file, replacing `target`: a rename on a local disk, a copy and delete on S3."""
    if is_local(source):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    else:
        source.fs.mv(source.path, target.path)


def remove_tree(path) -> None:
    """Delete the folder `path` and everything under it, if it exists."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.fs.exists(path.path):
        path.fs.rm(path.path, recursive=True)


def write_text_atomic(path, text: str) -> None:
    """Write a small text file that readers see whole or not at all."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path, data: bytes) -> None:
    """Write a file that readers see whole or not at all: locally under a hidden temporary name (which
    the sensors and Spark skip), then renamed; on S3 in one PUT (an object appears when complete)."""
    if is_local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    else:
        path.write_bytes(data)


def parquet_files(table) -> set[str]:
    """The data files of a Delta table's folder (its log left out)."""
    if is_local(table):
        found = set()
        for folder, dirs, files in os.walk(table):
            dirs[:] = [d for d in dirs if d != "_delta_log"]
            found.update(os.path.join(folder, f) for f in files if f.endswith(".parquet"))
        return found
    try:
        names = table.fs.find(table.path)
    except FileNotFoundError:
        return set()
    return {name for name in names if name.endswith(".parquet") and "/_delta_log/" not in name}


def check_writable(root) -> None:
    """Raise OSError (with `strerror`) unless files can be written under `root`."""
    if is_local(root):
        for folder in ("landing/recordings", "landing/patients", "lakehouse", "checkpoints"):
            (root / folder).mkdir(parents=True, exist_ok=True)
    else:
        bucket = root.path.split("/", 1)[0]
        try:
            exists = root.fs.exists(bucket)
        except Exception as exc:  # credentials, endpoint, network: botocore raises many types
            raise OSError(0, f"S3 refused the request: {exc}") from exc
        if not exists:
            raise OSError(0, f"bucket {bucket!r} does not exist or these credentials cannot see it")
    probe = root / ".write-probe"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError:
        raise
    except Exception as exc:  # botocore's errors are not OSErrors
        raise OSError(0, f"S3 refused a write: {exc}") from exc


def delta_rs_options(path) -> dict[str, str]:
    """delta-rs storage options for a table at `path`: what its AWS_* variables do not say already."""
    if is_local(path):
        return {}
    endpoint = s3_endpoint()
    return {"AWS_ALLOW_HTTP": "true"} if endpoint and endpoint.startswith("http://") else {}


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3a_settings() -> dict[str, str]:
    """Spark's S3A settings from the AWS environment: the endpoint of an S3-compatible server (with
    path-style access, which such servers on an IP address or localhost need), and the region."""
    settings = {}
    if endpoint := s3_endpoint():
        settings["spark.hadoop.fs.s3a.endpoint"] = endpoint
        settings["spark.hadoop.fs.s3a.path.style.access"] = "true"
        if endpoint.startswith("http://"):
            settings["spark.hadoop.fs.s3a.connection.ssl.enabled"] = "false"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    settings["spark.hadoop.fs.s3a.endpoint.region"] = region or "us-east-1"
    return settings


class LockHeld(Exception):
    """The lock is held by another process; `holder` says which."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


class ObjectLease:
    """A lock on an object store: an object created only if absent (a conditional PUT), held by
    renewing it before it expires, deleted on release.

    S3 creates an object with `If-None-Match: *` for one writer only, and replaces it with
    `If-Match: <etag>` only if nobody changed it since: so one process holds the lease, and a lease
    whose holder died (it stopped renewing) is taken over once expired, or at once when its holder
    was a process of this machine that no longer runs.
    """

    def __init__(self, path, seconds: float = 60.0):
        self.path, self.seconds = path, seconds
        self.bucket, self.key = path.path.split("/", 1)
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str | None = None

    def _call(self, method: str, **kwargs):
        return self.path.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def _read(self) -> tuple[str, dict]:
        etag = self._call("head_object")["ETag"]
        return etag, json.loads(self.path.fs.cat_file(self.path.path))

    def _body(self) -> bytes:
        return json.dumps(
            {
                "holder": f"pid {os.getpid()} on {socket.gethostname()}",
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self._token,
                "expires_at": time.time() + self.seconds,
            }
        ).encode()

    def acquire(self) -> None:
        self._token = uuid.uuid4().hex
        try:
            self._etag = self._call("put_object", Body=self._body(), IfNoneMatch="*")["ETag"]
        except Exception as exc:
            if not _precondition_failed(exc):
                raise
            etag, held = self._read()
            if not _stale(held):
                raise LockHeld(f"{held.get('holder', 'another process')}") from None
            try:
                # Replaced only if unchanged since read: the body read may be newer than `etag`.
                self._etag = self._call("put_object", Body=self._body(), IfMatch=etag)["ETag"]
            except Exception as exc2:
                if _precondition_failed(exc2):
                    raise LockHeld("another process, which took it over a moment ago") from None
                raise
        self._renewer = threading.Thread(target=self._renew, name="lakehouse-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.seconds / 3):
            try:
                self._etag = self._call("put_object", Body=self._body(), IfMatch=self._etag)["ETag"]
                renewed = time.monotonic()
            except Exception as exc:  # noqa: BLE001 (the run reports it when it releases the lock)
                if _precondition_failed(exc):
                    self.lost = f"another process took the lock over ({exc})"
                    return
                if time.monotonic() - renewed > self.seconds:  # a passing error is retried until then
                    self.lost = f"it could not be renewed for {self.seconds:g} s ({exc})"
                    return

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            if self._read()[1].get("token") == self._token:
                self._call("delete_object")
        except Exception as exc:  # noqa: BLE001 (an expired lease is taken over by the next run)
            self.lost = self.lost or str(exc)


def _precondition_failed(exc: BaseException) -> bool:
    """Whether S3 refused a conditional request (s3fs raises it as FileExistsError from botocore's)."""
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc.__cause__ or exc, "response", None) or {}
    code = response.get("Error", {}).get("Code", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _stale(held: dict) -> bool:
    """Whether a lease's holder is gone: it expired, or its process on this machine has exited."""
    if held.get("expires_at", 0) < time.time():
        return True
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
    return False
