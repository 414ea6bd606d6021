"""The driver JVM's class archive: written by the first session that lacks it, mapped by later ones.

Each step runs in a process of its own: an archive is made by a JVM that this test's own (shared)
session is not.
"""

import json
import os
import subprocess
import sys

SESSION = """
import json, sys
from dagster import build_resources
from resources import LakehouseResource, SparkSessionResource

spark_config = json.loads(sys.argv[2])
lakehouse = LakehouseResource(data_dir=sys.argv[1])
# A JVM of the session's own (the warm driver JVM, which writes the archive when it ends, is
# tested in test_warm_jvm.py).
resource = SparkSessionResource(
    lakehouse=lakehouse, master="local[1]", spark_config=spark_config, keep_jvm_warm_s=0
)
with build_resources({"spark": resource}) as resources:
    spark = resources.spark.spark_session
    assert spark.range(1000).selectExpr("sum(id)").first()[0] == 499500
    runtime = spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
    print(json.dumps(list(runtime.getInputArguments())))
"""


def session(tmp_path, cache, spark_config=None) -> list[str]:
    """Start and stop a session through the resource in a new process; the driver JVM's arguments."""
    done = subprocess.run(
        [sys.executable, "-c", SESSION, str(tmp_path / "data"), json.dumps(spark_config or {})],
        env={**os.environ, "HEARTBEAT_JVM_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_first_session_writes_the_archive_and_later_ones_map_it(tmp_path):
    cache = tmp_path / "jvm-cache"
    first = session(tmp_path, cache)
    assert any(arg.startswith("-XX:ArchiveClassesAtExit=") for arg in first)
    (archive,) = cache.glob("*.jsa")
    assert archive.stat().st_size > 10 * 2**20
    assert not list(cache.glob(".*.part")), "the archive was left half-made"

    later = session(tmp_path, cache)
    assert f"-XX:SharedArchiveFile={archive}" in later
    assert not any("ArchiveClassesAtExit" in arg for arg in later)

    # With -Xshare:on the JVM refuses to start unless it can map the archive: proof it is valid.
    # Options that name an archive are left as given (the resource adds none of its own).
    forced = f"-Xshare:on -XX:SharedArchiveFile={archive} -XX:TieredStopAtLevel=1"
    args = session(tmp_path, cache, {"spark.driver.extraJavaOptions": forced})
    assert "-Xshare:on" in args
    assert sum("SharedArchiveFile" in arg for arg in args) == 1


def test_no_archive_when_the_cache_is_turned_off(tmp_path):
    args = session(tmp_path, "")
    assert not any("SharedArchiveFile" in arg or "ArchiveClassesAtExit" in arg for arg in args)
