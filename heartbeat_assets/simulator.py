"""Data factory: lands heart-rate recording files and patient CSVs the way devices would.

Every file is written under a hidden temporary name and renamed into the landing folder, so the
pipeline never sees half a file. Output is deterministic for a given seed and wave.

    heartbeat-simulate --files 20 --records 1000 --faults --seed 7
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from resources import storage
from resources.lakehouse import default_data_dir

FIRST_NAMES = [
    "Ana",
    "Ben",
    "Caitlin",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jamal",
    "Kai",
    "Lena",
]
LAST_NAMES = [
    "Garcia",
    "Perez",
    "Diaz",
    "Calderon",
    "Smith",
    "Okafor",
    "Nguyen",
    "Kowalski",
    "Haddad",
    "Silva",
]

#: 2024-01-01T00:00:00Z: recordings start here, one reading per device per second.
DEFAULT_START = 1_704_067_200.0
WAVE_SPAN_S = 30 * 86_400


@dataclass
class Faults:
    """Share of recordings (or files) given each fault."""

    malformed: float = 0.0  # truncated JSON, not JSON, wrong types, missing fields
    invalid_heartrate: float = 0.0  # 0, negative, NaN, above 300
    duplicates: float = 0.0  # a recording sent again, in the same or a later file
    late: float = 0.0  # recorded days before the rest of its file
    unknown_mrn: float = 0.0  # a patient not (yet) in the patient files
    array_files: float = 0.0  # files written as one pretty-printed JSON array
    gzip_files: float = 0.0  # files gzip-compressed (.json.gz)
    signal_gaps: float = 0.0  # share of files in which the device drops out for a while

    @classmethod
    def typical(cls) -> Faults:
        return cls(0.01, 0.01, 0.02, 0.02, 0.01, 0.2, 0.2, 0.3)


@dataclass
class Simulator:
    data_dir: Path
    seed: int = 0
    patients: int = 12
    devices: int = 12
    start: float = DEFAULT_START
    _sent: list[dict] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = storage.data_root(str(self.data_dir))
        self.recordings_dir = self.data_dir / "landing" / "recordings"
        self.patients_dir = self.data_dir / "landing" / "patients"

    def mrn(self, patient: int) -> int:
        return 10_000_000 + patient * 7_919

    def device_mrn(self, device: int) -> int:
        return self.mrn(device % self.patients)

    def land_patients(
        self,
        file_name: str = "patients.csv",
        renames: dict[int, str] | None = None,
        only: list[int] | None = None,
    ) -> Path:
        """Land a patient CSV: every patient (or those in `only`), with `renames` applied."""
        rng = random.Random(f"{self.seed}-patients")
        rows = ["mrn,name"]
        for patient in range(self.patients):
            name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
            if only is None or patient in only:
                rows.append(f"{self.mrn(patient)},{(renames or {}).get(patient, name)}")
        return land_file(self.patients_dir, file_name, ("\n".join(rows) + "\n").encode())

    def land_recordings(
        self, files: int, records: int, faults: Faults | None = None, wave: int = 0, progress: bool = False
    ) -> list[Path]:
        """Land `files` files of about `records` recordings each; return their paths."""
        faults = faults or Faults()
        rng = random.Random(f"{self.seed}-wave-{wave}")
        clock = self.start + wave * WAVE_SPAN_S
        landed = []
        for index in tqdm(range(files), desc="landing files", unit="file", disable=not progress):
            device = index % self.devices
            lines = []
            t = clock + (index // self.devices) * records
            gap = range(0)
            if rng.random() < faults.signal_gaps:
                gap_start = rng.randrange(records)
                gap = range(gap_start, gap_start + rng.randint(60, 240))
            for second in range(records):
                if second in gap:
                    continue
                rec = {
                    "device_id": device,
                    "mrn": self.device_mrn(device),
                    "time": round(t + second + rng.random() * 0.5, 3),
                    "heartrate": round(rng.gauss(75, 12), 1),
                }
                lines.append(self._apply_faults(rec, rng, faults))
            lines = [line for line in lines if line is not None]
            as_array = rng.random() < faults.array_files
            compressed = rng.random() < faults.gzip_files
            name = f"recordings-w{wave:02d}-{index:05d}.json" + (".gz" if compressed else "")
            landed.append(land_file(self.recordings_dir, name, _encode(lines, as_array, compressed)))
        return landed

    def _apply_faults(self, rec: dict, rng: random.Random, faults: Faults) -> str | None:
        roll = rng.random()
        edges = [
            faults.malformed,
            faults.invalid_heartrate,
            faults.duplicates,
            faults.late,
            faults.unknown_mrn,
        ]
        kind = None
        for name, share in zip(
            ["malformed", "invalid_heartrate", "duplicates", "late", "unknown_mrn"], edges, strict=True
        ):
            if roll < share:
                kind = name
                break
            roll -= share
        if kind == "malformed":
            text = json.dumps(rec)
            return rng.choice(
                [
                    text[: len(text) // 2],
                    "not json at all",
                    json.dumps({**rec, "heartrate": str(rec["heartrate"])}),
                    json.dumps({k: v for k, v in rec.items() if k != "time"}),
                    json.dumps({**rec, "device_id": rec["device_id"] + 0.5}),
                ]
            )
        if kind == "invalid_heartrate":
            rec["heartrate"] = rng.choice([0.0, -12.0, 350.0, math.nan])
        elif kind == "duplicates" and self._sent:
            return json.dumps(rng.choice(self._sent[-5000:]))
        elif kind == "late":
            rec["time"] = round(rec["time"] - rng.randint(1, 20) * 86_400, 3)
        elif kind == "unknown_mrn":
            rec["mrn"] = 90_000_000 + rng.randrange(3)
        else:
            rec["firmware"] = "2.1" if rng.random() < 0.01 else None
            if rec["firmware"] is None:
                del rec["firmware"]
        self._sent.append(rec)
        return json.dumps(rec)


def _encode(lines: list[str], as_array: bool, compressed: bool) -> bytes:
    if as_array:
        # One JSON array over many lines; a malformed element makes the whole file invalid JSON,
        # so keep arrays to well-formed elements by writing bad lines as JSON strings.
        elements = []
        for line in lines:
            try:
                elements.append(json.loads(line))
            except json.JSONDecodeError:
                elements.append(line)
        text = "[\n" + ",\n".join("  " + json.dumps(e) for e in elements) + "\n]\n"
    else:
        text = "\n".join(lines) + "\n"
    data = text.encode()
    return gzip.compress(data, mtime=0) if compressed else data


def land_file(folder: Path, name: str, data: bytes) -> Path:
    """Land `data` as `name` atomically (`storage.write_bytes_atomic`)."""
    target = folder / name
    storage.write_bytes_atomic(target, data)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir", default=default_data_dir(), help="data root (default: $HEARTBEAT_DATA_DIR or data/)"
    )
    parser.add_argument("--files", type=int, default=10, help="recording files to land")
    parser.add_argument("--records", type=int, default=600, help="recordings per file")
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--devices", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wave", type=int, default=0, help="later waves use later times and new file names")
    parser.add_argument(
        "--faults", action="store_true", help="add malformed lines, duplicates, late data, ..."
    )
    parser.add_argument("--no-patients", action="store_true", help="do not land the patient CSV")
    args = parser.parse_args(argv)

    sim = Simulator(args.data_dir, seed=args.seed, patients=args.patients, devices=args.devices)
    if not args.no_patients:
        print(f"landed {sim.land_patients()}")
    faults = Faults.typical() if args.faults else None
    paths = sim.land_recordings(args.files, args.records, faults, wave=args.wave, progress=args.files >= 20)
    print(f"landed {len(paths)} recording file(s) in {sim.recordings_dir}")


if __name__ == "__main__":
    main()
