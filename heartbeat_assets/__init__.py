"""Heart-rate medallion lakehouse: Dagster assets on Spark Structured Streaming."""

from heartbeat_assets.definitions import defs

__all__ = ["defs"]
