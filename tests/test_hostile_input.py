"""Hostile input: every kind of bad file and line a device fleet produces. Runs never fail, and every
line or element lands in a table or in a quarantine with a reason."""

import gzip
import json
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heartbeat_assets.bronze import parse_recordings
from heartbeat_assets.simulator import land_file
from tests import oracle
from tests.test_pipeline import assert_gold_matches_oracle, assert_silver_matches_oracle

T = 1_704_067_200.0  # 2024-01-01T00:00:00Z


def rec(device=1, mrn=7, time=T, hr=70.0, **extra) -> dict:
    return {"device_id": device, "mrn": mrn, "time": time, "heartrate": hr, **extra}


def lines(*records) -> bytes:
    return ("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n").encode()


RECORDING_FILES = {
    "truncated.json": lines(rec(), json.dumps(rec(time=T + 1))[:30]),
    "not-json.json": b"this is not json\n<xml/>\n",
    "non-utf8.json": lines(rec(time=T + 2)) + b'{"device_id": 1, "note": "\xff\xfe"}\n',
    "missing-field.json": lines({"device_id": 1, "mrn": 7, "time": T + 3}),
    "null-field.json": lines(rec(time=T + 4, hr=None)),
    "wrong-types.json": lines(
        rec(time=T + 5, hr="72"),
        rec(time=T + 6, device=1.5),
        '{"device_id": 1, "mrn": 99999999999999999999, "time": 1704067207, "heartrate": 70}',
        rec(time=T + 8, hr=True),
        "{'device_id': 1, 'mrn': 7, 'time': 1704067209, 'heartrate': 70}",  # single quotes: not JSON
    ),
    "extra-fields.json": lines(rec(time=T + 10, firmware="2.1", battery={"level": 80})),
    "ten-megabytes.json": lines(rec(time=T + 11, blob="x" * 10_000_000)),
    "empty.json": b"",
    "whitespace.json": b"   \n\t\n  \r\n",
    "array-one-bad.json": json.dumps(
        [rec(time=T + 12), rec(time=T + 13, hr="bad"), rec(time=T + 14)], indent=2
    ).encode(),
    "compressed.json.gz": gzip.compress(lines(rec(time=T + 15), rec(time=T + 16))),
    "corrupt.json.gz": gzip.compress(lines(rec(time=T + 17)))[:-12],
    "spaces [brackets] {braces} *?.json": lines(rec(time=T + 18)),
    "ünïcödé ☃.json": lines(rec(time=T + 19)),
    "unknown-mrn.json": lines(rec(time=T + 20, mrn=424242)),
    "bad-heart-rates.json": lines(
        rec(time=T + 21, hr=0),
        rec(time=T + 22, hr=-5),
        rec(time=T + 23, hr=float("nan")),
        rec(time=T + 24, hr=float("inf")),
        rec(time=T + 25, hr=300.5),
        rec(time=T + 26, hr=300),
    ),  # fmt: skip
    "bad-times.json": lines(rec(time=T * 1000), rec(time=4_102_444_800.0), rec(time=12.0)),
    "crlf.json": lines(rec(time=T + 27)).replace(b"\n", b"\r\n"),
    "bom.json": b"\xef\xbb\xbf" + lines(rec(time=T + 28)),
    # 2024-03-01T23:59:59Z and 2024-03-02T00:00:01Z: a different date in UTC only.
    "midnight.json": lines(
        rec(device=3, mrn=12, time=1709337599, hr=60), rec(device=3, mrn=12, time=1709337601, hr=80)
    ),
}
IN_PROGRESS = {
    ".hidden.json": lines(rec(time=T + 29)),
    "partial.json.tmp": lines(rec(time=T + 30)),
    "_underscored.json": lines(rec(time=T + 31)),
}
PATIENT_FILES = {
    "a.csv": b"mrn,name\n7,Seven\nnot-a-number,Bad Row\n8,\n9,Too,Many,Fields\n7,Seven Renamed\n",
    "b.csv": b'10,No Header\n11,"Quoted, Name"\n12,Twelve\n',
}


def test_hostile_corpus(lakehouse):
    landing = lakehouse.root / "landing"
    for name, data in {**RECORDING_FILES, **IN_PROGRESS}.items():
        land_file(landing / "recordings", name, data)
    for name, data in PATIENT_FILES.items():
        land_file(landing / "patients", name, data)

    # The session starts out in another zone: the run must still cut dates in UTC.
    lakehouse.spark.conf.set("spark.sql.session.timeZone", "America/New_York")
    try:
        result = lakehouse.run()
    finally:
        lakehouse.spark.conf.set("spark.sql.session.timeZone", "UTC")
    assert result.success
    expected = assert_gold_matches_oracle(lakehouse)
    assert_silver_matches_oracle(lakehouse, expected)

    quarantine = lakehouse.read("bronze/recordings_quarantine")
    reasons = Counter(r["reason"] for r in quarantine)
    assert reasons == {
        "malformed_json": 4,  # a truncated line, two lines of text, a single-quoted record
        "not_utf8": 1,
        "missing_field:heartrate": 1,
        "null_field:heartrate": 1,
        "wrong_type:heartrate": 3,  # "72", true, "bad" in the array
        "wrong_type:device_id": 1,
        "wrong_type:mrn": 1,
        "corrupt_gzip": 1,
    }
    assert (landing / "recordings" / "_rejected" / "corrupt.json.gz").exists()
    # A name Spark's file source would misread is renamed to its percent-encoded form, then read.
    assert (landing / "recordings" / "spaces %5Bbrackets%5D %7Bbraces%7D %2A%3F.json").exists()
    rescued = {r["time"]: r["_rescued"] for r in lakehouse.read("bronze/recordings") if r["_rescued"]}
    assert json.loads(rescued[T + 10]) == {"firmware": "2.1", "battery": {"level": 80}}
    assert len(json.loads(rescued[T + 11])["blob"]) == 10_000_000

    silver_reasons = Counter(r["reason"] for r in lakehouse.read("silver/recordings_quarantine"))
    assert silver_reasons == {"invalid_heartrate": 5, "invalid_time": 3}
    times = {r["recorded_at"].timestamp() for r in lakehouse.read("silver/recordings")}
    assert {T + 26, T + 27, T + 28, T + 18, T + 19, T + 20} <= times  # 300 bpm, CRLF, BOM, odd names
    assert not {T + 29, T + 30, T + 31} & times  # in progress: not read

    patients = {r["mrn"]: r["name"] for r in lakehouse.read("silver/patients")}
    assert patients == {7: "Seven Renamed", 10: "No Header", 11: "Quoted, Name", 12: "Twelve"}
    daily = sorted(
        (r["date"].isoformat(), r["avg_heartrate"])
        for r in lakehouse.read("gold/daily_patient_avg")
        if r["mrn"] == 12
    )
    assert daily == [("2024-03-01", 60.0), ("2024-03-02", 80.0)]
    # A recording of a patient not (yet) known is kept in silver, and left out of gold's joins.
    assert 424242 in {r["mrn"] for r in lakehouse.read("silver/recordings")}
    assert 424242 not in {r["mrn"] for r in lakehouse.read("gold/heartrate_by_patient")}

    # Once renamed into place, an in-progress file is read.
    (landing / "recordings" / "partial.json.tmp").rename(landing / "recordings" / "partial.json")
    lakehouse.run()
    assert T + 30 in {r["recorded_at"].timestamp() for r in lakehouse.read("silver/recordings")}
    assert_gold_matches_oracle(lakehouse)


# A line is drawn from JSON-like fragments and arbitrary text, so most lines are near misses.
FIELDS = st.sampled_from(["device_id", "mrn", "time", "heartrate", "x"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(FIELDS, inner, max_size=5),
    max_leaves=8,
)
line = st.one_of(
    json_values.map(json.dumps),
    st.builds(lambda r, cut: json.dumps(r)[:cut], st.builds(rec), st.integers(0, 80)),
    st.builds(
        lambda d, m, t, h: json.dumps(rec(d, m, t, h)), st.integers(), st.integers(), st.floats(), st.floats()
    ),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
)
files = st.lists(st.lists(line, max_size=8).map(lambda ls: "\n".join(ls)), min_size=1, max_size=5)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files)
def test_bronze_accounts_for_every_element_of_random_files(spark, contents):
    """Fuzz: for random files, bronze yields exactly the elements the oracle finds, and each one is
    either a recording or carries a reason."""
    rows = [(text, f"file:/fuzz/{i}.json", None) for i, text in enumerate(contents)]
    df = spark.createDataFrame(rows, "value string, source_file string, source_modified_at timestamp")
    parsed = parse_recordings(df).collect()
    expected = [oracle._elements(text.encode()) for text in contents]
    assert len(parsed) == sum(len(e) for e in expected)
    good = [r for r in parsed if r.reason is None]
    assert len(good) == sum(kind == "record" for e in expected for kind, _ in e)
    assert all(r.device_id is not None and r.mrn is not None and r.time is not None for r in good)
    assert all(r.raw is not None for r in parsed if r.reason is not None)
