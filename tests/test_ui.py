"""The Dagster UI, as a user sees it: `dagster dev` driven by headless Chromium (Debian's, nothing
downloaded). Screenshots land in test-artifacts/ui/."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from heartbeat_assets.simulator import Simulator
from tests.conftest import free_port

PROJECT = Path(__file__).resolve().parent.parent
ARTIFACTS = PROJECT / "test-artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip

playwright = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])"
)
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Chromium not found: apt-get install chromium (.ci/run does)"
)


def graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql", json.dumps({"query": query}).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


def runs(url: str) -> list[dict]:
    query = "{ runsOrError(limit: 20) { ... on Runs { results { runId status tags { key value } } } } }"
    return graphql(url, query)["runsOrError"]["results"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def dagster_dev(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home)
    with open(home / "dagster.yaml", "a") as config:
        # The UI's newsletter prompt can open at any moment and swallow the test's clicks.
        config.write("nux:\n  enabled: false\n")
    data = tmp_path / "data"
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "HEARTBEAT_DATA_DIR": str(data)}
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster")), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1",
         "-p", str(port)],
        cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return urllib.request.urlopen(f"{url}/server_info", timeout=5).status == 200
        except OSError:
            return False

    try:
        wait_for(up, 120, "the Dagster webserver")
        yield url, data
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_asset_graph_materialize_all_sensor_run_and_schedule(dagster_dev):
    url, data = dagster_dev
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})

        # 1. The asset graph: the three layers, their assets and the edges between them.
        page.goto(f"{url}/asset-groups", wait_until="networkidle")
        skip = page.get_by_role("button", name="Skip")
        if skip.count():
            skip.click()
        for group in ("bronze", "silver", "gold"):
            page.locator(f"svg >> text={group}").first.click()  # expand the group
            page.wait_for_timeout(500)
        for name in (
            "recordings_quarantine",
            "heartrate_by_patient",
            "daily_patient_avg",
            "device_signal_loss",
        ):
            assert page.locator(f"svg >> text={name}").count() >= 1, name
        assert page.locator("svg >> text=recordings").count() >= 2  # bronze/ and silver/recordings
        assert page.locator("svg path").count() >= 8, "edges between the assets"
        # 2. "Materialize all" starts a run that succeeds.
        page.get_by_role("button", name="Materialize all").first.click()
        wait_for(
            lambda: [r for r in runs(url) if r["status"] == "SUCCESS"], 300, "the materialization to succeed"
        )

        # 3. Files land: a sensor starts a run, which succeeds; gold shows its row count.
        Simulator(data, seed=5, patients=3, devices=3).land_patients()
        Simulator(data, seed=5, patients=3, devices=3).land_recordings(files=2, records=60)

        def sensor_run_succeeded():
            return [
                r for r in runs(url)
                if r["status"] == "SUCCESS" and any(t["key"] == "dagster/sensor_name" for t in r["tags"])
            ]  # fmt: skip

        wait_for(sensor_run_succeeded, 300, "a sensor-triggered run to succeed")
        page.goto(f"{url}/runs", wait_until="networkidle")
        page.wait_for_timeout(1000)
        assert "landing_sensor" in page.inner_text("body")
        page.screenshot(path=str(ARTIFACTS / "runs.png"))

        page.goto(f"{url}/assets/gold/heartrate_by_patient", wait_until="networkidle")
        page.wait_for_timeout(1500)
        body = page.inner_text("body")
        assert "Row count" in body or "row_count" in body, body[:2000]
        page.screenshot(path=str(ARTIFACTS / "gold-asset.png"))

        # 4. The asset graph after the runs: every asset materialized, whole, in a window large enough
        # for Dagster to draw each asset's card with its status (docs/asset-graph.png is this shot).
        wait_for(
            lambda: all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs(url)),
            300,
            "every run to end",
        )
        page.set_viewport_size({"width": 2200, "height": 1500})
        page.goto(f"{url}/asset-groups", wait_until="networkidle")
        page.get_by_text("Hide navigation").click()
        page.wait_for_timeout(1000)
        assert page.get_by_text("Materialized", exact=True).count() == 9, "each asset's card shows it"
        assert "Failed" not in page.inner_text("body")
        page.screenshot(path=str(ARTIFACTS / "asset-graph.png"))

        # 5. The schedule is listed.
        page.goto(f"{url}/automation", wait_until="networkidle")
        page.wait_for_timeout(1000)
        assert "hourly_medallion" in page.inner_text("body")
        page.screenshot(path=str(ARTIFACTS / "automation.png"))
        browser.close()
