"""Delta Lake for Spark: the jars, resolved once from Maven Central, and the session's settings.

A data root on S3 also needs Hadoop's S3A connector (`hadoop-aws`, at the version of the Hadoop
inside pyspark, with the AWS SDK it was built with); it is resolved the same way, when first needed.

The `delta-spark` wheel holds Delta's Python API only; its JVM side comes from Maven Central as
`io.delta:delta-spark_2.13` at the wheel's version. Spark's own Ivy resolution (`spark.jars.packages`,
the way PySpark users add packages) fetches it and its dependencies into the Ivy cache the first
time, in a short-lived JVM of its own; the list of jars is then kept, so a session starts with
`spark.jars` and no resolution (that costs every JVM start about a second, measured here). The jars
Spark already ships (Hadoop, Parquet, Jackson, log4j, ...) are left out: an older copy on the class
path would only shadow or duplicate them.

    heartbeat-delta-jars        # fetch the jars now (the install step does)
    heartbeat-delta-jars --s3   # and the S3A connector's (about 700 MB, mostly the AWS SDK)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import pyspark

DELTA_VERSION = version("delta-spark")
SCALA_VERSION = "2.13"
PACKAGE = f"io.delta:delta-spark_{SCALA_VERSION}:{DELTA_VERSION}"


def _hadoop_version() -> str:
    (api,) = (Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar")
    return api.name.removeprefix("hadoop-client-api-").removesuffix(".jar")


#: Hadoop's S3A connector, for a data root on S3; its version must be that of pyspark's Hadoop.
S3A_PACKAGE = f"org.apache.hadoop:hadoop-aws:{_hadoop_version()}"

#: What every session needs to read and write Delta tables (and to run Delta's SQL: MERGE, DESCRIBE
#: HISTORY, OPTIMIZE, VACUUM). Both are read when a session starts: a Spark Connect server needs them
#: in its own settings.
SESSION_SETTINGS = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}

#: Settings of Spark's package resolution that a user may set (a mirror, a proxy's settings file).
RESOLUTION_SETTINGS = ("spark.jars.repositories", "spark.jars.ivy", "spark.jars.ivySettings")


class DeltaJarsUnavailable(RuntimeError):
    """Delta Lake's jars could not be resolved (no network to Maven Central, or a bad mirror)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "heartbeat-lakehouse"


def delta_jars(settings: dict[str, str] | None = None, s3: bool = False) -> list[str]:
    """Local paths of the jars Delta Lake (and with `s3` the S3A connector) needs beside pyspark's,
    resolving them on first use.

    `settings` may hold the `spark.jars.*` resolution settings (`RESOLUTION_SETTINGS`) to use.
    """
    settings = {k: v for k, v in (settings or {}).items() if k in RESOLUTION_SETTINGS}
    packages = [PACKAGE, *([S3A_PACKAGE] if s3 else [])]
    suffix = "-s3a" if s3 else ""
    record = cache_dir() / f"delta-jars-{DELTA_VERSION}-spark-{pyspark.__version__}{suffix}.json"
    try:
        jars = json.loads(record.read_text())
        if jars and all(os.path.exists(jar) for jar in jars):
            return jars
    except (OSError, ValueError):
        pass
    shipped = {_artifact(jar.name) for jar in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    # Ivy names its copies `<group>_<artifact>-<version>.jar`.
    resolved = _resolve(packages, settings)
    jars = [jar for jar in resolved if _artifact(Path(jar).name.split("_", 1)[1]) not in shipped]
    record.parent.mkdir(parents=True, exist_ok=True)
    part = record.with_name(f".{record.name}.{os.getpid()}")
    part.write_text(json.dumps(jars))
    os.replace(part, record)
    return jars


def _resolve(packages: list[str], settings: dict[str, str]) -> list[str]:
    """Resolve `packages` with Spark's Ivy in a child process; every jar they need, as local paths."""
    settings = {**settings, "spark.jars.packages": ",".join(packages)}
    done = subprocess.run(
        [sys.executable, "-P", os.path.abspath(__file__), "--resolve", json.dumps(settings)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        output = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        unresolved = [line for line in output if "unresolved dependency" in line][:1]
        network = [line for line in output if re.search(r"not found\. url=|refused|timed out", line)][:1]
        detail = "; ".join(unresolved + network) or " / ".join(output[-3:])
        raise DeltaJarsUnavailable(
            f"Could not fetch the jars of {', '.join(packages)} from Maven Central: {detail}. They are "
            "downloaded once, into Ivy's cache (~/.ivy2.5.2): connect this machine to Maven Central "
            "and run `heartbeat-delta-jars` (or any run) again, or point Spark at a mirror "
            'with HEARTBEAT_SPARK_CONF=\'{"spark.jars.repositories": "https://your.mirror/maven2"}\'.'
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _resolve_here(settings: dict[str, str]) -> None:
    """The child's side: start pyspark's gateway JVM with `spark.jars.packages` (spark-submit resolves
    the packages before the JVM runs anything) and print the jars it put on `spark.jars`."""
    from pyspark import SparkConf
    from pyspark.java_gateway import launch_gateway

    conf = SparkConf(loadDefaults=False).setAll(list(settings.items()))
    gateway = launch_gateway(conf)
    try:
        jars = gateway.jvm.java.lang.System.getProperty("spark.jars") or ""
    finally:
        gateway.shutdown()
        gateway.proc.stdin.close()
        gateway.proc.wait()
    print(json.dumps([urlparse(jar).path for jar in jars.split(",") if jar]))


def _artifact(jar_name: str) -> str:
    """The artifact of a jar named `<artifact>-<version>.jar`."""
    return re.sub(r"-\d[\w.\-]*\.jar$", "", jar_name)


def main() -> None:
    """`heartbeat-delta-jars [--s3]`: resolve the jars now and say where they are."""
    s3 = "--s3" in sys.argv[1:]
    try:
        found = delta_jars(s3=s3)
    except DeltaJarsUnavailable as exc:
        sys.exit(str(exc))
    what = f"Delta Lake {DELTA_VERSION}" + (f" and {S3A_PACKAGE}" if s3 else "")
    print(f"{what}: {len(found)} jars beside pyspark's, in {Path(found[0]).parent}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--resolve"]:
        _resolve_here(json.loads(sys.argv[2]))
    else:
        main()
