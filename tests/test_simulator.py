"""The data factory: deterministic, atomic landings."""

from heartbeat_assets.simulator import main as simulate


def test_simulator_is_deterministic_and_leaves_no_temporary_files(tmp_path):
    for target in ("a", "b"):
        simulate(f"--data-dir {tmp_path / target} --files 4 --records 50 --faults --seed 3".split())
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert files_a == files_b and len(files_a) == 5  # four recording files and the patients
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    assert not list((tmp_path / "a").rglob(".*")), "no temporary files are left behind"
