"""Operating the lakehouse: moving the data root, full refresh, checkpoints that no longer fit."""

import shutil

from heartbeat_assets.simulator import Faults, Simulator
from tests.conftest import Lakehouse
from tests.test_pipeline import assert_gold_matches_oracle, assert_silver_matches_oracle, snapshot_tables


def test_moved_data_root_reads_nothing_twice(lakehouse, tmp_path):
    """Spark logs absolute paths in checkpoints; a moved root is relocated at the next run."""
    sim = Simulator(lakehouse.root, seed=9, patients=3, devices=3)
    sim.land_patients()
    sim.land_recordings(files=3, records=80, faults=Faults(duplicates=0.05))
    lakehouse.run()

    moved_root = tmp_path / "elsewhere" / "data"
    moved_root.parent.mkdir()
    shutil.move(lakehouse.root, moved_root)
    moved = Lakehouse(moved_root, lakehouse.spark)
    moved.instance = lakehouse.instance
    before = snapshot_tables(moved_root)
    moved.run()
    assert snapshot_tables(moved_root) == before, "an idle run after the move changes nothing"
    logs = "".join(p.read_text() for p in (moved_root / "checkpoints").glob("**/sources/*/*"))
    assert str(lakehouse.root) + "/" not in logs and str(moved_root) in logs

    Simulator(moved_root, seed=9, patients=3, devices=3).land_recordings(files=2, records=80, wave=1)
    moved.run()
    expected = assert_gold_matches_oracle(moved)
    assert_silver_matches_oracle(moved, expected)
