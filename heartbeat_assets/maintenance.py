"""Table maintenance, run by the `lakehouse_maintenance` job (daily, by its schedule).

- Compaction: micro-batches append a few small files each; `OPTIMIZE` rewrites the small files of
  bronze's and silver's append-only tables into large ones (a commit that changes no data, which the
  streaming queries reading those tables skip).
- Retention: each table keeps `retention_days` of history (`LakehouseResource.retention_days`, set
  as the tables' `delta.logRetentionDuration` and `delta.deletedFileRetentionDuration`), and `VACUUM`
  deletes the data files that only older versions used: replaced gold versions, compacted files.
  Delta removes log entries past the retention by itself when it writes a checkpoint of the log.

The job runs in the queue like any run and holds the lakehouse lock, so no query writes meanwhile.
"""

from pathlib import Path

from dagster import AssetKey, AssetObservation, OpExecutionContext, job, op

from heartbeat_assets import tables
from resources import TABLES, LakehouseResource, SparkSessionResource

#: Tables that micro-batches append to: their small files are compacted.
COMPACTED = (
    "bronze/recordings",
    "bronze/recordings_quarantine",
    "bronze/patients",
    "silver/recordings",
    "silver/recordings_quarantine",
)
#: Gold's aggregates: Delta tables beside their queries' checkpoints (see `gold.GoldAggregate`).
AGGREGATES = ("gold/daily_patient_avg", "gold/device_signal_loss")
#: Delta refuses to VACUUM with a retention under a week unless told: it protects readers and
#: writers that may still use older files. Nothing reads or writes while the job holds the lock.
RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"


def maintained_tables(lakehouse: LakehouseResource) -> list[tuple[str, Path]]:
    """(name, folder) of every Delta table of the lakehouse, gold's aggregates included."""
    found = [(name, lakehouse.table(name)) for name in TABLES]
    found += [(f"{name}:aggregate", lakehouse.checkpoint(name) / "_aggregate") for name in AGGREGATES]
    return found


@op(out={}, description="Compact small files of the append-only tables, apply the history retention, VACUUM.")
def maintain_tables(context: OpExecutionContext, spark: SparkSessionResource, lakehouse: LakehouseResource):
    retention = tables.retention_properties(lakehouse.retention_days)
    session = None
    for name, path in maintained_tables(lakehouse):
        before = tables.load(path)
        if before is None:
            continue
        session = session or spark.spark_session
        configured = before.metadata().configuration
        changed = {key: value for key, value in retention.items() if configured.get(key) != value}
        if changed:
            settings = ", ".join(f"'{key}' = '{value}'" for key, value in changed.items())
            session.sql(f"ALTER TABLE {tables.sql_name(path)} SET TBLPROPERTIES ({settings})")
        metadata = {"retention_days": lakehouse.retention_days}
        if name in COMPACTED:
            (result,) = session.sql(f"OPTIMIZE {tables.sql_name(path)}").collect()
            metadata["files_compacted"] = result.metrics.numFilesRemoved
            metadata["files_written"] = result.metrics.numFilesAdded
        session.conf.set(RETENTION_CHECK, str(lakehouse.retention_days >= 7).lower())
        try:
            session.sql(f"VACUUM {tables.sql_name(path)}").collect()
        finally:
            session.conf.unset(RETENTION_CHECK)
        after = tables.load(path)
        vacuumed = [c for c in after.history(4) if c.get("operation") == "VACUUM END"]
        metadata["files_vacuumed"] = (
            int((vacuumed[0].get("operationMetrics") or {}).get("numDeletedFiles", 0)) if vacuumed else 0
        )
        metadata["delta_version"] = after.version()
        context.log.info(f"{name}: {metadata}")
        if ":" not in name:
            yield AssetObservation(asset_key=AssetKey(name.split("/")), metadata=metadata)


@job(description="Table maintenance: compact small files, apply the history retention, VACUUM old files.")
def lakehouse_maintenance():
    maintain_tables()
