"""Readers other than Spark read the lakehouse's Delta tables, as the README and docs/tables.md show them.

DuckDB (its Delta extension, from PyPI), Polars and delta-rs each read gold and silver; every one
must give the rows Spark gives. The time travel and history docs/tables.md names work too.
"""

import ast
import re
from pathlib import Path

import duckdb
import duckdb_extensions
import polars as pl
import pytest
from deltalake import DeltaTable

from heartbeat_assets.simulator import Faults, Simulator
from tests.conftest import Lakehouse, comparable_rows, delta_rs_rows, normalized

TABLES_READ = [
    "gold/heartrate_by_patient",
    "gold/daily_patient_avg",
    "gold/device_signal_loss",
    "silver/recordings",
]


@pytest.fixture(scope="module")
def lakehouse(tmp_path_factory, spark) -> Lakehouse:
    root = tmp_path_factory.mktemp("readers") / "data"
    lakehouse = Lakehouse(root, spark)
    sim = Simulator(root, seed=8, patients=3, devices=3)
    sim.land_patients()
    sim.land_recordings(files=2, records=80, faults=Faults(signal_gaps=0.5))
    lakehouse.run()
    sim.land_recordings(files=1, records=80, wave=1)
    lakehouse.run()
    return lakehouse


@pytest.mark.parametrize("table", TABLES_READ)
def test_duckdb_polars_and_delta_rs_read_what_spark_reads(lakehouse, table):
    path = str(lakehouse.resource.table(table))
    spark_rows = comparable_rows(lakehouse.table(table), ignore=("source_file",))
    columns = [c for c in lakehouse.table(table).columns if c not in ("source_file",)]

    duckdb_extensions.import_extension("delta")  # DuckDB's Delta extension, from its PyPI package
    select = ", ".join(f'"{c}"' for c in columns)
    in_duckdb = duckdb.sql(f"LOAD delta; SELECT {select} FROM delta_scan('{path}')").fetchall()
    assert normalized(in_duckdb) == spark_rows

    in_polars = pl.read_delta(path).select(columns).rows()
    assert normalized(in_polars) == spark_rows

    assert delta_rs_rows(path, ignore=("source_file",)) == spark_rows


def test_history_and_time_travel(lakehouse):
    """Each gold version stays readable by its number, from Spark and delta-rs alike."""
    path = lakehouse.resource.table("gold/heartrate_by_patient")
    history = lakehouse.spark.sql(f"DESCRIBE HISTORY delta.`{path}`").collect()
    assert [r.operation for r in sorted(history, key=lambda r: r.version)] == [
        "CREATE TABLE",
        "WRITE",
        "WRITE",
    ]
    first, latest = history[-1].version + 1, history[0].version
    older = comparable_rows(lakehouse.table("gold/heartrate_by_patient", version=first))
    assert older != comparable_rows(lakehouse.table("gold/heartrate_by_patient"))
    assert delta_rs_rows(path, version=first) == older
    assert DeltaTable(str(path)).version() == latest


def test_the_readers_snippet_of_the_readme_reads_gold(lakehouse):
    """The README's one-liners, run as shown."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    snippet = snippet.replace("data/lakehouse/", f"{lakehouse.root}/lakehouse/")
    scope = {"spark": lakehouse.spark}
    results = []  # the value of each expression the snippet shows
    for statement in ast.parse(snippet).body:
        if isinstance(statement, ast.Expr):
            results.append(eval(compile(ast.Expression(statement.value), "README.md", "eval"), scope))
        else:
            exec(compile(ast.Module([statement], []), "README.md", "exec"), scope)
    spark_rows, polars_frame, _, duckdb_relation = results
    expected = spark_rows.count()
    assert expected > 0
    assert polars_frame.height == expected and len(duckdb_relation.fetchall()) == expected
