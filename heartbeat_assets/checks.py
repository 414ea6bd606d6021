"""Data-quality checks. The assets emit them from what their queries already computed, so checking
costs no second read of a table; the checks that protect downstream layers are blocking."""

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetKey, MetadataValue
from pyspark.sql import DataFrame

#: The declared schema of every table: a change in code that alters one fails its check.
SCHEMAS: dict[str, dict[str, str]] = {
    "bronze/recordings": {
        "device_id": "int", "mrn": "bigint", "time": "double", "heartrate": "double", "_rescued": "string",
        "source_file": "string", "source_line": "int", "source_element": "int",
        "source_modified_at": "timestamp", "ingested_at": "timestamp",
    },
    "bronze/recordings_quarantine": {
        "raw": "string", "reason": "string", "source_file": "string", "source_line": "int",
        "source_element": "int", "source_modified_at": "timestamp", "ingested_at": "timestamp",
    },
    "bronze/patients": {
        "mrn": "string", "name": "string", "_extra": "string", "raw": "string", "source_file": "string",
        "source_line": "int", "source_modified_at": "timestamp", "ingested_at": "timestamp",
    },
    "silver/patients": {
        "mrn": "bigint", "name": "string", "source_modified_at": "timestamp", "source_file": "string",
        "source_line": "int",
    },
    "silver/recordings": {
        "device_id": "int", "mrn": "bigint", "recorded_at": "timestamp", "heartrate": "double",
        "patient_name": "string", "date": "date", "source_file": "string",
    },
    "silver/recordings_quarantine": {
        "device_id": "int", "mrn": "bigint", "time": "double", "heartrate": "double", "reason": "string",
        "source_file": "string", "source_line": "int", "source_element": "int",
        "ingested_at": "timestamp",
    },
    "gold/heartrate_by_patient": {
        "mrn": "bigint", "patient_name": "string", "avg_heartrate": "bigint", "count": "bigint",
    },
    "gold/daily_patient_avg": {
        "mrn": "bigint", "patient_name": "string", "date": "date", "avg_heartrate": "double",
        "count": "bigint",
    },
    "gold/device_signal_loss": {
        "device_id": "int", "window_start": "timestamp", "window_end": "timestamp", "readings": "bigint",
    },
}  # fmt: skip


#: The partition columns of the partitioned tables.
PARTITION_COLUMNS: dict[str, list[str]] = {"silver/recordings": ["date"]}


def key_of(table: str) -> AssetKey:
    return AssetKey(table.split("/"))


def spec(table: str, name: str, description: str, blocking: bool = False) -> AssetCheckSpec:
    return AssetCheckSpec(name, asset=key_of(table), description=description, blocking=blocking)


def schema_spec(table: str) -> AssetCheckSpec:
    return spec(
        table, "schema_as_declared", "The table's columns and types are the declared ones.", blocking=True
    )


def quarantine_rate_spec(table: str) -> AssetCheckSpec:
    return spec(table, "quarantine_rate", "Share of this run's input put in quarantine: warns above one "
                "threshold, fails above another (HEARTBEAT_QUARANTINE_WARN / _ERROR).")  # fmt: skip


def accounting_spec(table: str) -> AssetCheckSpec:
    return spec(table, "nothing_lost", "Every input row of this run is written, quarantined or a counted "
                "duplicate.", blocking=True)  # fmt: skip


def schema_check(table: str, df: DataFrame) -> AssetCheckResult:
    actual = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    declared = SCHEMAS[table]
    return AssetCheckResult(
        asset_key=key_of(table),
        check_name="schema_as_declared",
        passed=actual == declared,
        metadata={
            "unexpected": ", ".join(f"{c} {t}" for c, t in actual.items() if declared.get(c) != t) or "none",
            "missing": ", ".join(f"{c} {t}" for c, t in declared.items() if actual.get(c) != t) or "none",
        },
    )


def accounting_check(table: str, read: int, parts: dict[str, int]) -> AssetCheckResult:
    accounted = sum(parts.values())
    return AssetCheckResult(
        asset_key=key_of(table),
        check_name="nothing_lost",
        passed=read == accounted,
        metadata={"rows_read": read, **parts, "unaccounted": read - accounted},
    )


def quarantine_rate_check(
    table: str, quarantined: int, total: int, warn: float, error: float
) -> AssetCheckResult:
    rate = quarantined / total if total else 0.0
    severity = AssetCheckSeverity.ERROR if rate > error else AssetCheckSeverity.WARN
    return AssetCheckResult(
        asset_key=key_of(table),
        check_name="quarantine_rate",
        passed=rate <= warn,
        severity=severity,
        metadata={"quarantine_rate": round(rate, 6), "quarantined": quarantined, "rows_in": total,
                  "warn_above": warn, "error_above": error},
    )  # fmt: skip


def value_checks(table: str, stats: dict[str, int]) -> list[AssetCheckResult]:
    """Checks of silver/recordings over the rows this run wrote (see `silver.quality_numbers`)."""
    return [
        AssetCheckResult(
            asset_key=key_of(table),
            check_name=name,
            passed=stats.get(stat, 0) == 0,
            metadata={stat: stats.get(stat, 0)},
        )  # fmt: skip
        for name, stat in (
            ("no_null_keys", "null_keys"),
            ("values_in_range", "out_of_range"),
            ("no_duplicate_keys", "duplicate_keys"),
        )
    ]


def value_specs(table: str) -> list[AssetCheckSpec]:
    return [
        spec(table, "no_null_keys", "No written row lacks device_id, mrn or recorded_at.", blocking=True),
        spec(table, "values_in_range", "Written heart rates in (0, 300], times plausible.", blocking=True),
        spec(table, "no_duplicate_keys", "The rows a run writes are new (device_id, mrn, time) keys; the "
             "dedupe state keeps them distinct from earlier runs.", blocking=True),
    ]  # fmt: skip


def alerts_markdown(alerts: list[tuple]) -> MetadataValue:
    lines = ["| device_id | window_start | window_end | readings |", "|---|---|---|---|"]
    lines += [f"| {d} | {s} | {e} | {r} |" for d, s, e, r in alerts[:50]]
    if len(alerts) > 50:
        lines.append(f"| ... {len(alerts) - 50} more | | | |")
    return MetadataValue.md("\n".join(lines))
