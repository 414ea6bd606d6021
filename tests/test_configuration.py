"""Bad configuration fails fast with a message that says what to do."""

import os
import stat

import pytest
from dagster import Failure

from resources import LakehouseResource, SparkSessionResource, resources_from_env
from resources.lakehouse import LakehouseBusyError
from resources.spark import build_spark_session


def test_unwritable_data_root_says_what_to_do(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/heartbeat-data"  # not writable even for root
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(Failure, match="not writable.*HEARTBEAT_DATA_DIR"):
        LakehouseResource(data_dir=str(target)).ensure_layout()


def test_missing_folders_are_created(tmp_path):
    lakehouse = LakehouseResource(data_dir=str(tmp_path / "new" / "root"))
    lakehouse.ensure_layout()
    assert lakehouse.recordings_landing.is_dir() and lakehouse.patients_landing.is_dir()


def test_second_run_on_the_same_data_root_fails_fast(tmp_path):
    lakehouse = LakehouseResource(data_dir=str(tmp_path))
    with lakehouse.exclusive_lock():
        with pytest.raises(LakehouseBusyError, match=f"in use by pid {os.getpid()}.*wait for that run"):
            with LakehouseResource(data_dir=str(tmp_path)).exclusive_lock():
                pass
    with lakehouse.exclusive_lock():  # released when the first run ended
        pass


def test_no_java_says_how_to_install_it(monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(Failure, match="Java 17.*apt-get install openjdk-17"):
        build_spark_session({"spark.master": "local[1]"})


def test_spark_config_defaults_and_overrides():
    resource = SparkSessionResource(
        lakehouse=LakehouseResource(data_dir="/tmp"),
        shuffle_partitions=3,
        spark_config={"spark.ui.enabled": "true", "spark.executor.memory": "2g"},
    )
    config = resource.session_config()
    assert config["spark.master"] == "local[*]"
    assert config["spark.sql.shuffle.partitions"] == "3"
    assert config["spark.sql.session.timeZone"] == "UTC"
    assert config["spark.ui.enabled"] == "true"  # spark_config wins
    assert config["spark.executor.memory"] == "2g"


def test_unknown_table_name_is_rejected():
    with pytest.raises(ValueError, match="Unknown table 'gold/nope'"):
        LakehouseResource(data_dir="/tmp").table("gold/nope")


def test_resources_from_the_environment(tmp_path):
    env = {
        "HEARTBEAT_DATA_DIR": str(tmp_path),
        "HEARTBEAT_SPARK_MASTER": "spark://cluster:7077",
        "HEARTBEAT_SPARK_CONF": '{"spark.executor.memory": "4g"}',
    }
    resources = resources_from_env(env)
    assert resources["lakehouse"].root == tmp_path.resolve()
    config = resources["spark"].session_config()
    assert config["spark.master"] == "spark://cluster:7077" and config["spark.executor.memory"] == "4g"
    with pytest.raises(ValueError, match="HEARTBEAT_SPARK_CONF must be a JSON object"):
        resources_from_env({"HEARTBEAT_SPARK_CONF": "executor.memory=4g"})


def test_data_root_as_a_file_uri(tmp_path):
    folder = tmp_path / "a lake"
    assert LakehouseResource(data_dir=folder.as_uri()).root == folder.resolve()
    assert resources_from_env({"HEARTBEAT_DATA_DIR": folder.as_uri()})["lakehouse"].root == folder.resolve()


@pytest.mark.parametrize("uri", ["s3a://bucket/lake", "abfss://lake@account.dfs.core.windows.net/data"])
def test_object_store_data_root_says_what_to_do(uri):
    with pytest.raises(ValueError, match="does not support.*Mount shared POSIX storage.*HEARTBEAT_DATA_DIR"):
        resources_from_env({"HEARTBEAT_DATA_DIR": uri})
