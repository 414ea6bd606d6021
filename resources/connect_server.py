"""A local Spark Connect server: a long-lived driver that many runs share.

Spark Connect is Spark's own server for many short-lived clients: it keeps one driver JVM (its
compiled code, Delta's cached table states, the jars) warm between runs, and each run connects with
a session of its own (`HEARTBEAT_SPARK_REMOTE=sc://127.0.0.1:15002`). It is started with pyspark's
own launcher (`sbin/spark-daemon.sh` with the server's class, as `start-connect-server.sh` does),
with Delta Lake's jars and the project's Spark settings, bound to 127.0.0.1.

    heartbeat-connect-server start             # in the background; `stop` ends it
    heartbeat-connect-server run -- CMD ...    # start it, run CMD with HEARTBEAT_SPARK_REMOTE set, stop it
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyspark

from resources import delta_lake
from resources.jvm import driver_environment

HOST = "127.0.0.1"
DEFAULT_PORT = 15002
#: The server's main class. pyspark 4.2's wheel has no `sbin/start-connect-server.sh`, which only
#: hands this class to `sbin/spark-daemon.sh` (the wheel has that).
SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
SPARK_HOME = Path(pyspark.__file__).resolve().parent

#: Settings of the server itself, beside the ones every driver of this project has.
SERVER_SETTINGS = {
    # A client that dies (a run killed, a laptop asleep) leaves its session on the server; its
    # queries are stopped by the next run on the same checkpoint (`stopActiveRunOnRestart`, in the
    # resource's `LOCAL_DEFAULTS`), and the session's memory is freed after this long without a request.
    "spark.connect.session.manager.defaultSessionTimeout": "10m",
}


def url(port: int = DEFAULT_PORT) -> str:
    return f"sc://{HOST}:{port}"


def daemon_command(action: str, *options: str) -> list[str]:
    """The command that starts (`submit`, with spark-submit's `options`) or stops (`stop`) the server
    in the background, as `start-connect-server.sh` and `stop-connect-server.sh` do. Run it with
    `daemon_env`."""
    command = [str(SPARK_HOME / "sbin" / "spark-daemon.sh"), action, SERVER_CLASS, "1"]
    return command + (["--name", "Spark Connect server", *options] if action == "submit" else [])


def daemon_env(port: int) -> dict[str, str]:
    """Environment for `spark-daemon.sh`: this pyspark as SPARK_HOME, a pid file and log per port,
    and this Python for the server's Python workers (its `foreachBatch` writers import this project)."""
    home = state_dir(port)
    return {
        **driver_environment(),
        "SPARK_HOME": str(SPARK_HOME),
        "SPARK_LOG_DIR": str(home),
        "SPARK_PID_DIR": str(home),
        "SPARK_IDENT_STRING": f"heartbeat-{port}",
        "SPARK_LOCAL_IP": HOST,
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_CONNECT_MODE": "0",  # the server itself is a classic driver
    }


def state_dir(port: int) -> Path:
    return delta_lake.cache_dir() / f"connect-server-{port}"


def server_options(port: int, settings: dict[str, str]) -> list[str]:
    """spark-submit options for a server on `HOST:port` with the driver `settings`."""
    conf = {
        **settings,
        **SERVER_SETTINGS,
        "spark.connect.grpc.binding.address": HOST,
        "spark.connect.grpc.binding.port": str(port),
    }
    options = ["--master", conf.pop("spark.master", "local[*]")]
    if "spark.driver.memory" in conf:  # read before the JVM starts: spark-submit's own option
        options += ["--driver-memory", conf.pop("spark.driver.memory")]
    for key, value in conf.items():
        options += ["--conf", f"{key}={value}"]
    return options


def listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
        return True
    except OSError:
        return False


def server_pid(port: int) -> int | None:
    """The pid of the server `start` started on `port`, from spark-daemon.sh's pid file."""
    pid_files = list(state_dir(port).glob("*.pid"))
    return int(pid_files[0].read_text().strip()) if pid_files else None


def log_file(port: int) -> Path | None:
    logs = sorted(state_dir(port).glob("*.out"), key=os.path.getmtime)
    return logs[-1] if logs else None


def start(port: int = DEFAULT_PORT, settings: dict[str, str] | None = None, timeout_s: float = 180) -> str:
    """Start a server on `HOST:port` (unless one listens there already) and wait until it listens;
    its URL. Raises RuntimeError, with the end of its log, if it does not come up."""
    if listening(port):
        return url(port)
    if settings is None:
        settings = project_settings()
    state_dir(port).mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        daemon_command("submit", *server_options(port, settings)),
        env=daemon_env(port), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while done.returncode == 0 and not listening(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    if done.returncode != 0 or not listening(port):
        log = log_file(port)
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise RuntimeError(
            f"The Spark Connect server did not start on {HOST}:{port} ({done.stdout}{done.stderr}). "
            f"Its log, {log}:\n{tail}"
        )
    return url(port)


def stop(port: int = DEFAULT_PORT, timeout_s: float = 30) -> None:
    """Stop the server on `port` that `start` started (spark-daemon.sh's pid file names it); one that
    outlives the stop script's SIGTERM by `timeout_s` is killed."""
    pid = server_pid(port)
    subprocess.run(daemon_command("stop"), env=daemon_env(port), capture_output=True, text=True, timeout=120)
    deadline = time.monotonic() + timeout_s
    while pid is not None and _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def project_settings() -> dict[str, str]:
    """The driver settings of this project's runs, for a JVM that serves many runs: the same the
    resource gives a run's own JVM, with Delta's jars."""
    from resources.lakehouse import LakehouseResource, default_data_dir
    from resources.spark import SparkSessionResource

    resource = SparkSessionResource(lakehouse=LakehouseResource(data_dir=default_data_dir()))
    return resource.session_config(warm_driver=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="heartbeat-connect-server", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "run"])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="with `run`: the command to run (after --)")
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop(args.port)
        return
    already_running = listening(args.port)  # someone else's: `run` leaves it running
    try:
        address = start(args.port)
    except (RuntimeError, delta_lake.DeltaJarsUnavailable) as exc:
        sys.exit(str(exc))
    print(f"Spark Connect server on {address} (log: {log_file(args.port)})", flush=True)
    if args.action == "start":
        return
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("`run` needs a command after --")
    child = subprocess.Popen(command, env={**os.environ, "HEARTBEAT_SPARK_REMOTE": address})
    # Ctrl-C reaches the child too (one process group): wait for it to end, then stop the server.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    try:
        code = child.wait()
    finally:
        if not already_running:
            print("Stopping the Spark Connect server", flush=True)
            stop(args.port)
    sys.exit(code)


if __name__ == "__main__":
    main()
