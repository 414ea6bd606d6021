"""The benchmark: the pipeline through the real Dagster entry point against the notebooks' way.

    make bench                      # full run: 2M recordings, 10k-file history, 20 landings
    python -m benchmarks.run --quick   # small sizes, to try the benchmark itself

Every measurement is one whole process (Python, Dagster, the JVM) timed from start to exit, with
the peak resident memory of its process tree. Prints a table and writes the numbers as JSON to
`benchmarks/results/` for comparison across commits.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from heartbeat_assets.simulator import Faults, Simulator
from resources.jvm import default_cache_dir, stop_warm_drivers, warm_driver_keepers

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = PROJECT / "benchmarks" / "results"
#: Dagster's daemon evaluates sensors at most this often (`MIN_INTERVAL_LOOP_TIME`).
SENSOR_LOOP_S = 5
MEDALLION = [str(BIN / "dagster"), "job", "execute", "-m", "heartbeat_assets", "-j", "medallion"]
#: Spark Declarative Pipelines, the peer, in a virtual environment of its own (`make bench` makes it).
DECLARATIVE_BIN = PROJECT / ".venv-declarative" / "bin"
DECLARATIVE_PIPELINE = PROJECT / "benchmarks" / "declarative" / "heartbeat.py"
SESSION_START = [
    sys.executable,
    "-c",
    "from pyspark.sql import SparkSession; "
    "SparkSession.builder.master('local[*]').config('spark.ui.enabled', 'false').getOrCreate().stop()",
]


@dataclass
class Measured:
    wall_s: float
    peak_rss_mib: float


def median(runs: list[Measured]) -> Measured:
    """The median wall time of `runs`, with the highest peak memory of any of them."""
    return Measured(statistics.median(run.wall_s for run in runs), max(run.peak_rss_mib for run in runs))


def measure(command: list[str], env: dict[str, str], log: Path, cwd: Path = PROJECT) -> Measured:
    """Run `command` to its end; its wall time and the peak resident memory of its process tree."""
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        process = psutil.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        warm_jvm = env.get("HEARTBEAT_WARM_JVM", "").strip() not in ("0", "0.0")
        server = _connect_server_pid(env.get("HEARTBEAT_SPARK_REMOTE"))
        while process.poll() is None:
            peak = max(peak, _tree_memory(process, warm_jvm and server is None, server))
            time.sleep(0.1)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"`{' '.join(command)}` failed with exit code {process.returncode}; see {log}")
    return Measured(round(wall, 2), round(peak / 2**20, 1))


def _connect_server_pid(url: str | None) -> int | None:
    """The pid of the local Spark Connect server at `url` (as `heartbeat-connect-server` started it)."""
    from resources import connect_server

    return connect_server.server_pid(int(url.rsplit(":", 1)[1])) if url else None


def _tree_memory(process: psutil.Process, warm_jvm: bool = True, server: int | None = None) -> int:
    """Resident memory of a process tree, in bytes, each shared page counted once.

    Summing plain RSS would count the JVM twice whenever it forks a helper process (Hadoop's local
    file system does, for permissions): the child shares all of its parent's pages for a moment.
    The proportional set size (PSS) splits shared pages among the processes that map them.
    The warm driver JVM a run uses (`resources.jvm.WarmDriver`) is not the run's child: unless the
    run starts its own JVM (`warm_jvm` false), the keeper's process tree counts as the run's too; so
    does the Spark Connect `server` a run uses.
    """
    total = 0
    members: dict[int, psutil.Process] = {}
    keepers = warm_driver_keepers(default_cache_dir()) if warm_jvm else []
    for pid in [process.pid, *keepers, *([server] if server else [])]:
        try:
            leader = psutil.Process(pid)
            members.update((member.pid, member) for member in [leader, *leader.children(recursive=True)])
        except psutil.Error:
            continue
    for member in members.values():
        try:
            with open(f"/proc/{member.pid}/smaps_rollup") as rollup:
                total += next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
        except (OSError, StopIteration):  # exited while we looked
            continue
    return total


#: Where the baseline's copy of the landing keeps the recordings landed as JSON arrays.
ARRAYS_FOLDER = "recordings_arrays"


def is_json_array(path: Path) -> bool:
    with gzip.open(path) if path.name.endswith(".gz") else path.open("rb") as data:
        return data.read(64).lstrip().startswith(b"[")


class Workspace:
    """A data root and a Dagster instance of its own, for the pipeline or the baseline."""

    def __init__(self, root: Path, name: str):
        self.data = root / name / "data"
        self.home = root / name / "dagster_home"
        self.home.mkdir(parents=True)
        shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", self.home)
        self.log = root / f"{name}.log"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "HEARTBEAT_DATA_DIR": str(self.data),
            "DAGSTER_HOME": str(self.home),
            **extra,
        }

    def medallion(self, **extra: str) -> Measured:
        return measure(MEDALLION, self.env(**extra), self.log)

    def baseline(self) -> Measured:
        return measure([sys.executable, "-m", "benchmarks.baseline", str(self.data)], self.env(), self.log)

    def declarative(self, landed: int) -> Measured:
        """One `spark-pipelines run` of the peer over this workspace's landing, whose gold must count
        the `landed` recordings (else its time measures less than the work). Its tables and their
        catalog (a Derby metastore) live in the workspace, so each run continues from the last."""
        spec = self.data.parent / "spark-pipeline.yml"
        pipeline = {  # JSON is YAML
            "name": "heartbeat_peer",
            # A path relative to the spec's folder: SDP takes no absolute one.
            "libraries": [{"glob": {"include": os.path.relpath(DECLARATIVE_PIPELINE, spec.parent)}}],
            "storage": (self.data / "storage").as_uri(),
            "configuration": {
                "spark.sql.shuffle.partitions": "2",
                "spark.sql.session.timeZone": "UTC",
                "spark.sql.streaming.schemaInference": "true",
                "heartbeat.landing": str(self.data / "landing"),
            },
        }
        spec.write_text(json.dumps(pipeline, indent=2))
        command = [
            str(DECLARATIVE_BIN / "spark-pipelines"), "run", "--spec", str(spec),
            "--conf", f"spark.sql.warehouse.dir={self.data / 'warehouse'}",
            "--conf", "spark.sql.catalogImplementation=hive",
            "--conf", "spark.ui.enabled=false",
        ]  # fmt: skip
        env = {**self.env(), "PATH": f"{DECLARATIVE_BIN}{os.pathsep}{os.environ['PATH']}"}
        env["PYSPARK_PYTHON"] = str(DECLARATIVE_BIN / "python")
        env["PYTHONPATH"] = str(PROJECT)  # the pipeline imports the baseline's transformations
        measured = measure(command, env, self.log, cwd=self.data.parent)  # Derby's files go there
        gold = self.data / "warehouse" / "fact_heartbeat_by_patient_gold"
        count = (
            "import sys, pyarrow.parquet as pq; print(sum(pq.read_table(sys.argv[1])['count'].to_pylist()))"
        )
        counted = subprocess.run(
            [str(DECLARATIVE_BIN / "python"), "-c", count, str(gold)],
            capture_output=True,
            text=True,
            check=True,
        )
        if int(counted.stdout) != landed:
            sys.exit(f"The declarative peer's gold counts {int(counted.stdout)} recordings, not the "
                     f"{landed} landed; see {self.log}")  # fmt: skip
        return measured

    def copy_new_landings_from(self, other: Workspace) -> None:
        """Copy the files `other` landed since the last copy, JSON-array files into a folder of their
        own: the baseline reads JSON Lines and JSON arrays with different reader options, as a user of
        the notebooks' way would have to."""
        for source in sorted((other.data / "landing").rglob("*")):
            if not source.is_file():
                continue
            relative = source.relative_to(other.data / "landing")
            if relative.parts[0] == "recordings" and is_json_array(source):
                relative = Path(ARRAYS_FOLDER, *relative.parts[1:])
            target = self.data / "landing" / relative
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


def land(
    workspace: Workspace, files: int, records: int, wave: int, devices: int = 50, faults: Faults | None = None
) -> None:
    sim = Simulator(workspace.data, seed=5, patients=devices, devices=devices)
    if wave == 0:
        sim.land_patients()
    sim.land_recordings(files, records, faults=faults, wave=wave, progress=files * records >= 200_000)


@dataclass(frozen=True)
class Shape:
    """A way the same recordings arrive: files of `per_file` recordings, a share of them gzipped
    (`.json.gz`) or written as one JSON array instead of JSON Lines."""

    per_file: int
    gzip_files: float = 0.0
    array_files: float = 0.0

    def faults(self) -> Faults:
        return Faults(gzip_files=self.gzip_files, array_files=self.array_files)

    def describe(self, files: int, per_file: int) -> str:
        mixed = " (some gzipped, some JSON arrays)" if self.gzip_files or self.array_files else ""
        return f"{files} files of {per_file:,}{mixed}"


#: Shapes users have, besides the many small files of `bench_load` (`--files`): the same number of
#: recordings in medium files and in a few large ones.
SHAPES = {"medium": Shape(10_000), "large": Shape(100_000, gzip_files=0.3, array_files=0.3)}


#: Spark's phases of a streaming query's micro-batches, as the assets report them (`spark_<phase>_ms`).
QUERY_PHASES = ("latestOffset", "getBatch", "queryPlanning", "addBatch", "walCommit", "commitOffsets")


def profile(workspace: Workspace, wall_s: float) -> dict:
    """Where the workspace's newest run spent its time, from its Dagster event log.

    Each step's time; in it, each streaming query's time by Spark's phases (`addBatch` runs the
    micro-batch: read, transform, write) and the step's time outside its queries (table state and
    commits of batch writes, asset checks, metadata; in the first step, Spark's start). Dagster's
    share is the run's wall time outside its steps: the process's start, imports, loading the code,
    the instance's storage.
    """
    from dagster import DagsterEventType, DagsterInstance

    with DagsterInstance.from_config(str(workspace.home)) as instance:
        (run,) = instance.get_runs(limit=1)
        logs = instance.all_logs(run.run_id)
    steps: dict[str, dict] = {}
    for entry in logs:
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.STEP_START:
            steps[entry.step_key] = {"started": entry.timestamp, "queries": {}}
        elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            step = steps[entry.step_key]
            step["step_s"] = round(entry.timestamp - step.pop("started"), 2)
        elif event.is_step_materialization:
            materialization = event.step_materialization_data.materialization
            metadata = {key: value.value for key, value in materialization.metadata.items()}
            if "query_duration_s" in metadata:
                phases = {p: round(metadata.get(f"spark_{p}_ms", 0) / 1000, 2) for p in QUERY_PHASES}
                query = {"query_s": metadata["query_duration_s"], **phases}
                steps[entry.step_key]["queries"][materialization.asset_key.to_user_string()] = query
    for step in steps.values():
        # A query that writes two tables reports the same numbers on each: name it once, by both.
        by_numbers: dict[tuple, list[str]] = {}
        for table, query in step["queries"].items():
            by_numbers.setdefault(tuple(query.items()), []).append(table)
        step["queries"] = {" + ".join(tables): dict(numbers) for numbers, tables in by_numbers.items()}
        # Queries of one step may run at once (gold's): its time outside them is at least zero.
        step["outside_queries_s"] = round(
            max(0.0, step["step_s"] - sum(q["query_s"] for q in step["queries"].values())), 2
        )
    return {
        "wall_s": wall_s,
        "dagster_s": round(wall_s - sum(s["step_s"] for s in steps.values()), 2),
        "steps": steps,
    }


def markdown(rows: list[tuple]) -> str:
    """`rows` (the first is the header) as a Markdown table with aligned columns."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def record_profile(workspace: Workspace, measured: dict) -> None:
    """Add the profile of the workspace's initial load (just run) to `measured`, and print it."""
    measured["initial_load_profile"] = profile(workspace, measured["initial_load"]["ours"]["wall_s"])
    print(profile_table(measured["initial_load_profile"]), flush=True)


def profile_table(measured: dict) -> str:
    """A run's profile as a Markdown table: one row per step, then one per streaming query in it."""
    rows = [("step / query", "s", *QUERY_PHASES)]
    for name, step in measured["steps"].items():
        rows.append((name, step["step_s"], *["" for _ in QUERY_PHASES]))
        for table, query in step["queries"].items():
            rows.append((f"  query {table}", query["query_s"], *(query[p] for p in QUERY_PHASES)))
        rows.append(("  outside its queries", step["outside_queries_s"], *["" for _ in QUERY_PHASES]))
    rows.append(("Dagster, outside the steps", measured["dagster_s"], *["" for _ in QUERY_PHASES]))
    rows.append(("the whole run", measured["wall_s"], *["" for _ in QUERY_PHASES]))
    return markdown(rows)


def bench_shapes(root: Path, args, results: dict) -> None:
    """Initial load and +10 files for each shape in `args.shapes`: ours and the baseline, same files."""
    for name in args.shapes:
        shape = SHAPES[name]
        per_file = shape.per_file // 100 if args.quick else shape.per_file
        files = max(1, args.records // per_file)
        ours, base = Workspace(root, f"ours-{name}"), Workspace(root, f"baseline-{name}")
        peer = Workspace(root, f"declarative-{name}")
        measured: dict = {"files": files, "per_file": per_file, "describe": shape.describe(files, per_file)}
        print(f"Shape {name}: landing {shape.describe(files, per_file)} ...", flush=True)
        landed = 0
        for key, wave, count in (("initial_load", 0, files), ("plus_10_files", 1, 10)):
            land(ours, count, per_file, wave=wave, faults=shape.faults())
            landed += count * per_file
            base.copy_new_landings_from(ours)
            measured[key] = {"ours": asdict(ours.medallion())}
            if args.profile and key == "initial_load":
                record_profile(ours, measured)
                measured["parse_floor"] = parse_floor(ours)
                print(f"  {name}, parse alone: {measured['parse_floor']}", flush=True)
            if not args.skip_baseline:
                measured[key]["baseline"] = asdict(base.baseline())
            if declarative_peer(args):
                peer.copy_new_landings_from(ours)
                measured[key]["declarative"] = asdict(peer.declarative(landed))
            print(f"  {name}, {key.replace('_', ' ')}: {measured[key]}", flush=True)
        results.setdefault("shapes", {})[name] = measured


def parse_floor(workspace: Workspace) -> dict:
    """`benchmarks.parse_floor` over the recordings landed in `workspace`, in a process of its own."""
    command = [sys.executable, "-m", "benchmarks.parse_floor", str(workspace.data / "landing" / "recordings")]
    with workspace.log.open("a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(
            command, cwd=PROJECT, env=workspace.env(), stdout=subprocess.PIPE, stderr=log, text=True
        )
    if done.returncode != 0:
        sys.exit(f"`{' '.join(command)}` failed with exit code {done.returncode}; see {workspace.log}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def declarative_peer(args) -> bool:
    """Whether to run the Spark Declarative Pipelines peer: asked for, and installed."""
    if args.skip_declarative:
        return False
    if not (DECLARATIVE_BIN / "spark-pipelines").exists():
        sys.exit("The Spark Declarative Pipelines peer is not installed: run `make bench`, which makes "
                 "it, or pass --skip-declarative.")  # fmt: skip
    return True


def prepare_class_archive(root: Path, results: dict) -> None:
    """The first Spark session on a machine writes the driver JVM's class archive; do it untimed.

    There are two: a JVM of the run's own and the warm driver JVM start with different JIT options.
    Their runs are recorded apart: they cost once per machine (and Java or pyspark version), like setup.
    """
    from resources import LakehouseResource, SparkSessionResource
    from resources.jvm import ClassArchive

    cache = default_cache_dir()
    resource = SparkSessionResource(lakehouse=LakehouseResource(data_dir=str(root)))
    for warm in (False, True):
        options = resource.session_config(warm_driver=warm)["spark.driver.extraJavaOptions"]
        if cache is None or ClassArchive(cache, options).path.exists():
            continue
        name = "first_warm_driver_writes_class_archive" if warm else "first_run_writes_class_archive"
        workspace = Workspace(root, name)
        land(workspace, 2, 100, wave=0, devices=4)
        # A JVM of the run's own writes its archive as the run ends, a warm one when it stops.
        results[name] = asdict(workspace.medallion(**({} if warm else {"HEARTBEAT_WARM_JVM": "0"})))
        stop_warm_drivers(cache)
        print(f"  {name.replace('_', ' ')}: {results[name]}", flush=True)


def bench_load(root: Path, args, results: dict) -> None:
    """Initial load, +10 files, idle run: ours and the baseline on the same files."""
    ours, base = Workspace(root, "ours"), Workspace(root, "baseline")
    per_file = args.records // args.files
    print(f"Landing {args.files} files of {per_file} recordings ...", flush=True)
    land(ours, args.files, per_file, wave=0)
    base.copy_new_landings_from(ours)
    results["initial_load"] = {"ours": asdict(ours.medallion())}
    print(f"  initial load, ours: {results['initial_load']['ours']}", flush=True)
    if args.profile:
        record_profile(ours, results)
    if not args.skip_baseline:
        results["initial_load"]["baseline"] = asdict(base.baseline())
        print(f"  initial load, baseline: {results['initial_load']['baseline']}", flush=True)
    if declarative_peer(args):
        peer = Workspace(root, "declarative")
        peer.copy_new_landings_from(ours)
        results["initial_load"]["declarative"] = asdict(peer.declarative(args.files * per_file))
        print(f"  initial load, declarative: {results['initial_load']['declarative']}", flush=True)
    # Each the median of `args.pickups` pickups in a row: one run varies by seconds here.
    pickups: dict[str, list[Measured]] = {"ours": [], "baseline": []}
    for wave in range(1, args.pickups + 1):
        land(ours, 10, per_file, wave=wave)
        base.copy_new_landings_from(ours)
        pickups["ours"].append(ours.medallion())
        if not args.skip_baseline:
            pickups["baseline"].append(base.baseline())
    results["plus_10_files"] = {
        who: {**asdict(median(runs)), "each_s": [run.wall_s for run in runs]}
        for who, runs in pickups.items()
        if runs
    }
    print(f"  +10 files: {results['plus_10_files']}", flush=True)
    # The same with a JVM started by the run, as without the warm driver JVM.
    land(ours, 10, per_file, wave=args.pickups + 1)
    results["plus_10_files_jvm_per_run"] = {"ours": asdict(ours.medallion(HEARTBEAT_WARM_JVM="0"))}
    if "baseline" in results["plus_10_files"]:
        results["plus_10_files_jvm_per_run"]["baseline"] = results["plus_10_files"]["baseline"]
    print(f"  +10 files, a JVM per run: {results['plus_10_files_jvm_per_run']}", flush=True)
    results["idle_run"] = {"ours": asdict(ours.medallion())}
    print(f"  idle: {results['idle_run']}", flush=True)
    if args.connect:
        bench_connect_pickups(root, ours, args, results, wave=args.pickups + 2)


def bench_connect_pickups(root: Path, ours: Workspace, args, results: dict, wave: int) -> None:
    """+10 files through a warm Spark Connect server: the median of `args.pickups` pickups after one
    untimed pickup (the server's first run), on the data of `bench_load`."""
    per_file = args.records // args.files
    runs = []
    with connect_server(root) as remote:
        for index in range(args.pickups + 1):
            land(ours, 10, per_file, wave=wave + index)
            measured = ours.medallion(HEARTBEAT_SPARK_REMOTE=remote)
            if index:
                runs.append(measured)
    results["plus_10_files_spark_connect"] = {
        "ours": {**asdict(median(runs)), "each_s": [run.wall_s for run in runs]}
    }
    print(f"  +10 files, warm Spark Connect server: {results['plus_10_files_spark_connect']}", flush=True)


def bench_history(root: Path, args, results: dict) -> None:
    """A pickup of 10 files after a long history of landed files vs after a short one.

    Each is the median of `args.pickups` pickups in a row: one run of ~15 s on this machine varies
    by seconds, as much as the difference being measured.
    """
    for history in (10, args.history_files):
        workspace = Workspace(root, f"history-{history}")
        land(workspace, history, args.history_records, wave=0)
        setup = workspace.medallion()
        pickups = []
        for wave in range(1, args.pickups + 1):
            land(workspace, 10, args.history_records, wave=wave)
            pickups.append(workspace.medallion())
        results[f"pickup_after_{history}_files"] = {
            "ours": asdict(median(pickups)),
            "each_s": [p.wall_s for p in pickups],
            "history_load": asdict(setup),
        }
        print(f"  pickups of 10 after {history}: {results[f'pickup_after_{history}_files']}", flush=True)


def bench_sensor_tick(root: Path, args, results: dict) -> None:
    """The recordings sensor's tick over a landing folder of many files: idle, and with one new file."""
    from dagster import build_sensor_context

    from heartbeat_assets.sensors import recordings_landing_sensor
    from resources import LakehouseResource

    data = root / "sensor" / "data"
    folder = data / "landing" / "recordings"
    folder.mkdir(parents=True)
    for index in range(args.sensor_files):
        (folder / f"recordings-{index:06d}.json").touch()
    # One look at the folder per tick: what a watching tick repeats every 0.1 s while it waits.
    lakehouse = LakehouseResource(data_dir=str(data), landing_watch_seconds=0)
    time.sleep(1.5)  # past the sensor's settle time

    def tick(cursor: str | None):
        context = build_sensor_context(cursor=cursor, resources={"lakehouse": lakehouse})
        started = time.perf_counter()
        result = recordings_landing_sensor(context)
        return (time.perf_counter() - started) * 1000, getattr(result, "cursor", None) or context.cursor

    _, cursor = tick(None)  # the first tick sees every file
    idle = [tick(cursor)[0] for _ in range(5)]
    new = []
    for index in range(5):
        (folder / f"recordings-new-{index}.json").touch()
        time.sleep(1.2)
        ms, cursor = tick(cursor)
        new.append(ms)
    results["sensor_tick"] = {
        "files": args.sensor_files,
        "idle_ms": round(statistics.median(idle), 2),
        "new_file_ms": round(statistics.median(new), 2),
    }
    print(f"  sensor tick: {results['sensor_tick']}", flush=True)


@contextmanager
def connect_server(root: Path):
    """A warm Spark Connect server on 127.0.0.1, as `heartbeat-connect-server` starts it."""
    from resources import connect_server as server

    port = int(_free_port())
    url = server.start(port)
    try:
        yield url
    finally:
        server.stop(port)


#: How the runs of `dagster dev` get their Spark: the name of the result, the environment it adds.
LATENCY_MODES = {
    "warm_driver": ("landing_to_gold_latency", {}),
    "jvm_per_run": ("landing_to_gold_latency_jvm_per_run", {"HEARTBEAT_WARM_JVM": "0"}),
    "spark_connect": ("landing_to_gold_latency_spark_connect", {}),
}


def bench_latency(
    root: Path, args, results: dict, mode: str = "warm_driver", remote: str | None = None
) -> None:
    """Landing -> gold updated through the sensor of a running `dagster dev`, over several landings.

    `mode` is one of `LATENCY_MODES`; with `spark_connect`, the runs use the server at `remote`.
    """
    from dagster import AssetKey, DagsterInstance

    from resources import TABLES

    key, extra_env = LATENCY_MODES[mode]
    if mode == "spark_connect":
        extra_env = {"HEARTBEAT_SPARK_REMOTE": remote}
    workspace = Workspace(root, f"latency_{mode}")
    land(workspace, 4, 100, wave=0, devices=4)
    port = _free_port()
    dev = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-w", str(PROJECT / "workspace.yaml"), "-h", "127.0.0.1", "-p", port],
        cwd=PROJECT,
        env=workspace.env(**extra_env),
        stdout=workspace.log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # Gold is updated when each of its tables is: its queries run at the same time, in any order.
    gold = [AssetKey(table.split("/")) for table in TABLES if table.startswith("gold/")]
    os.environ["DAGSTER_HOME"] = str(workspace.home)
    latencies, phases = [], []
    try:
        instance = DagsterInstance.get()
        _wait(lambda: _materialized_after(instance, gold, 0), 300, "the first sensor run")
        sim = Simulator(workspace.data, seed=5, patients=4, devices=4)
        # Files land at any moment of the sensor daemon's 5 s cycle. A fixed pause after the last run
        # would land each at the same point of the cycle, and so wait about as long for every tick.
        pauses = random.Random(5)
        for landing in range(args.latency_landings):
            _wait(lambda: _idle(instance), 120, "runs to finish")
            time.sleep(1 + pauses.uniform(0, SENSOR_LOOP_S))
            landed_at = time.time()
            sim.land_recordings(1, 100, wave=10 + landing)
            updated = _wait(
                lambda after=landed_at: _materialized_after(instance, gold, after), 120, "gold to update"
            )
            latencies.append(round(updated - landed_at, 2))
            phases.append(_latency_phases(instance, landed_at, updated))
            print(f"  landing {landing + 1}: {latencies[-1]} s {phases[-1]}", flush=True)
    finally:
        os.killpg(dev.pid, 15)
        try:
            dev.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, 9)
    results[key] = {
        "landings": len(latencies),
        "p50_s": round(statistics.median(latencies), 2),
        "p95_s": round(_percentile(latencies, 95), 2),
        "all_s": latencies,
        # Medians of where the time went: landed -> run created -> first step -> gold committed.
        "median_phases_s": {
            phase: round(statistics.median(p[phase] for p in phases if phase in p), 2)
            for phase in ("to_run_created", "to_first_step", "to_gold")
            if any(phase in p for p in phases)
        },
    }


def _latency_phases(instance, landed_at: float, updated: float) -> dict[str, float]:
    """Seconds from a landing to the sensor's run being created, from then to its first step, and from
    then to gold's materialization, from Dagster's run records and event log."""
    from dagster import DagsterEventType, RunsFilter

    records = instance.get_run_records(
        RunsFilter(created_after=datetime.fromtimestamp(landed_at, UTC)), limit=5, ascending=True
    )
    if not records:
        return {}
    record = records[0]
    created = record.create_timestamp.timestamp()
    steps = instance.all_logs(record.dagster_run.run_id, of_type=DagsterEventType.STEP_START)
    phases = {"to_run_created": round(created - landed_at, 2)}
    if steps:
        first_step = min(event.timestamp for event in steps)
        phases.update(to_first_step=round(first_step - created, 2), to_gold=round(updated - first_step, 2))
    return phases


def _materialized_after(instance, keys, after: float) -> float | None:
    """When the last of `keys` was materialized, if each was after `after`; else None."""
    events = [instance.get_latest_materialization_event(key) for key in keys]
    if any(event is None or event.timestamp <= after for event in events):
        return None
    return max(event.timestamp for event in events)


def _idle(instance) -> bool:
    from dagster import DagsterRunStatus, RunsFilter

    busy = [DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
    return not instance.get_run_records(RunsFilter(statuses=busy))


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    sys.exit(f"gave up waiting for {what} after {timeout} s")


def _percentile(values: list[float], percent: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    import dagster
    import pyspark

    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "java": java,
        "pyspark": pyspark.__version__,
        "dagster": dagster.__version__,
    }


def _declarative_row(label: str, ours: float, peer: float, key: str) -> tuple:
    """A row of ours against the Spark Declarative Pipelines peer (in the baseline's column)."""
    target = "ratio <= 0.7" if key == "initial_load" else "-"
    label = f"{label.removesuffix(' (s)')}, against Spark Declarative Pipelines (s)"
    return (label, ours, peer, f"{ours / peer:.2f}", target)


def table(results: dict) -> str:
    """The results as a Markdown table: ours, the baseline where there is one, ratio and target."""

    def wall(key: str, who: str = "ours", within: dict = results):
        entry = within.get(key, {}).get(who)
        return entry["wall_s"] if entry else None

    session = results["session_start"]["wall_s"]
    rows = [("measurement", "ours", "baseline", "ratio", "target")]
    plus_10_runs = len(results.get("plus_10_files", {}).get("ours", {}).get("each_s", [None]))
    for key, label in (
        ("initial_load", "initial load, all layers (s)"),
        ("plus_10_files", f"+10 files, median of {plus_10_runs} (s)"),
        ("plus_10_files_jvm_per_run", "+10 files, a JVM per run: HEARTBEAT_WARM_JVM=0 (s)"),
    ):
        if key not in results:
            continue
        ours, base = wall(key), wall(key, "baseline")
        rows.append((label, ours, base or "-", f"{ours / base:.2f}" if base else "-", "ratio <= 0.33"))
        if peer := wall(key, "declarative"):
            rows.append(_declarative_row(label, ours, peer, key))
    if "plus_10_files_spark_connect" in results and "plus_10_files_jvm_per_run" in results:
        ours, per_run = wall("plus_10_files_spark_connect"), wall("plus_10_files_jvm_per_run")
        label = f"+10 files, warm Spark Connect server, median of {plus_10_runs} (s)"
        rows.append((label, ours, "-", f"{ours / per_run:.2f} of a JVM per run", "ratio <= 0.5"))
    for shape in results.get("shapes", {}).values():
        labels = (f"initial load, {shape['describe']}", f"+10 files of {shape['per_file']:,} after it")
        for key, label in zip(("initial_load", "plus_10_files"), labels, strict=True):
            ours, base = wall(key, "ours", shape), wall(key, "baseline", shape)
            ratio = f"{ours / base:.2f}" if base else "-"
            rows.append((f"{label} (s)", ours, base or "-", ratio, "ratio <= 0.33"))
            if peer := wall(key, "declarative", shape):
                rows.append(_declarative_row(f"{label} (s)", ours, peer, key))
        if floor := shape.get("parse_floor"):
            label = f"bronze's parse alone / Spark's JSON reader, {shape['describe']} (s)"
            ours, reader = floor["bronze_parse_s"], floor["json_reader_s"]
            rows.append((label, ours, reader, f"{ours / reader:.2f}", "-"))
        memory = shape["initial_load"]["ours"]["peak_rss_mib"]
        rows.append(
            (f"peak memory, initial load, {shape['per_file']:,} per file (MiB)", memory, "-", "-", "<= 1536")
        )
    if "idle_run" in results:
        rows.append(("idle run (s)", wall("idle_run"), "-", "-", f"<= session start + 3 = {session + 3:.1f}"))
    rows.append(("session start (s)", session, "-", "-", "-"))
    for key, jvm in (("first_run_writes_class_archive", "a JVM of its own"),
                     ("first_warm_driver_writes_class_archive", "the warm driver JVM")):  # fmt: skip
        if key in results:
            label = f"first run on the machine in {jvm}, writes its class archive (s)"
            rows.append((label, results[key]["wall_s"], "-", "-", "once"))
    pickups = sorted((int(k.split("_")[2]), k) for k in results if k.startswith("pickup_after_"))
    if len(pickups) == 2:
        (short, short_key), (long, long_key) = pickups
        each = len(results[long_key].get("each_s", [None]))
        label = f"pickup of 10 files after {long} vs {short} files, median of {each} (s)"
        ratio = wall(long_key) / wall(short_key)
        rows.append((label, f"{wall(long_key)} vs {wall(short_key)}", "-", f"{ratio:.2f}", "ratio <= 1.2"))
    if "initial_load" in results:
        load = results["initial_load"]
        memory = (load["ours"]["peak_rss_mib"], load.get("baseline", {}).get("peak_rss_mib", "-"))
        rows.append(("peak memory, initial load (MiB)", *memory, "-", "<= 1536"))
    if "sensor_tick" in results:
        tick = results["sensor_tick"]
        label = f"sensor tick at {tick['files']} files, idle / new file (ms)"
        rows.append((label, f"{tick['idle_ms']} / {tick['new_file_ms']}", "-", "-", "flat in files landed"))
    per_run = results.get("landing_to_gold_latency_jvm_per_run")
    for key, how, target in (
        ("landing_to_gold_latency", "warm driver JVM", "p50 <= 10"),
        ("landing_to_gold_latency_jvm_per_run", "a JVM per run", "-"),
        ("landing_to_gold_latency_spark_connect", "warm Spark Connect server", "ratio <= 0.5"),
    ):
        if key in results:
            lat = results[key]
            label = f"landing -> gold via sensor, {how}, p50 / p95 of {lat['landings']} (s)"
            ratio = "-"
            if per_run and key.endswith("spark_connect"):
                ratio = f"{lat['p50_s'] / per_run['p50_s']:.2f} / {lat['p95_s'] / per_run['p95_s']:.2f}"
            rows.append((label, f"{lat['p50_s']} / {lat['p95_s']}", "-", ratio, target))
    return markdown(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=2_000_000, help="recordings in the initial load")
    parser.add_argument("--files", type=int, default=1000, help="files they arrive in")
    parser.add_argument(
        "--shapes",
        type=lambda text: [name for name in text.split(",") if name],
        default=list(SHAPES),
        help=f"other shapes of the same recordings, comma-separated, of: {', '.join(SHAPES)} "
        "(each: initial load and +10 files, against the baseline); '' for none",
    )
    parser.add_argument("--history-files", type=int, default=10_000)
    parser.add_argument("--history-records", type=int, default=20, help="recordings per history file")
    parser.add_argument(
        "--pickups", type=int, default=3, help="pickups of 10 files timed (+10 files, each history)"
    )
    parser.add_argument("--sensor-files", type=int, default=100_000)
    parser.add_argument("--latency-landings", type=int, default=20)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--skip-declarative", action="store_true", help="without the Spark Declarative Pipelines peer"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print where each initial load spent its time, step by step"
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--connect",
        action="store_true",
        help="also measure +10 files and the latency through a warm Spark Connect server",
    )
    parser.add_argument("--only-latency", action="store_true", help="measure the latency only")
    parser.add_argument(
        "--only-shapes",
        action="store_true",
        help="measure the shapes of --shapes only (initial load, +10 files)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, to try the benchmark")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and logs")
    args = parser.parse_args(argv)
    if unknown := [name for name in args.shapes if name not in SHAPES]:
        parser.error(f"--shapes: no shape {', '.join(unknown)}; the shapes are {', '.join(SHAPES)}")
    if args.connect:
        try:
            import pyspark.sql.connect.session  # noqa: F401  (grpcio, pandas, pyarrow, ...)
        except ImportError as exc:
            parser.error(
                f"--connect needs Spark Connect's client libraries ({exc}): install them with "
                f"`{BIN / 'pip'} install -e '.[connect]'`."
            )
    if args.quick:
        args.records, args.files, args.history_files, args.sensor_files = 20_000, 20, 200, 2_000
        args.latency_landings = min(args.latency_landings, 3)

    root = Path(tempfile.mkdtemp(prefix="heartbeat-bench-"))
    print(f"Working in {root} (logs: {root}/*.log)", flush=True)
    results: dict = {}
    # No warm driver JVM from before: the first timed run starts one, as on a machine just booted.
    stop_warm_drivers(default_cache_dir())
    try:
        results["session_start"] = asdict(measure(SESSION_START, dict(os.environ), root / "session.log"))
        prepare_class_archive(root, results)
        if args.only_shapes:
            bench_shapes(root, args, results)
        elif not args.only_latency:
            bench_load(root, args, results)
            bench_shapes(root, args, results)
            bench_history(root, args, results)
            bench_sensor_tick(root, args, results)
        if not (args.skip_latency or args.only_shapes):
            bench_latency(root, args, results)
            if args.connect:
                bench_latency(root, args, results, "jvm_per_run")
                with connect_server(root) as remote:
                    bench_latency(root, args, results, "spark_connect", remote)
    finally:
        stop_warm_drivers(default_cache_dir())
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
    )
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or None,
        "machine": machine(),
        "parameters": {k: v for k, v in vars(args).items() if k not in ("keep",)},
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    # A partial run is named for what it measured; a second run of one commit on one day does not
    # overwrite the first (results are compared across runs as well as commits).
    kind = (
        "-quick" if args.quick else "-latency" if args.only_latency else "-shapes" if args.only_shapes else ""
    )
    stem = f"{report['date'][:10]}-{report['commit'] or 'nocommit'}{kind}"
    name, runs = f"{stem}.json", 1
    while (RESULTS / name).exists():
        runs += 1
        name = f"{stem}-{runs}.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\nMachine: {report['machine']}")
    print(f"Results written to {RESULTS / name}")


if __name__ == "__main__":
    main()
