"""The production instance config (deploy/postgres/dagster.yaml) against a real PostgreSQL: a local
server in a temporary cluster directory, `dagster-daemon` running sensor-triggered `medallion` runs,
and the run history read back from PostgreSQL itself, not through Dagster."""

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from heartbeat_assets.simulator import Simulator
from tests.conftest import Lakehouse, free_port
from tests.test_pipeline import assert_gold_matches_oracle

# In `make test-all` only: a PostgreSQL server of its own.
pytestmark = pytest.mark.slow

NOT_INSTALLED = "dagster-postgres is not installed (pip install -e .[postgres])"
pytest.importorskip("dagster_postgres", reason=NOT_INSTALLED)
psycopg2 = pytest.importorskip("psycopg2", reason=NOT_INSTALLED)  # installed with dagster-postgres

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
SENSORS = {"recordings_landing_sensor", "patients_landing_sensor"}
GOLD = {("gold", "heartrate_by_patient"), ("gold", "daily_patient_avg"), ("gold", "device_signal_loss")}
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def postgres_bin_dir() -> Path | None:
    """A folder holding initdb, pg_ctl and postgres: the one of `initdb` on PATH, else Debian's newest."""
    candidates = []
    if on_path := shutil.which("initdb"):
        candidates += [Path(on_path).parent, Path(on_path).resolve().parent]
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    for folder in candidates:
        if all(os.access(folder / program, os.X_OK) for program in SERVER_PROGRAMS):
            return folder
    return None


def server_account() -> pwd.struct_passwd | None:
    """The account to run the server as: none (this process's) unless we are root, which initdb, pg_ctl
    and postgres refuse; then Debian's `postgres`, or `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("running as root, and no 'postgres' or 'nobody' account to run PostgreSQL as")


@dataclass
class Postgres:
    """A database on the local server, and the DAGSTER_PG_* variables that point Dagster at it."""

    env: dict[str, str]

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        connection = psycopg2.connect(
            host=self.env["DAGSTER_PG_HOST"], port=int(self.env["DAGSTER_PG_PORT"]),
            user=self.env["DAGSTER_PG_USER"], password=self.env["DAGSTER_PG_PASSWORD"],
            dbname=self.env["DAGSTER_PG_DB"], connect_timeout=10,
        )  # fmt: skip
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        finally:
            connection.close()


class LocalServer:
    """Debian's PostgreSQL in a temporary cluster directory, on 127.0.0.1, its socket in that directory."""

    def __init__(self, bin_dir: Path, account: pwd.struct_passwd | None):
        self.bin_dir = bin_dir
        self.account = account
        # Not under pytest's tmp_path: as root that is private to root, and the server runs as another
        # account. A short path also keeps the socket's path within the limit of Unix sockets.
        self.base = Path(tempfile.mkdtemp(prefix="heartbeat-pg-"))
        if account is not None:
            os.chown(self.base, account.pw_uid, account.pw_gid)
        self.data = self.base / "cluster"
        self.log = self.base / "server.log"
        self.port = 0

    def run(self, program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        as_account = {}
        if self.account is not None:
            as_account = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        return subprocess.run(
            [str(self.bin_dir / program), *args],
            cwd=self.base, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
            capture_output=True, text=True, timeout=timeout, **as_account,
        )  # fmt: skip

    def start(self) -> None:
        try:
            init = self.run(
                "initdb", "-D", str(self.data), "-U", "admin", "--no-locale", "--encoding=UTF8",
                "--auth-local=trust", "--auth-host=scram-sha-256",
            )  # fmt: skip
        except OSError as e:  # e.g. not allowed to switch to the server's account
            pytest.skip(f"could not run PostgreSQL's initdb: {e}")
        if init.returncode != 0:
            pytest.skip(f"PostgreSQL's initdb failed: {(init.stderr or init.stdout).strip()[-800:]}")
        settings = self.data / "postgresql.conf"
        original = settings.read_text()
        for _ in range(3):  # another process may take the free port before the server binds it
            self.port = free_port()
            settings.write_text(
                original
                + f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                + f"unix_socket_directories = '{self.base}'\n"
                # A throwaway cluster: no need to survive a power cut.
                + "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
            started = self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
            if started.returncode == 0:
                return
        log = self.log.read_text()[-800:] if self.log.exists() else ""
        pytest.skip(f"the local PostgreSQL server did not start: {log.strip()}")

    def create_database(self, name: str, user: str, password: str) -> None:
        """A role that is not a superuser, owning the database, as in production."""
        connection = psycopg2.connect(host=str(self.base), port=self.port, user="admin", dbname="postgres")
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE ROLE {user} LOGIN PASSWORD %s", (password,))
                cursor.execute(f"CREATE DATABASE {name} OWNER {user}")
        finally:
            connection.close()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server programs (initdb, pg_ctl, postgres) not found on PATH or in "
            "/usr/lib/postgresql/*/bin: apt-get install postgresql (.ci/run does)"
        )
    server = LocalServer(bin_dir, server_account())
    try:
        server.start()
        password = secrets.token_hex(16)
        server.create_database("heartbeat_dagster", "heartbeat", password)
        yield Postgres(
            {
                "DAGSTER_PG_HOST": "127.0.0.1",
                "DAGSTER_PG_PORT": str(server.port),
                "DAGSTER_PG_USER": "heartbeat",
                "DAGSTER_PG_PASSWORD": password,
                "DAGSTER_PG_DB": "heartbeat_dagster",
            }
        )
    finally:
        server.stop()


def medallion_runs(postgres: Postgres) -> list[tuple[str, str, float | None, float | None]]:
    try:
        return postgres.query(
            "SELECT run_id, status, start_time, end_time FROM runs WHERE pipeline_name = 'medallion'"
        )
    except psycopg2.errors.UndefinedTable:  # Dagster has not created its tables yet
        return []


def test_sensor_runs_recorded_in_postgres(tmp_path, spark, postgres):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "deploy" / "postgres" / "dagster.yaml", home)
    data = tmp_path / "data"
    sim = Simulator(data, seed=5, patients=3, devices=3)
    # Both sensors see files at their first tick: two run requests, queued one after the other.
    sim.land_patients()
    sim.land_recordings(files=2, records=60)
    env = {**os.environ, **postgres.env, "HEARTBEAT_DATA_DIR": str(data), "DAGSTER_HOME": str(home)}
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(PROJECT / "workspace.yaml")],
            cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        # Two runs take about 4 minutes on 2 cores busy with other Spark jobs; the hourly schedule may
        # add a third.
        deadline = time.monotonic() + 420
        while True:
            runs = medallion_runs(postgres)
            if len(runs) >= 2 and all(status in FINISHED for _, status, _, _ in runs):
                break
            assert daemon.poll() is None, f"dagster-daemon exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"runs in PostgreSQL: {[status for _, status, _, _ in runs]}\n{log_path.read_text()[-3000:]}"
            )
            time.sleep(1)
    finally:
        try:
            os.killpg(daemon.pid, signal.SIGKILL)
        except ProcessLookupError:  # the daemon exited on its own
            pass
        daemon.wait()

    # The run history is in PostgreSQL: the runs, which sensor started them, and one at a time.
    assert [status for _, status, _, _ in runs] == ["SUCCESS"] * len(runs), log_path.read_text()[-3000:]
    triggers = postgres.query(
        "SELECT DISTINCT value FROM run_tags WHERE key = 'heartbeat/trigger' AND run_id = ANY(%s)",
        ([run_id for run_id, _, _, _ in runs],),
    )
    assert {value for (value,) in triggers} == SENSORS
    spans = sorted((start, end) for _, _, start, end in runs)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False)), spans
    # Event log: every gold table materialized.
    materialized = postgres.query(
        "SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
    )
    assert GOLD <= {tuple(json.loads(key)) for (key,) in materialized}
    # Schedule storage: the sensors' ticks that requested the runs.
    ticks = postgres.query("SELECT count(*) FROM job_ticks WHERE type = 'SENSOR' AND status = 'SUCCESS'")
    assert ticks[0][0] >= 2
    # And nothing in SQLite under DAGSTER_HOME (history/runs.db, history/runs/*.db, schedules/...).
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))

    assert_gold_matches_oracle(Lakehouse(data, spark))
