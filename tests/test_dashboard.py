"""What optuna-dashboard shows of a nas3d study: the real server, queried over its REST API."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_study import make_objective, smoke_config

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def dashboard(tmp_path: Path):
    """A smoke study with some constraint violations, served by a real optuna-dashboard."""
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    # a params cap that some smoke architectures break and some keep
    config = smoke_config(tmp_path, **{"constraints.max_params": 4000.0, "study.sampler": "random"})
    study, objective = make_objective(config, storage_url)
    study.optimize(objective, n_trials=6)
    states = {t.state.name for t in study.trials}
    assert states == {"COMPLETE", "PRUNED"}, [t.user_attrs for t in study.trials]

    port = free_port()
    launcher = ("import sys; from optuna_dashboard._cli import main; sys.argv[0] = 'optuna-dashboard'; "
                "sys.exit(main())")
    server = subprocess.Popen(
        [sys.executable, "-c", launcher, storage_url, "--host", "127.0.0.1", "--port", str(port),
         "--artifact-dir", str(tmp_path / "artifacts"), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        get_json(f"{base}/api/studies")  # waits for the server
        yield base, study
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_dashboard_shows_objectives_constraints_and_checkpoints(dashboard) -> None:
    base, study = dashboard
    (summary,) = get_json(f"{base}/api/studies")["study_summaries"]
    assert summary["study_name"] == "smoke"
    detail = get_json(f"{base}/api/studies/{summary['study_id']}")

    assert detail["objective_names"] == ["val_auc", "flops"]
    trials = {t["number"]: t for t in detail["trials"]}
    for trial in study.trials:
        shown = trials[trial.number]
        assert shown["state"] == trial.state.name.capitalize()
        if "duplicate_of" in trial.user_attrs:
            continue
        (value,) = shown["constraints"]  # the dashboard reads the legacy list nas3d writes
        assert (value > 0) == (trial.state.name == "PRUNED")
        if trial.state.name == "COMPLETE":
            assert [a["filename"] for a in shown["artifacts"]] == [f"trial-{trial.number}.pt"]
    assert {t["number"] for t in detail["best_trials"]} <= {
        t.number for t in study.trials if t.state.name == "COMPLETE"
    }


def _browser():
    """Headless Chromium through Selenium; skipped where absent unless NAS3D_REQUIRE_BROWSER=1 (CI)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and driver):
        reason = "needs Debian's chromium and chromium-driver and the selenium package"
        if os.environ.get("NAS3D_REQUIRE_BROWSER") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_browser_shows_the_pareto_front_of_both_objectives(dashboard, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    base, study = dashboard
    browser = _browser()
    try:
        browser.get(f"{base}/dashboard/studies/{study._study_id}")
        WebDriverWait(browser, 30).until(lambda b: "Pareto Front" in b.find_element("tag name", "body").text)
        text = browser.find_element("tag name", "body").text
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
    finally:
        browser.quit()
    assert "Objective X:\nval_auc" in text and "Objective Y:\nflops" in text
