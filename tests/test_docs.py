"""The front door cannot drift from the code: every link in the README and docs/ resolves, every
command their code blocks show is run by a test (here, or the one named for it), and the cheap ones
run here: `make demo`'s program (in `make test-all`), the simulator; the readers' snippet runs in
test_readers.py."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
PAGES = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent

#: Each command the docs show (by a pattern of it), and where it runs: (file, text that runs it).
#: Commands that need what a test machine does not have (a cluster's hosts, a PostgreSQL superuser,
#: a pip install into the product's environment) name the test that runs their equivalent.
RUN_BY = {
    r"^make (demo|test|ui|bench)\b": ("tests/test_docs.py", "def test_every_make_target_shown_exists"),
    r"^make test$": (".ci/run", "make test"),
    r"dagster asset materialize -m heartbeat_assets --select '\*'": (
        "tests/test_cluster.py",
        '"asset", "materialize", "-m", "heartbeat_assets", "--select", "*"',
    ),
    r"heartbeat-simulate ": ("tests/test_docs.py", "def test_the_simulator_commands_shown_run"),
    r"heartbeat-connect-server (start|run)": ("tests/test_cluster.py", "connect_server_process"),
    r"spark-class org\.apache\.spark\.deploy\.(master\.Master|worker\.Worker)": (
        "tests/test_cluster.py",
        '"org.apache.spark.deploy.master.Master"',
    ),
    r"HEARTBEAT_SPARK_(MASTER|REMOTE)=\S+ make demo": ("tests/test_cluster.py", "HEARTBEAT_SPARK_MASTER"),
    r"spark-daemon\.sh": ("resources/connect_server.py", "spark-daemon.sh"),
    r"^export ": ("tests/test_cluster.py", "spark_env("),
    r"pip install -e \"\.\[(connect|postgres)\]\"": ("pyproject.toml", "dev = ["),
    r"python -m benchmarks\.run": ("tests/test_docs.py", "benchmarks.run"),
    r"createuser|createdb|dagster-daemon run|cp deploy/postgres/dagster.yaml": (
        "tests/test_postgres_instance.py",
        '"dagster-daemon"), "run"',
    ),
    r"dagster-webserver -w workspace.yaml": ("tests/test_ui.py", '"dev", "-w", "workspace.yaml"'),
}


def code_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, text) of each fenced code block of a page."""
    return re.findall(r"```(\w*)\n(.*?)```", page.read_text(), re.S)


def shell_commands(page: Path) -> list[str]:
    """The commands of a page's bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for language, text in code_blocks(page):
        if language != "bash":
            continue
        text = re.sub(r"\\\n\s*", " ", text)
        pending = ""
        for line in text.splitlines():
            line = pending + re.sub(r"\s+#.*$", "", line).strip()
            if line.count("'") % 2:  # a quoted argument goes on on the next line
                pending = line + " "
                continue
            pending = ""
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_in_the_readme_and_docs_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                assert anchor in {github_anchor(h) for h in headings}, f"{page.name}: no #{anchor} in {path}"


def test_every_command_shown_is_run_by_a_test():
    for page in PAGES:
        for command in shell_commands(page):
            runners = [runner for pattern, runner in RUN_BY.items() if re.search(pattern, command)]
            assert runners, f"{page.name} shows `{command}`, which no test runs: add it to RUN_BY"
            for file, text in runners:
                assert text in (PROJECT / file).read_text(), f"{file} no longer runs `{command}`"


def test_every_make_target_shown_exists():
    makefile = (PROJECT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    shown = {
        t for page in PAGES for t in re.findall(r"`make ([\w-]+)`|^make ([\w-]+)", page.read_text(), re.M)
    }
    shown = {name for pair in shown for name in pair if name}
    assert shown and shown <= targets, shown - targets
    # The README's test command is the one CI runs.
    assert "make test" in (PROJECT / ".ci" / "run").read_text()


def test_the_simulator_commands_shown_run(tmp_path):
    local = [
        command
        for page in PAGES
        for command in shell_commands(page)
        if "heartbeat-simulate" in command and "s3a://" not in command
    ]
    assert local
    for n, command in enumerate(local):
        args = command.split("heartbeat-simulate", 1)[1].split()
        data = tmp_path / str(n)
        subprocess.run(
            [str(BIN / "heartbeat-simulate"), "--data-dir", str(data), *args], check=True, capture_output=True
        )
        assert len(list((data / "landing" / "recordings").glob("*.json*"))) == int(
            args[args.index("--files") + 1]
        )


def test_the_benchmark_command_shown_parses_its_options():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--help"], cwd=PROJECT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    shown = re.findall(r"benchmarks\.run (--[a-z-]+)", (PROJECT / "docs" / "performance.md").read_text())
    assert {"--quick", "--connect", "--profile"} <= set(shown)
    for option in shown:
        assert option in done.stdout, option


@pytest.mark.slow
def test_make_demo_lands_the_samples_runs_and_prints_gold(tmp_path):
    """`make demo`'s program on a fresh data root and Dagster home."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home)
    env = {**os.environ, "DAGSTER_HOME": str(home), "HEARTBEAT_DATA_DIR": str(tmp_path / "data")}
    env["HEARTBEAT_WARM_JVM"] = "0"
    done = subprocess.run(
        [str(BIN / "heartbeat-demo")], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for table in ("gold/heartrate_by_patient", "gold/daily_patient_avg", "gold/device_signal_loss"):
        assert re.search(rf"^{table}: \d+ rows", done.stdout, re.M), done.stdout
    assert "make ui" in done.stdout
