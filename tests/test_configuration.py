"""Bad configuration fails fast with a message that says what to do."""

import json
import os
import socket
import stat

import pyspark.errors.utils
import pytest
from dagster import Failure
from py4j.clientserver import ClientServerConnection
from pyspark.sql import functions as F

from resources import LakehouseResource, SparkSessionResource, resources_from_env
from resources.lakehouse import LakehouseBusyError
from resources.spark import build_connect_session, build_spark_session


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


def test_delta_jars_without_a_reachable_repository_say_what_to_do(tmp_path, monkeypatch):
    """First use on a machine that cannot reach Maven Central: the run fails, saying what to do."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no jars resolved before
    settings = tmp_path / "ivysettings.xml"  # the only repository refuses connections
    settings.write_text(
        '<ivysettings><settings defaultResolver="dead"/><resolvers>'
        '<ibiblio name="dead" m2compatible="true" root="http://127.0.0.1:9/maven2/"/>'
        "</resolvers></ivysettings>"
    )
    resource = SparkSessionResource(
        lakehouse=LakehouseResource(data_dir=str(tmp_path / "data")),
        spark_config={"spark.jars.ivySettings": str(settings), "spark.jars.ivy": str(tmp_path / "ivy")},
    )
    with pytest.raises(
        Failure,
        match=r"(?s)Could not fetch the jars of io\.delta:delta-spark.*"
        r"unresolved dependency.*heartbeat-delta-jars.*spark\.jars\.repositories",
    ):
        resource.session_config()
    assert not (tmp_path / "cache" / "heartbeat-lakehouse").exists() or not any(
        (tmp_path / "cache" / "heartbeat-lakehouse").iterdir()
    ), "a failed resolution must not be remembered"


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
    assert config["spark.sql.adaptive.enabled"] == "false"  # a local master's small batch jobs


def test_the_driver_jvm_has_room_for_the_code_spark_generates(spark):
    """C1 alone leaves a 48 MB code cache, which a long-lived driver (this suite's session, or a warm
    driver JVM) fills with the code Spark generates for each query; then every task fails."""
    jvm = spark.sparkContext._jvm
    diagnostics = jvm.java.lang.management.ManagementFactory.getPlatformMXBean(
        jvm.java.lang.Class.forName("com.sun.management.HotSpotDiagnosticMXBean")
    )
    assert int(diagnostics.getVMOption("TieredStopAtLevel").getValue()) == 1
    assert int(diagnostics.getVMOption("ReservedCodeCacheSize").getValue()) >= 240 * 2**20


def test_java_options_of_the_users_replace_both_jvms_defaults(tmp_path):
    options = "-Xss4m -XX:+UseG1GC"
    resource = SparkSessionResource(
        lakehouse=LakehouseResource(data_dir=str(tmp_path)),
        spark_config={"spark.driver.extraJavaOptions": options},
    )
    for warm_driver in (False, True):
        assert resource.session_config(warm_driver)["spark.driver.extraJavaOptions"] == options


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
    assert resources["spark"].keep_jvm_warm_s == 600
    assert resources_from_env({**env, "HEARTBEAT_WARM_JVM": "0"})["spark"].keep_jvm_warm_s == 0
    with pytest.raises(ValueError, match="HEARTBEAT_WARM_JVM must be the seconds"):
        resources_from_env({**env, "HEARTBEAT_WARM_JVM": "10m"})
    assert resources["lakehouse"].landing_watch_seconds == 4
    assert resources_from_env({**env, "HEARTBEAT_LANDING_WATCH": "0"})["lakehouse"].landing_watch_seconds == 0
    with pytest.raises(ValueError, match="HEARTBEAT_LANDING_WATCH must be the seconds"):
        resources_from_env({**env, "HEARTBEAT_LANDING_WATCH": "4s"})
    with pytest.raises(ValueError, match="landing_watch_seconds"):
        resources_from_env({**env, "HEARTBEAT_LANDING_WATCH": "-1"})


def test_data_root_as_a_file_uri(tmp_path):
    folder = tmp_path / "a lake"
    assert LakehouseResource(data_dir=folder.as_uri()).root == folder.resolve()
    assert resources_from_env({"HEARTBEAT_DATA_DIR": folder.as_uri()})["lakehouse"].root == folder.resolve()


def test_unsupported_data_roots_say_what_to_do():
    with pytest.raises(ValueError, match="does not support.*s3a://bucket/prefix"):
        resources_from_env({"HEARTBEAT_DATA_DIR": "abfss://lake@account.dfs.core.windows.net/data"})
    with pytest.raises(ValueError, match="write it s3a://bucket/lake"):
        resources_from_env({"HEARTBEAT_DATA_DIR": "s3://bucket/lake"})


def test_an_s3_data_root_gives_spark_the_s3a_connector_and_the_aws_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-log-me")
    resources = resources_from_env({"HEARTBEAT_DATA_DIR": "s3a://bucket/lake/"})
    lakehouse = resources["lakehouse"]
    assert lakehouse.on_object_storage
    assert (
        str(lakehouse.table("gold/daily_patient_avg")) == "s3a://bucket/lake/lakehouse/gold/daily_patient_avg"
    )
    config = resources["spark"].session_config()
    assert "hadoop-aws" in config["spark.jars"] and "awssdk" in config["spark.jars"]
    assert config["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9000"
    assert config["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert config["spark.hadoop.fs.s3a.endpoint.region"] == "eu-west-1"
    # Credentials stay where the AWS SDK reads them: never in settings that Spark logs or shows.
    assert "do-not-log-me" not in json.dumps(config)
    # The run's own settings win.
    spark = resources_from_env(
        {
            "HEARTBEAT_DATA_DIR": "s3a://bucket/lake",
            "HEARTBEAT_SPARK_CONF": json.dumps({"spark.hadoop.fs.s3a.path.style.access": "false"}),
        }
    )["spark"]
    assert spark.session_config()["spark.hadoop.fs.s3a.path.style.access"] == "false"
    # A local root needs none of it.
    local = resources_from_env({"HEARTBEAT_DATA_DIR": str(tmp_path)})["spark"].session_config()
    assert "hadoop-aws" not in local["spark.jars"] and "spark.hadoop.fs.s3a.endpoint" not in local


def test_cluster_masters_are_passed_to_spark(tmp_path):
    for master in ("spark://10.0.0.5:7077", "yarn", "k8s://https://k8s.example:6443"):
        env = {"HEARTBEAT_DATA_DIR": str(tmp_path), "HEARTBEAT_SPARK_MASTER": master}
        resources = resources_from_env(env)
        config = resources["spark"].session_config()
        assert config["spark.master"] == master
        assert "spark.sql.adaptive.enabled" not in config  # Spark's default (on) for a cluster
        assert resources["spark"].remote is None


def test_spark_connect_from_the_environment(tmp_path):
    env = {"HEARTBEAT_DATA_DIR": str(tmp_path)}
    spark = resources_from_env({**env, "HEARTBEAT_SPARK_REMOTE": "sc://connect.example:15002"})["spark"]
    assert spark.remote == "sc://connect.example:15002"
    # A client sets only the session's SQL settings; the rest belongs to the server.
    config = spark.connect_config()
    assert config["spark.sql.session.timeZone"] == "UTC"
    assert "RocksDB" in config["spark.sql.streaming.stateStore.providerClass"]
    assert all(key.startswith("spark.sql.") for key in config)
    assert "spark.sql.adaptive.enabled" not in config  # the server's master may be a cluster
    # An sc:// master means the same.
    assert resources_from_env({**env, "HEARTBEAT_SPARK_MASTER": "sc://h:1"})["spark"].remote == "sc://h:1"
    with pytest.raises(ValueError, match="Both HEARTBEAT_SPARK_MASTER and HEARTBEAT_SPARK_REMOTE"):
        resources_from_env({**env, "HEARTBEAT_SPARK_MASTER": "yarn", "HEARTBEAT_SPARK_REMOTE": "sc://h:1"})
    with pytest.raises(ValueError, match="must look like sc://host:port"):
        resources_from_env({**env, "HEARTBEAT_SPARK_REMOTE": "spark://h:7077"})


def test_unreachable_spark_connect_server_says_what_to_do():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    with pytest.raises(Failure, match=f"Cannot reach the Spark Connect server at 127.0.0.1:{port}"):
        build_connect_session(f"sc://127.0.0.1:{port}", {})


def test_the_driver_keeps_the_code_of_more_plans_than_a_run_uses(spark):
    """Spark's cache of generated code holds 100 classes by default, fewer than a run of the pipeline
    uses: a warm driver JVM compiled them all again in every run. The session's JVM holds more."""
    codegen = spark.sparkContext._jvm.org.apache.spark.metrics.source.CodegenMetrics
    plans = [spark.range(3).selectExpr(f"id * {n} + {n} AS x") for n in range(2, 152)]
    for plan in plans:
        plan.collect()
    compiled = codegen.METRIC_COMPILATION_TIME().getCount()
    plans[0].collect()  # its code was generated 150 plans ago
    assert codegen.METRIC_COMPILATION_TIME().getCount() == compiled


def test_building_a_column_does_not_tell_the_jvm_its_python_line(spark, monkeypatch):
    """pyspark records the Python call site of each Column function in the JVM, with a dozen py4j
    calls, unless the session turns it off: a run builds thousands of columns."""
    assert spark.conf.get("spark.python.sql.dataFrameDebugging.enabled") == "false"
    # pyspark reads the setting once per process: again, from this session.
    monkeypatch.setattr(pyspark.errors.utils, "_enable_debugging_cache", None)
    commands = []
    send = ClientServerConnection.send_command
    monkeypatch.setattr(
        ClientServerConnection,
        "send_command",
        lambda self, command: commands.append(command) or send(self, command),
    )
    positive = F.col("heartrate") > 0
    assert positive is not None and commands
    assert not any("PySparkCurrentOrigin" in command for command in commands)


def test_stopping_a_session_leaves_its_accumulator_server_to_end_in_the_background():
    """The session is stopped without its accumulator server (stop() would wait for it to notice its
    shutdown), and that server still ends: its thread stops serving and its socket is closed."""
    import threading

    from pyspark.accumulators import AccumulatorTCPServer, UpdateRequestHandler

    from resources.spark import stop_session

    server = AccumulatorTCPServer(("127.0.0.1", 0), UpdateRequestHandler, "token")
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()

    class Context:
        _accumulatorServer = server

    class Session:
        _sc = Context()
        server_at_stop = "not stopped"

        def stop(self):
            self.server_at_stop = self._sc._accumulatorServer

    session = Session()
    stop_session(session)
    assert session.server_at_stop is None  # stop() had no server to wait for
    for thread in threading.enumerate():
        if thread.name == "accumulator-server-shutdown":
            thread.join(timeout=10)
    assert not serving.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(server.server_address, timeout=5)

    class ConnectSession:  # no SparkContext, no accumulator server
        stopped = False

        def stop(self):
            self.stopped = True

    connect = ConnectSession()
    stop_session(connect)
    assert connect.stopped
