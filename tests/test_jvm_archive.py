"""The driver JVM's class archive: written by the first JVM that lacks it, mapped by later ones.

Each step runs in a process of its own: an archive is made by a JVM that this test's own (shared)
session is not.
"""

import io
import json
import os
import subprocess
import sys

import pyspark
import pytest

from resources.jvm import ClassArchive, warm_driver_keepers
from tests.test_warm_jvm import alive, wait_until

# In `make test-all` only: JVMs of their own.
pytestmark = pytest.mark.slow

SESSION = """
import json, sys
from dagster import build_resources
from resources import LakehouseResource, SparkSessionResource

spark_config, keep_jvm_warm_s = json.loads(sys.argv[2]), float(sys.argv[3])
lakehouse = LakehouseResource(data_dir=sys.argv[1])
resource = SparkSessionResource(
    lakehouse=lakehouse, master="local[1]", spark_config=spark_config, keep_jvm_warm_s=keep_jvm_warm_s
)
with build_resources({"spark": resource}) as resources:
    spark = resources.spark.spark_session
    assert spark.range(1000).selectExpr("sum(id)").first()[0] == 499500
    runtime = spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
    print(json.dumps(list(runtime.getInputArguments())))
"""


def session(tmp_path, cache, spark_config=None, keep_jvm_warm_s: float = 0) -> list[str]:
    """Start and stop a session through the resource in a new process; the driver JVM's arguments.

    By default the session's JVM is its own; with `keep_jvm_warm_s` it is a warm one, kept that
    many seconds after the session ends.
    """
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SESSION,
            str(tmp_path / "data"),
            json.dumps(spark_config or {}),
            str(keep_jvm_warm_s),
        ],
        env={**os.environ, "HEARTBEAT_JVM_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_first_jvm_writes_the_archive_when_idle_and_later_ones_map_it(tmp_path):
    """As on a new machine: the first run's (warm) JVM writes the archive when it ends, here after 1 s
    without a run; the runs after it map the archive."""
    cache = tmp_path / "jvm-cache"
    first = session(tmp_path, cache, keep_jvm_warm_s=1)
    assert any(arg.startswith("-XX:ArchiveClassesAtExit=") for arg in first)
    (keeper,) = warm_driver_keepers(cache)  # the JVM outlives the run
    wait_until(lambda: not alive(keeper), timeout=120, what="the idle JVM and its keeper end")
    assert not list(cache.glob("warm-driver-*/gateway.json"))
    (archive,) = cache.glob("*.jsa")
    assert archive.stat().st_size > 10 * 2**20
    assert not list(cache.glob(".*.part")), "the archive was left half-made"

    # A warm JVM again: a JVM of the run's own starts with other options (C1 only), so another archive.
    later = session(tmp_path, cache, keep_jvm_warm_s=1)
    assert f"-XX:SharedArchiveFile={archive}" in later
    assert not any("ArchiveClassesAtExit" in arg for arg in later)

    # With -Xshare:on the JVM refuses to start unless it can map the archive: proof it is valid.
    # Options that name an archive are left as given (the resource adds none of its own).
    forced = f"-Xshare:on -XX:SharedArchiveFile={archive}"
    args = session(tmp_path, cache, {"spark.driver.extraJavaOptions": forced})
    assert "-Xshare:on" in args
    assert sum("SharedArchiveFile" in arg for arg in args) == 1


def test_no_archive_when_the_cache_is_turned_off(tmp_path):
    args = session(tmp_path, "")
    assert not any("SharedArchiveFile" in arg or "ArchiveClassesAtExit" in arg for arg in args)


def test_each_pyspark_install_has_an_archive_of_its_own(tmp_path, monkeypatch):
    """A JVM refuses an archive made with Spark's jars at another path ("shared class paths
    mismatch"): the pyspark of another virtualenv must not find this one's archive and run without."""
    here = ClassArchive(tmp_path).path
    monkeypatch.setattr(pyspark, "__file__", "/elsewhere/.venv/lib/site-packages/pyspark/__init__.py")
    assert ClassArchive(tmp_path).path != here


def test_jars_installed_again_get_an_archive_of_their_own_which_replaces_the_old(tmp_path, monkeypatch):
    """A JVM also refuses an archive whose jars changed size or time ("A jar file is not the one used
    while building the shared archive file"), as after a virtualenv is made again in the same place:
    those jars need an archive of their own, and the old one, which nothing can map now, goes."""
    jars = tmp_path / "venv" / "pyspark" / "jars"
    jars.mkdir(parents=True)
    (jars / "spark-core.jar").write_bytes(b"old")
    monkeypatch.setattr(pyspark, "__file__", str(jars.parent / "__init__.py"))
    cache = tmp_path / "cache"
    cache.mkdir()
    before = ClassArchive(cache)
    before.path.write_bytes(b"archive")
    other_install = cache / "spark-driver-0123456789abcdef-01234567.jsa"
    other_install.write_bytes(b"archive")

    (jars / "spark-core.jar").write_bytes(b"new!")  # installed again: another size and time
    after = ClassArchive(cache)
    assert after.path != before.path
    assert "ArchiveClassesAtExit" in after.java_options(create=True)
    after._part.write_bytes(b"archive")  # what the JVM writes as it exits

    class ExitedJvm:
        stdin = io.BytesIO()

        def wait(self, timeout):
            return 0

    after.finish(ExitedJvm())
    assert after.path.exists() and not before.path.exists()
    assert other_install.exists(), "another install's archive stays"
