"""An independent, plain-Python computation of every table from the landed files.

It shares no code with the pipeline: it reads the landing folders with `json`, `gzip` and `csv` and
applies the data contract as written in docs/tables.md.
"""

import csv
import gzip
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from pathlib import Path

INT_RANGE = (-(2**31), 2**31 - 1)
LONG_RANGE = (-(2**63), 2**63 - 1)
MIN_TIME = 946_684_800.0
BLANK = " \t\n\x0b\f\r"  # a blank line holds only these (ASCII whitespace)
MAX_SKEW = 86_400.0


def _landed(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.name.endswith(suffixes) and not p.name.startswith((".", "_"))
    )


def _mtime_s(path: Path) -> float:
    return (path.stat().st_mtime_ns // 1_000_000) / 1000  # Spark keeps milliseconds


def _is_int(value, bounds) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _elements(data: bytes) -> list[tuple[str, object]]:
    """(kind, value) per element: ("record", dict) or ("bad", text)."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    first_line = text.lstrip(BLANK).split("\n", 1)[0] if text is not None else ""
    if (
        text is not None
        and text.lstrip(BLANK).startswith("[")
        and not isinstance(_loads(first_line), list)
        and _loads(text) is not None
    ):
        documents = [text]
    else:
        documents = []
        for raw_line in data.split(b"\n"):
            line = raw_line[:-1] if raw_line.endswith(b"\r") else raw_line
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError:
                documents.append(None)  # not UTF-8
                continue
            if decoded.strip(BLANK):
                documents.append(decoded)
    out = []
    for document in documents:
        if document is None:
            out.append(("bad", "not_utf8"))
            continue
        value = _loads(document)
        if document.lstrip(BLANK).startswith("[") and isinstance(value, list):
            out.extend(_classify(item if isinstance(item, dict) else _reparse(item)) for item in value)
        elif value is None or document.lstrip(BLANK).startswith("["):
            out.append(("bad", document))
        else:
            out.append(_classify(value))
    return out


def _loads(text: str):
    """The first JSON value in `text` (what follows it is ignored, as Spark's JSON reader does)."""
    try:
        return json.JSONDecoder().raw_decode(text.lstrip(BLANK))[0]
    except ValueError:
        return None


def _reparse(item):
    """An array element that is not an object is read as text, which may itself hold JSON."""
    text = item if isinstance(item, str) else json.dumps(item)
    try:
        return json.loads(text)
    except ValueError:
        return text


def _classify(value) -> tuple[str, object]:
    if not isinstance(value, dict):
        return ("bad", value)
    ok = (
        _is_int(value.get("device_id"), INT_RANGE)
        and _is_int(value.get("mrn"), LONG_RANGE)
        and _is_number(value.get("time"))
        and _is_number(value.get("heartrate"))
    )
    return ("record", value) if ok else ("bad", value)


@dataclass
class Expected:
    elements: int = 0
    bronze: list[dict] = field(default_factory=list)
    bronze_bad: int = 0
    silver: dict[tuple, dict] = field(default_factory=dict)
    silver_bad: int = 0
    duplicates: int = 0
    patients: dict[int, str] = field(default_factory=dict)


def compute(data_dir: Path) -> Expected:
    exp = Expected()
    for path in _landed(data_dir / "landing" / "recordings", (".json", ".json.gz")):
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        landed_at = _mtime_s(path)
        for kind, value in _elements(data):
            exp.elements += 1
            if kind == "bad":
                exp.bronze_bad += 1
                continue
            exp.bronze.append(value)
            hr, t = float(value["heartrate"]), float(value["time"])
            valid = (not math.isnan(hr) and 0 < hr <= 300) and (
                not math.isnan(t) and MIN_TIME <= t <= landed_at + MAX_SKEW
            )
            if not valid:
                exp.silver_bad += 1
                continue
            key = (value["device_id"], value["mrn"], t)
            if key in exp.silver:
                exp.duplicates += 1
            else:
                exp.silver[key] = {
                    "device_id": value["device_id"],
                    "mrn": value["mrn"],
                    "time": t,
                    "heartrate": hr,
                }
    rejected = data_dir / "landing" / "recordings" / "_rejected"
    for _ in rejected.iterdir() if rejected.is_dir() else []:
        exp.elements += 1  # a .gz file that does not decompress: one quarantine row
        exp.bronze_bad += 1
    exp.patients = current_patients(data_dir)
    return exp


def current_patients(data_dir: Path) -> dict[int, str]:
    rows = []
    for path in _landed(data_dir / "landing" / "patients", (".csv",)):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            if number == 1 and line.strip().lstrip("\ufeff").replace(" ", "").lower() == "mrn,name":
                continue
            if not line.strip():
                continue
            fields = next(csv.reader(io.StringIO(line)))
            if len(fields) != 2:
                continue
            mrn, name = fields[0].strip(), fields[1].strip()
            if mrn.isdigit() and len(mrn) <= 18 and name:
                rows.append(((_mtime_s(path), path.as_uri(), number), int(mrn), name))
    latest: dict[int, tuple] = {}
    for _order, mrn, name in sorted(rows):
        latest[mrn] = name
    return latest


def _decimal(hr: float) -> Decimal:
    return Decimal(repr(hr)).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def heartrate_by_patient(exp: Expected) -> dict[int, tuple]:
    sums, counts = defaultdict(Decimal), defaultdict(int)
    for rec in exp.silver.values():
        sums[rec["mrn"]] += _decimal(rec["heartrate"])
        counts[rec["mrn"]] += 1
    return {
        mrn: (exp.patients[mrn], int((sums[mrn] / counts[mrn]).to_integral_value(ROUND_CEILING)), counts[mrn])
        for mrn in sums
        if mrn in exp.patients
    }


def day_of(t: float) -> date:
    return datetime.fromtimestamp(t, UTC).date()


def daily_patient_avg(exp: Expected) -> dict[tuple, tuple]:
    sums, counts = defaultdict(Decimal), defaultdict(int)
    for rec in exp.silver.values():
        key = (rec["mrn"], day_of(rec["time"]))
        sums[key] += _decimal(rec["heartrate"])
        counts[key] += 1
    return {
        key: (exp.patients[key[0]], float(sums[key] / counts[key]), counts[key])
        for key in sums
        if key[0] in exp.patients
    }


def device_signal_loss(exp: Expected, window: int = 60, min_readings: int = 30, max_silent: int = 5) -> set:
    counts: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for rec in exp.silver.values():
        counts[rec["device_id"]][math.floor(rec["time"]) // window * window] += 1
    if not counts:
        return set()
    newest = max(max(windows) for windows in counts.values())
    alerts = set()
    for device, windows in counts.items():
        starts = sorted(windows)
        for i, start in enumerate(starts):
            if windows[start] < min_readings:
                alerts.add((device, start, windows[start]))
            stop = starts[i + 1] if i + 1 < len(starts) else newest + window
            for n in range(1, max_silent + 1):
                silent = start + n * window
                if silent >= stop:
                    break
                alerts.add((device, silent, 0))
    return alerts
