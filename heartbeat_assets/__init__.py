"""Heart-rate medallion lakehouse: Dagster assets on Spark Structured Streaming.

`defs` (what Dagster loads from this package) is imported on first use, not with the package: a Spark
Connect server's Python worker imports `heartbeat_assets.batch_writers` and should not load Dagster.
"""


def __getattr__(name: str):
    if name == "defs":
        from heartbeat_assets.definitions import defs

        return defs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:  # Dagster finds `defs` among the module's attributes
    return [*globals(), "defs"]
