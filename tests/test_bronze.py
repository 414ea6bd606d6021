"""Bronze parsing on tiny in-memory files, with the exact rows expected."""

import math
from datetime import datetime

import pytest

from heartbeat_assets.bronze import parse_patients, parse_recordings, rename_unreadable_files

LANDED = datetime(2024, 1, 2)


def files(spark, *contents: str):
    rows = [(text, f"file:/landing/f{i}.json", LANDED) for i, text in enumerate(contents)]
    return spark.createDataFrame(rows, "value string, source_file string, source_modified_at timestamp")


def parsed(spark, *contents: str) -> list[tuple]:
    rows = parse_recordings(files(spark, *contents)).collect()
    return [
        (
            r.source_line,
            r.source_element,
            r.device_id,
            r.mrn,
            r.time,
            _nan_as_text(r.heartrate),
            r._rescued,
            r.reason,
        )
        for r in sorted(rows, key=lambda r: (r.source_file, r.source_line, r.source_element or 0))
    ]


def _nan_as_text(value):
    return "NaN" if isinstance(value, float) and math.isnan(value) else value


def test_json_lines_with_every_kind_of_problem(spark):
    text = "\n".join(
        [
            '{"device_id": 1, "mrn": 10, "time": 1.5, "heartrate": 72.5}',
            '{"device_id": 1, "mrn": 10, "time": 2, "heartrate": 70, "firmware": "2.1", "x": {"a": 1}}',
            "",
            '{"device_id": "one", "mrn": 10, "time": 3, "heartrate": 70}',
            '{"device_id": 1.5, "mrn": 99999999999999999999, "time": "4", "heartrate": true}',
            '{"device_id": 1, "mrn": 10, "heartrate": 70}',
            '{"device_id": null, "mrn": 10, "time": 5, "heartrate": 70}',
            '{"device_id": 1, "mrn": 10, "time": 6',
            "not json",
            "42",
            '{"device_id": 1, "mrn": 10, "time": 7, "heartrate": NaN}',
            "\t  ",
            '{"device_id": 1, "mrn": 10, "time": 8, "heartrate": 1} \ufffd',
        ]
    )
    assert parsed(spark, text) == [
        (1, None, 1, 10, 1.5, 72.5, None, None),
        (2, None, 1, 10, 2.0, 70.0, '{"firmware":"2.1","x":{"a":1}}', None),
        (4, None, None, 10, 3.0, 70.0, None, "wrong_type:device_id"),
        (
            5, None, None, None, None, None, None,
            "wrong_type:device_id;wrong_type:mrn;wrong_type:time;wrong_type:heartrate",
        ),
        (6, None, 1, 10, None, 70.0, None, "missing_field:time"),
        (7, None, None, 10, 5.0, 70.0, None, "null_field:device_id"),
        (8, None, None, None, None, None, None, "malformed_json"),
        (9, None, None, None, None, None, None, "malformed_json"),
        (10, None, None, None, None, None, None, "malformed_json"),
        (11, None, 1, 10, 7.0, "NaN", None, None),
        (13, None, 1, 10, 8.0, 1.0, None, "not_utf8"),
    ]  # fmt: skip


def test_unknown_fields_are_rescued_whatever_else_is_wrong(spark):
    # Elements are parsed again only when they are not clean recordings or have keys beyond the
    # recording's; these are the cases where the second parse must still give the same answer.
    text = "\n".join(
        [
            '{"device_id": 1, "mrn": 10, "time": 9, "heartrate": NaN, "note": "x"}',
            '{"device_id": "1", "mrn": 10, "time": 9, "heartrate": 70, "note": "y"}',
            '{"device_id": 1, "mrn": 10, "time": 9, "heartrate": 70, "device_id": 2}',
            '{"Device_ID": 1, "mrn": 10, "time": 9, "heartrate": 70}',
            "{'device_id': 1, 'mrn': 10, 'time': 9, 'heartrate': 70}",
            '{"device_id": 1, "mrn": 10, "time": 9, "heartrate": 70, "n": null}',
            '{"device_id": 1, "mrn": 10, "time": 9, "heartrate": Infinity, "z": [1,2]}',
            '[{"device_id": 1, "mrn": 10, "time": 9, "heartrate": 70, "q": 1}, 5]',
            '{"device_id": 1, "mrn": 10, "time": 9, "heartrate": 70, "": 1}',
        ]
    )
    assert parsed(spark, text) == [
        (1, None, 1, 10, 9.0, "NaN", '{"note":"x"}', None),
        (2, None, None, 10, 9.0, 70.0, '{"note":"y"}', "wrong_type:device_id"),
        (3, None, 2, 10, 9.0, 70.0, None, None),
        (4, None, None, 10, 9.0, 70.0, '{"Device_ID":1}', "missing_field:device_id"),
        (5, None, None, None, None, None, None, "malformed_json"),
        (6, None, 1, 10, 9.0, 70.0, '{"n":null}', None),
        (7, None, 1, 10, 9.0, math.inf, '{"z":[1,2]}', None),
        (8, 1, 1, 10, 9.0, 70.0, '{"q":1}', None),
        (8, 2, None, None, None, None, None, "malformed_json"),
        (9, None, 1, 10, 9.0, 70.0, '{"":1}', None),
    ]


def test_pretty_printed_array_file_and_array_lines(spark):
    array_file = """
    [
      {"device_id": 2, "mrn": 20, "time": 1, "heartrate": 60},
      {"device_id": 2, "mrn": 20, "time": 2},
      "free text"
    ]"""
    array_lines = '[{"device_id": 3, "mrn": 30, "time": 1, "heartrate": 61}]\n[{"device_id": 3,'
    assert parsed(spark, array_file, array_lines) == [
        (1, 1, 2, 20, 1.0, 60.0, None, None),
        (1, 2, 2, 20, 2.0, None, None, "missing_field:heartrate"),
        (1, 3, None, None, None, None, None, "malformed_json"),
        (1, 1, 3, 30, 1.0, 61.0, None, None),
        (2, None, None, None, None, None, None, "malformed_json"),
    ]


def test_no_array_element_carries_its_whole_document(spark):
    """The explode into elements takes no column holding a whole document: whatever the optimizer
    computes from it after the explode would run once per element over the whole file, quadratic in
    the array's length (a file of 8,000 elements took 100 s)."""
    node = parse_recordings(files(spark, "[1, 2]"))._jdf.queryExecution().optimizedPlan()
    explodes = []
    while node.children().size() > 0:
        if node.nodeName() == "Generate" and "raw" in _names(node.generatorOutput()):
            explodes.append(_names(node.child().output()))
        node = node.children().apply(0)
    assert len(explodes) == 1
    assert "document" not in explodes[0] and "value" not in explodes[0]


def _names(attributes) -> list[str]:
    return [attributes.apply(i).name() for i in range(attributes.size())]


def test_byte_order_mark_is_not_part_of_the_first_record(spark):
    assert parsed(spark, '\ufeff{"device_id": 1, "mrn": 10, "time": 1, "heartrate": 60}') == [
        (1, None, 1, 10, 1.0, 60.0, None, None)
    ]


def test_empty_and_blank_files_have_no_elements(spark):
    assert parsed(spark, "", "  \n\t\n", "[]") == []


def test_raw_text_is_kept_for_quarantine(spark):
    (row,) = parse_recordings(files(spark, '{"device_id": 1, "mrn": 10, "time": 6')).collect()
    assert row.raw == '{"device_id": 1, "mrn": 10, "time": 6'
    assert row.source_file == "file:/landing/f0.json"


def test_patients_header_optional_and_rows_as_received(spark):
    df = files(spark, "mrn,name\n1,Ann\n 2 , Bob \n\nx,Bad\n3,\n4,Too,Many\n", '5,No Header\n6,"Smith, Jo"\n')
    rows = sorted(
        (r.source_file[-7:], r.source_line, r.mrn, r.name, r._extra) for r in parse_patients(df).collect()
    )
    assert rows == [
        ("f0.json", 2, "1", "Ann", None),
        ("f0.json", 3, "2", "Bob", None),
        ("f0.json", 5, "x", "Bad", None),
        ("f0.json", 6, "3", None, None),
        ("f0.json", 7, "4", "Too", "Many"),
        ("f1.json", 1, "5", "No Header", None),
        ("f1.json", 2, "6", "Smith, Jo", None),
    ]


@pytest.mark.parametrize(
    "name, renamed",
    [
        ("a[1].json", "a%5B1%5D.json"),
        ("what?.json", "what%3F.json"),
        ("x*{y}.json.gz", "x%2A%7By%7D.json.gz"),
        ("c:d\\e.json", "c%3Ad%5Ce.json"),
        ("plain name ü.json", None),
        (".hidden[1].json", None),
    ],
)
def test_names_spark_cannot_read_are_renamed(tmp_path, name, renamed):
    (tmp_path / name).write_text("{}")
    result = rename_unreadable_files(tmp_path)
    if renamed is None:
        assert result == [] and (tmp_path / name).exists()
    else:
        assert result == [(name, renamed)]
        assert (tmp_path / renamed).read_text() == "{}"
