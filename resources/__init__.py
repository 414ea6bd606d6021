"""Resources shared by the assets and sensors: the lakehouse paths and the SparkSession."""

import importlib
import json
import os

__all__ = ["TABLES", "LakehouseResource", "SparkSessionResource", "default_data_dir", "resources_from_env"]

#: Loaded on first use: code that runs in a Spark Connect server's Python workers imports
#: `resources.storage` alone, without Dagster.
_LAZY = {
    "TABLES": "resources.lakehouse",
    "LakehouseResource": "resources.lakehouse",
    "default_data_dir": "resources.lakehouse",
    "SparkSessionResource": "resources.spark",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resources' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def resources_from_env(environ=os.environ) -> dict:
    """The project's resources, chosen from the environment in this one place.

    - `HEARTBEAT_DATA_DIR`: the data root, a path or `s3a://bucket/prefix` (default: the project's `data/`).
    - `HEARTBEAT_SPARK_MASTER`: Spark master URL (default `local[*]`), e.g. `spark://host:7077`.
    - `HEARTBEAT_SPARK_REMOTE`: a Spark Connect server, `sc://host:port`, instead of a master (an
      `sc://` URL in `HEARTBEAT_SPARK_MASTER` means the same).
    - `HEARTBEAT_SPARK_CONF`: a JSON object of extra `spark.*` settings.
    - `HEARTBEAT_TABLE_PREVIEWS`: `0` keeps rows of gold tables (patient names) out of Dagster.
    - `HEARTBEAT_WARM_JVM`: seconds a local driver JVM waits for the next run (default 600; 0: none).
    - `HEARTBEAT_SPARK_LOG_LEVEL`: Spark's log level (default WARN; INFO or DEBUG to see more).
    - `HEARTBEAT_QUARANTINE_WARN` / `_ERROR`: quarantine-rate check thresholds (default 0.01 and 0.2).
    - `HEARTBEAT_LANDING_WATCH`: seconds a sensor tick watches its landing folder (default 4; 0: none).
    """
    from resources.lakehouse import LakehouseResource, default_data_dir
    from resources.spark import SparkSessionResource

    previews = environ.get("HEARTBEAT_TABLE_PREVIEWS", "1").strip().lower() not in ("0", "false", "no")
    watch = _seconds(
        environ,
        "HEARTBEAT_LANDING_WATCH",
        "the seconds a sensor tick watches its landing folder (0: it looks once)",
    )
    lakehouse = LakehouseResource(
        data_dir=environ.get("HEARTBEAT_DATA_DIR") or default_data_dir(),
        table_previews=previews,
        quarantine_warn_rate=float(environ.get("HEARTBEAT_QUARANTINE_WARN", "0.01")),
        quarantine_error_rate=float(environ.get("HEARTBEAT_QUARANTINE_ERROR", "0.2")),
        **({} if watch is None else {"landing_watch_seconds": watch}),
    )
    spark_options = {}
    if environ.get("HEARTBEAT_SPARK_LOG_LEVEL"):
        spark_options["log_level"] = environ["HEARTBEAT_SPARK_LOG_LEVEL"]
    master, remote = environ.get("HEARTBEAT_SPARK_MASTER"), environ.get("HEARTBEAT_SPARK_REMOTE")
    if master and master.startswith("sc://") and not remote:
        master, remote = None, master
    if master and remote:
        raise ValueError(
            "Both HEARTBEAT_SPARK_MASTER and HEARTBEAT_SPARK_REMOTE are set: with Spark Connect the "
            "server's master applies. Unset one of them."
        )
    if master:
        spark_options["master"] = master
    if remote:
        spark_options["remote"] = remote
    warm = _seconds(
        environ,
        "HEARTBEAT_WARM_JVM",
        "the seconds a local driver JVM waits for the next run (0: a JVM per run)",
    )
    if warm is not None:
        spark_options["keep_jvm_warm_s"] = warm
    if environ.get("HEARTBEAT_SPARK_CONF"):
        try:
            spark_config = json.loads(environ["HEARTBEAT_SPARK_CONF"])
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"HEARTBEAT_SPARK_CONF must be a JSON object of spark settings, "
                f'e.g. {{"spark.executor.memory": "2g"}}: {exc}'
            ) from exc
        if not isinstance(spark_config, dict):
            raise ValueError(
                'HEARTBEAT_SPARK_CONF must be a JSON object, e.g. {"spark.executor.memory": "2g"}'
            )
        spark_options["spark_config"] = spark_config
    return {"lakehouse": lakehouse, "spark": SparkSessionResource(lakehouse=lakehouse, **spark_options)}


def _seconds(environ, name: str, meaning: str) -> float | None:
    """The seconds `environ[name]` gives, or None where it is unset or empty."""
    if not environ.get(name, "").strip():
        return None
    try:
        return float(environ[name])
    except ValueError:
        raise ValueError(f"{name} must be {meaning}, not {environ[name]!r}") from None
