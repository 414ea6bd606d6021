"""The warm driver JVM: runs with a local master take turns in one JVM kept between them.

Every session here is a process of its own, as a run is, attached through the resource; each runs an
availableNow query whose `foreachBatch` calls back into that process. The JVM cache (and the
keepers' folders) are the test's own.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resources.jvm import WarmDriver, cap_log, default_cache_dir, stop_warm_drivers, warm_driver_keepers

# In `make test-all` only: warm driver JVMs of their own.
pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parent.parent

SESSION = """
import json, os, sys, time
from pathlib import Path
from dagster import build_resources
from py4j.java_gateway import JavaObject
from resources import LakehouseResource, SparkSessionResource

data, hold, idle_s = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
(data / "in").mkdir(parents=True, exist_ok=True)
(data / "in" / "part.json").write_text("".join(f'{{"n": {n}}}\\n' for n in range(10)))
lakehouse = LakehouseResource(data_dir=str(data))
resource = SparkSessionResource(
    lakehouse=lakehouse, master="local[1]", keep_jvm_warm_s=idle_s,
    shuffle_partitions=int(os.environ.get("SESSION_SHUFFLE_PARTITIONS", "1")),
)
with build_resources({"spark": resource}) as resources:
    spark = resources.spark.spark_session
    gateway = spark.sparkContext._gateway
    bound = JavaObject("GATEWAY_SERVER", gateway._gateway_client).getGateway().getBindings().keySet()
    def java_objects():  # those py4j holds for a Python process
        return [key for key in spark._jvm.java.lang.String.join(" ", bound).split() if key.startswith("o")]
    objects_at_start = java_objects()
    listeners_at_start = spark.sparkContext._jsc.sc().listenerBus().listeners().size()
    compiled = spark._jvm.org.apache.spark.metrics.source.CodegenMetrics.METRIC_COMPILATION_TIME()
    compiled_at_start = compiled.getCount()
    sums = []
    stream = spark.readStream.schema("n long").json(str(data / "in"))
    writer = stream.writeStream.foreachBatch(lambda df, _: sums.append(df.groupBy().sum("n").first()[0]))
    # The JVM collects what earlier runs left (their Python objects' proxies); that must not
    # touch this run's own.
    spark._jvm.java.lang.System.gc()
    spark._jvm.java.lang.System.runFinalization()
    query = writer.option("checkpointLocation", str(data / "checkpoint")).trigger(availableNow=True).start()
    query.awaitTermination()
    management = spark._jvm.java.lang.management.ManagementFactory
    runtime = management.getRuntimeMXBean()
    diagnostics = management.getPlatformMXBean(
        spark._jvm.java.lang.Class.forName("com.sun.management.HotSpotDiagnosticMXBean")
    )
    jit = int(diagnostics.getVMOption("TieredStopAtLevel").getValue())
    found = {
        "jvm_pid": runtime.getPid(), "app": spark.sparkContext.applicationId, "sums": sums, "jit": jit,
        "objects_at_start": objects_at_start, "objects_at_end": java_objects(),
        "frees_each_object": gateway.gateway_property.enable_memory_management,
        "listeners_at_start": listeners_at_start, "compiled": compiled.getCount() - compiled_at_start,
        "shuffle_partitions": spark.conf.get("spark.sql.shuffle.partitions"),
        "jvm_malloc_arenas": spark._jvm.java.lang.System.getenv("MALLOC_ARENA_MAX"),
        "own_malloc_arenas": os.environ.get("MALLOC_ARENA_MAX"),
        "jvm_time_zone": spark._jvm.java.util.TimeZone.getDefault().getID(),
    }
    print("RESULT", json.dumps(found))
    sys.stdout.flush()
    while hold and not Path(hold).exists():
        time.sleep(0.05)
if sys.argv[4:] == ["after"]:  # a session after the run: the warm JVM is no longer this process's
    from pyspark.sql import SparkSession

    later = SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false").getOrCreate()
    runtime = later._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
    print("AFTER", runtime.getPid())
    later.stop()
"""


@pytest.fixture
def cache(tmp_path):
    """An empty JVM cache, but for the class archives of the machine's (each JVM that ends without
    one spends ~10 s writing it; test_jvm_archive.py tests that)."""
    cache = tmp_path / "jvm-cache"
    cache.mkdir()
    if default_cache_dir():
        for archive in default_cache_dir().glob("*.jsa"):
            shutil.copy(archive, cache)
    yield cache
    stop_warm_drivers(cache)


def start_session(
    tmp_path: Path,
    cache: Path,
    name: str,
    hold: Path | None = None,
    idle_s: str = "60",
    *extra: str,
    shuffle_partitions: int = 1,
    **environment: str,
):
    env = {
        **os.environ,
        **environment,
        "HEARTBEAT_JVM_CACHE": str(cache),
        "SESSION_SHUFFLE_PARTITIONS": str(shuffle_partitions),
    }
    return subprocess.Popen(
        [sys.executable, "-c", SESSION, str(tmp_path / name), str(hold or ""), idle_s, *extra],
        cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def session_result(process: subprocess.Popen) -> dict:
    """The first line the session prints (its JVM, its application, what its query saw)."""
    for line in process.stdout:  # Spark may print before it
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise AssertionError(f"the session failed: {process.stderr.read()[-3000:]}")


def run_session(tmp_path: Path, cache: Path, name: str, **options) -> dict:
    process = start_session(tmp_path, cache, name, **options)
    result = session_result(process)
    assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
    return result


def keeper_gateway(cache: Path) -> dict:
    (gateway,) = cache.glob("warm-driver-*/gateway.json")
    return json.loads(gateway.read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def test_runs_one_after_another_take_turns_in_one_jvm(tmp_path, cache):
    """Runs take turns in the one JVM and its one SparkContext, each with a session of its own; a run
    with other Spark settings makes a new SparkContext there. Once a run let the JVM go, it is the
    next run's: a later session of the same process (the demo prints the gold tables so) starts a JVM
    of its own."""
    process = start_session(tmp_path, cache, "first", None, "60", "after")
    first = session_result(process)
    assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
    (after,) = [line for line in process.stdout if line.startswith("AFTER ")]
    second = run_session(tmp_path, cache, "second")

    assert first["sums"] == second["sums"] == [45]  # each process got its own foreachBatch calls
    assert first["jvm_pid"] == second["jvm_pid"] == keeper_gateway(cache)["jvm_pid"]
    assert first["app"] == second["app"], "the second run has a SparkContext of its own"
    # The classes compiled for the first run's plan serve the second's, and the first run took away
    # the listeners its session had added to the context.
    assert first["compiled"] > 0 and second["compiled"] == 0
    assert first["listeners_at_start"] == second["listeners_at_start"]
    # A run with other Spark settings gets a SparkContext made with them, in the same JVM.
    third = run_session(tmp_path, cache, "third", shuffle_partitions=2)
    assert third["jvm_pid"] == first["jvm_pid"] and third["app"] != first["app"]
    assert (first["shuffle_partitions"], third["shuffle_partitions"]) == ("1", "2") and third["sums"] == [45]
    # A run frees the JVM's objects it was handed all at once, when it lets the JVM go, not one by
    # one (a round trip each): none of the first run's is left for the second.
    assert not first["frees_each_object"]
    assert first["objects_at_end"] and not set(first["objects_at_end"]) & set(second["objects_at_start"])
    assert int(after.split()[1]) != first["jvm_pid"]
    assert not list(cache.glob("warm-driver-*/attached")), "a run that ended left the JVM marked as taken"
    assert alive(first["jvm_pid"]), "the JVM waits for the next run"


def test_a_run_that_finds_the_jvm_taken_starts_its_own(tmp_path, cache):
    """...which compiles with C1 only (it lives for one run); the warm JVM with C1 and C2. Either
    JVM gets the project's malloc arenas unless the run's environment chooses its own, and the
    run's process keeps its environment as it was. Every JVM's own time zone is UTC, whatever the
    machine's (else Delta rebuilds a small table's state at each commit to check it)."""
    hold = tmp_path / "release"
    holder = start_session(tmp_path, cache, "holder", hold=hold)
    try:
        taken = session_result(holder)
        other = run_session(tmp_path, cache, "other")
        chosen = run_session(tmp_path, cache, "chosen", idle_s="0", MALLOC_ARENA_MAX="3", TZ="Europe/Berlin")
    finally:
        hold.touch()
    assert holder.wait(timeout=120) == 0
    assert other["sums"] == [45]
    assert other["jvm_pid"] != taken["jvm_pid"]
    assert (taken["jit"], other["jit"]) == (4, 1)  # TieredStopAtLevel: 4 is C2's level
    arenas = [(run["jvm_malloc_arenas"], run["own_malloc_arenas"]) for run in (taken, other, chosen)]
    assert arenas == [("2", None), ("2", None), ("3", "3")]
    assert [run["jvm_time_zone"] for run in (taken, other, chosen)] == ["UTC"] * 3
    wait_until(lambda: not alive(other["jvm_pid"]), timeout=30, what="a run's own JVM ends with the run")
    assert keeper_gateway(cache)["jvm_pid"] == taken["jvm_pid"]


def test_a_run_killed_while_attached_takes_the_jvm_down_with_it(tmp_path, cache):
    """As a run's own JVM dies with it, so the warm one: no query of a dead run goes on writing."""
    victim = start_session(tmp_path, cache, "victim", hold=tmp_path / "never")
    jvm_pid = session_result(victim)["jvm_pid"]
    keeper = keeper_gateway(cache)["keeper_pid"]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    wait_until(lambda: not alive(jvm_pid), timeout=10, what="the dead run's JVM is killed")
    wait_until(lambda: not alive(keeper), timeout=10, what="its keeper ends")
    assert not warm_driver_keepers(cache)
    assert not list(cache.glob("warm-driver-*/attached"))

    after = run_session(tmp_path, cache, "after")
    assert after["sums"] == [45]
    assert after["jvm_pid"] != jvm_pid


KEEPER_STAND_IN = """
import fcntl, sys, time
lock = open(sys.argv[1], "a")
fcntl.flock(lock, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_only_a_live_keeper_is_signalled_not_whoever_has_its_pid_now(tmp_path):
    """A keeper killed outright leaves gateway.json behind. Its pid then goes to a new process, or to
    a thread of one (a signal to a thread's id reaches its whole process): stopping warm drivers or
    replacing the dead keeper must not signal it. A keeper is known by the lock it holds."""

    def leave_gateway(driver: WarmDriver, pid: int) -> None:
        driver.dir.mkdir(parents=True, exist_ok=True)
        gateway = {"port": 1, "secret": "-", "keeper_pid": pid, "jvm_pid": pid}
        (driver.dir / "gateway.json").write_text(json.dumps(gateway))

    # A process that leads its group, as keepers do, with the pid a dead keeper left.
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    try:
        dead = WarmDriver(tmp_path / "cache", {"spark.driver.memory": "1g"}, idle_s=60)
        leave_gateway(dead, stranger.pid)
        assert warm_driver_keepers(tmp_path / "cache") == []
        stop_warm_drivers(tmp_path / "cache")
        dead.discard()  # what a run does before it starts a new keeper
        with pytest.raises(subprocess.TimeoutExpired):
            stranger.wait(timeout=1)
    finally:
        stranger.kill()
        stranger.wait()

    # A live keeper (here a stand-in holding its lock) is stopped, and is gone when that returns.
    live = WarmDriver(tmp_path / "cache", {"spark.driver.memory": "2g"}, idle_s=60)
    live.dir.mkdir(parents=True)
    keeper = subprocess.Popen(
        [sys.executable, "-c", KEEPER_STAND_IN, str(live.dir / "keeper.lock")],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert keeper.stdout.readline() == "locked\n"
        leave_gateway(live, keeper.pid)
        assert warm_driver_keepers(tmp_path / "cache") == [keeper.pid]
        stop_warm_drivers(tmp_path / "cache")
        assert keeper.wait(timeout=5) == -signal.SIGTERM
        assert warm_driver_keepers(tmp_path / "cache") == []
    finally:
        keeper.kill()
        keeper.wait()


def test_the_jvm_log_is_rotated_under_the_writer(tmp_path):
    """The JVM keeps appending to its log for as long as it lives; past the cap the keeper moves the
    log's content to `jvm.log.1` and empties it, and the JVM's next lines land at its start."""
    log = tmp_path / "jvm.log"
    with open(log, "a") as jvm_output:  # the JVM's stdout, as the keeper opens it
        jvm_output.write("x" * 100 + "\n")
        jvm_output.flush()
        cap_log(log, max_bytes=1000)
        assert log.stat().st_size == 101, "under the cap nothing moves"
        jvm_output.write("y" * 1000 + "\n")
        jvm_output.flush()
        cap_log(log, max_bytes=1000)
        jvm_output.write("after\n")
        jvm_output.flush()
    assert log.read_text() == "after\n"
    assert (tmp_path / "jvm.log.1").read_text() == "x" * 100 + "\n" + "y" * 1000 + "\n"
