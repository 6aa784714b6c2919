"""What people look at: `nas3d dashboard` (the real optuna-dashboard server, queried over its REST API and
in headless Chromium), `nas3d report`, `nas3d status` and `nas3d export --picture`, on one trained smoke
study."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from tests.conftest import CHROMIUM_WHY, GRAPHVIZ_WHY, find_tool, requires_tool, tool_available, unavailable
from tests.test_study import make_objective, smoke_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, optuna.Study]:
    """A smoke study with some constraint violations (a params cap that some smoke architectures break
    and some keep), its checkpoints and pictures in the artifact store beside the database."""
    root = tmp_path_factory.mktemp("search")
    storage_url = f"sqlite:///{root / 'db.sqlite'}"
    config = smoke_config(root, **{"constraints.max_params": 4000.0, "study.sampler": "random",
                                   "train.max_epochs": 1})
    study, objective = make_objective(config, storage_url)
    study.optimize(objective, n_trials=6)
    states = {t.state.name for t in study.trials}
    assert states == {"COMPLETE", "PRUNED"}, [t.user_attrs for t in study.trials]
    return storage_url, root, study


def start_dashboard(storage_url: str, root: Path, *extra: str,
                    preexec_fn=None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "NAS3D_ARTIFACTS": str(root / "artifacts"),
           "PYTHONFAULTHANDLER": "1"}  # a hung server's threads are printed on SIGABRT
    server = subprocess.Popen(
        [sys.executable, "-m", "nas3d", "dashboard", "--storage", storage_url, "--port", str(port), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=preexec_fn,
    )
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def dashboard(search):
    """`nas3d dashboard` on the study, once its front figure and note are in the study."""
    storage_url, root, study = search
    server, base = start_dashboard(storage_url, root, "--study-name", "smoke", "--refresh", "1")
    try:
        get_json(f"{base}/api/studies")  # waits for the server
        deadline = time.monotonic() + 120
        while not get_json(f"{base}/api/studies/{study._study_id}")["plotly_graph_objects"]:
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "the front figure never appeared"
            time.sleep(0.5)
        yield base, study
    finally:
        server.kill()
        server.wait(timeout=30)


def test_dashboard_shows_objectives_constraints_checkpoints_and_pictures(dashboard) -> None:
    base, study = dashboard
    summaries = get_json(f"{base}/api/studies")["study_summaries"]
    (summary,) = [s for s in summaries if s["study_name"] == "smoke"]
    detail = get_json(f"{base}/api/studies/{summary['study_id']}")

    assert detail["objective_names"] == ["val_auc", "flops"]
    trials = {t["number"]: t for t in detail["trials"]}
    assert set(trials) == {t.number for t in study.trials}
    for trial in study.trials:
        shown = trials[trial.number]
        assert shown["state"] == trial.state.name.capitalize()
        if "duplicate_of" in trial.user_attrs:
            continue
        (value,) = shown["constraints"]  # the dashboard reads the legacy list nas3d writes
        assert (value > 0) == (trial.state.name == "PRUNED")
        if trial.state.name == "COMPLETE":
            artifacts = {a["filename"]: a for a in shown["artifacts"]}
            drawn = tool_available("dot", why=GRAPHVIZ_WHY)  # the picture needs Graphviz
            picture_file = {f"trial-{trial.number}.svg"} if drawn else set()
            assert set(artifacts) == {f"trial-{trial.number}.pt"} | picture_file
            if not drawn:
                continue
            assert artifacts[f"trial-{trial.number}.svg"]["mimetype"] == "image/svg+xml"
            # the artifact store is attached: the picture downloads, and it is this trial's architecture
            picture = urllib.request.urlopen(
                f"{base}/artifacts/{summary['study_id']}/{shown['trial_id']}/"
                f"{artifacts[f'trial-{trial.number}.svg']['artifact_id']}", timeout=10).read().decode()
            assert f"smoke trial {trial.number}" in picture and "<svg" in picture
    assert {t["number"] for t in detail["best_trials"]} <= {
        t.number for t in study.trials if t.state.name == "COMPLETE"
    }


def test_dashboard_holds_the_log_flops_front_figure_and_the_front_note(dashboard) -> None:
    from nas3d.front import study_front

    base, study = dashboard
    detail = get_json(f"{base}/api/studies/{study._study_id}")
    (graph,) = detail["plotly_graph_objects"]
    assert graph["id"] == "nas3d-pareto-front"
    figure = json.loads(graph["graph_object"])
    assert figure["layout"]["xaxis"]["type"] == "log"
    front = study_front(study)
    traces = {t.get("name"): t for t in figure["data"]}
    pareto = traces["smoke: Pareto front"]
    assert sorted(pareto["x"]) == sorted(p.flops for p in front.front)
    assert [c[0] for c in pareto["customdata"]] == [p.number for p in front.front]
    arches = [study.trials[p.number].user_attrs["arch"] for p in front.front]
    assert [c[3] for c in pareto["customdata"]] == arches
    # the seed study's architectures are reference lines for a 28³ study only (tests/test_first_hour.py):
    # the smoke study's 12³ points are not squeezed into a corner by them
    assert not [name for name in traces if name and name.startswith("seed study")]
    note = detail["note"]["body"]
    assert f"{front.hypervolume:.4f}" in note
    for p in front.front:
        assert f"| {p.number} | {p.val_auc:.4f} |" in note


def _browser():
    """Headless Chromium through Selenium; skipped where absent (failed under CI=true)."""
    requires_tool("chromium", "chromedriver", why=CHROMIUM_WHY)
    chromium, driver = find_tool("chromium"), find_tool("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("the selenium package is missing: pip install -e '.[test]'")
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_browser_shows_the_pareto_front_and_the_log_flops_figure(dashboard, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, study = dashboard
    browser = _browser()
    try:
        browser.get(f"{base}/dashboard/studies/{study._study_id}")
        WebDriverWait(browser, 60).until(lambda b: "Pareto Front" in b.find_element(By.TAG_NAME, "body").text)
        text = browser.find_element(By.TAG_NAME, "body").text
        # the saved figure, rendered by plotly.js: its log x axis and its title
        figure_id = "user-defined-plot:nas3d-pareto-front"  # where optuna-dashboard renders a saved figure
        figure = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, figure_id))
        WebDriverWait(browser, 60).until(lambda b: figure.find_elements(By.CSS_SELECTOR, ".main-svg .xtitle"))
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", figure)
        time.sleep(1)  # let the scroll settle before the screenshot
        x_title = figure.find_element(By.CSS_SELECTOR, ".xtitle").text
        title = figure.find_element(By.CSS_SELECTOR, ".gtitle").text
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        _for_docs(tmp_path / "dashboard.png")
    finally:
        browser.quit()
    assert "Objective X:\nval_auc" in text and "Objective Y:\nflops" in text
    assert x_title.startswith("FLOPs (log scale") and title.startswith("Pareto front: smoke")


def _for_docs(screenshot: Path) -> None:
    """The README's screenshots are these: ``NAS3D_UPDATE_SCREENSHOTS=1`` copies them into docs/
    (otherwise they stay with the test's files, so a test run leaves the checkout as it was)."""
    if os.environ.get("NAS3D_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(screenshot, DOCS / screenshot.name)


@pytest.mark.parametrize("parent", ["default", "sigint-ignored"])
def test_dashboard_stops_cleanly_on_ctrl_c(search, parent: str) -> None:
    """Also when started with SIGINT ignored (a shell's background job; the suite at times): Python
    keeps an inherited SIG_IGN, and the dashboard used to serve on after SIGINT."""
    storage_url, root, _ = search
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if parent == "sigint-ignored" else None
    server, base = start_dashboard(storage_url, root, preexec_fn=ignore)
    try:
        get_json(f"{base}/api/studies")
        server.send_signal(signal.SIGINT)
        try:
            out, err = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # where it hangs: faulthandler prints every thread on SIGABRT
            server.send_signal(signal.SIGABRT)
            out, err = server.communicate(timeout=30)
            pytest.fail(f"the dashboard did not stop within 60 s of SIGINT; its threads:\n{out}\n{err}")
    finally:
        server.kill()
    stopped = server.returncode == 0 and out.rstrip().endswith("dashboard stopped")
    assert stopped, (server.returncode, out, err)
    assert re.search(r"at http://127\.0\.0\.1:\d+/dashboard/", out)
    assert "no authentication" in err and "Traceback" not in err


def test_stopping_the_refresher_waits_for_the_refresh_in_flight_and_starts_no_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C's shutdown: the refresh in flight ends before the dashboard exits (one that was still
    writing at interpreter shutdown hung the exit), and the next study's is not started."""
    import threading

    from nas3d import dashboard

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for name in ("a", "b"):
        optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    started, ended = threading.Event(), []

    def slow_refresh(study: optuna.Study, runs=()) -> None:  # the figure and note take a while
        started.set()
        time.sleep(1.0)
        ended.append(study.study_name)

    monkeypatch.setattr(dashboard, "refresh_study", slow_refresh)
    refresher = dashboard.DashboardRefresher(storage, ["a", "b"], interval=60)
    refresher.start()
    assert started.wait(30)
    assert refresher.stop(wait=30) and ended == ["a"]
    blocked = dashboard.DashboardRefresher(storage, ["a"], interval=60)
    started.clear()
    blocked.start()
    assert started.wait(30)
    assert not blocked.stop(wait=0.1)  # a refresh longer than the wait: the caller is told
    blocked.join(30)


def test_dashboard_help_says_admin_endpoints_have_no_authentication(capsys: pytest.CaptureFixture) -> None:
    from nas3d.cli import main

    with pytest.raises(SystemExit):
        main(["dashboard", "--help"])
    assert "NO authentication" in " ".join(capsys.readouterr().out.split())


def test_dashboard_on_a_busy_port_is_one_line_exit_2(search, capsys: pytest.CaptureFixture[str]) -> None:
    from nas3d.cli import main

    storage_url, _, _ = search
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["dashboard", "--storage", storage_url, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nas3d: error: cannot listen on 127.0.0.1:{port}") and "\n" not in err


# --- nas3d report, status, export --picture ---------------------------------------------------------


def _table_rows(markdown: str, first_header: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_report_writes_png_html_and_a_table_equal_to_the_storage(search, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from nas3d.cli import main
    from nas3d.front import pareto_points
    from nas3d.pareto import fully_trained, study_hypervolume
    from nas3d.retrain import RetrainConfig, RetrainSource, retrain
    from nas3d.study import load_study

    storage_url, root, study = search
    study, config = load_study("smoke", study._storage)
    front = sorted((p for p in pareto_points(study.trials) if p.pareto), key=lambda p: -p.val_auc)
    # a real (one-epoch, one-seed) retrain of the best trial, as `nas3d retrain` writes it
    best = study.trials[front[0].number]
    retrained = retrain(RetrainSource.from_trial("smoke", best), config.data,
                        RetrainConfig.of(epochs=1, seeds=(0,), batch_size=32, amp=False), "cpu",
                        tmp_path / "retrain" / "best")
    # a second study (a copy) makes one table with a mean row
    optuna.copy_study(from_study_name="smoke", from_storage=storage_url, to_storage=storage_url,
                      to_study_name="smoke-copy")

    out = tmp_path / "report"
    assert main(["report", "--storage", storage_url, "--study-name", "smoke", "--study-name", "smoke-copy",
                 "--out", str(out), "--retrain-results", str(tmp_path / "retrain")]) == 0
    assert "2 studies" in capsys.readouterr().out
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "pareto.html").read_text()
    assert '"type":"log"' in html.replace(" ", "") and "smoke: Pareto front" in html
    markdown = (out / "report.md").read_text()

    rows = _table_rows(markdown, "dataset")
    assert len(rows) == 2 * len(front) + 1 and rows[-1][0] == "**mean**"
    for row, p in zip(rows, [*front, *front], strict=False):
        trial = study.trials[int(row[2])]
        assert row[2] == str(p.number)
        # the val AUC, then its 95 % interval (the trial's recorded bootstrap interval), which holds it
        auc, _, interval = row[3].partition(" ")
        assert float(auc) == pytest.approx(trial.values[0], abs=5e-5)
        low, high = (float(bound) for bound in interval.strip("[]").split(","))
        assert low <= float(auc) <= high
        assert float(row[4]) == pytest.approx(trial.user_attrs["val_acc"], abs=5e-5)
        assert float(row[5].replace(",", "")) == pytest.approx(trial.values[1] / 1e6, abs=5e-3)
        assert int(row[6].replace(",", "")) == trial.user_attrs["params"]
        assert row[-1] == f"`{trial.user_attrs['arch']}`"
    summary = retrained.results["summary"]
    # mean±std over seeds, then the bootstrap interval over the test samples where it is defined
    assert rows[0][7].startswith(f"{summary['test_auc']['mean']:.4f}±{summary['test_auc']['std']:.4f}")
    assert rows[0][8].startswith(f"{summary['test_acc']['mean']:.4f}±{summary['test_acc']['std']:.4f}")
    assert rows[1][7] == "-" if len(front) > 1 else True
    assert float(rows[-1][3]) == pytest.approx(front[0].val_auc, abs=5e-5)  # the mean of two equal bests

    hypervolume = study_hypervolume(study.trials, config.data)
    volumes = _table_rows(markdown, "study")
    assert [r[0] for r in volumes] == ["smoke", "smoke-copy", "mean"]
    assert volumes[0][3] == str(len(fully_trained(study.trials)))
    assert float(volumes[0][5]) == pytest.approx(hypervolume, abs=5e-5)

    # one study: its report's figure has no seed study architectures at 12³ (they were chosen at 28³)
    one = ["report", "--storage", storage_url, "--study-name", "smoke", "--out", str(tmp_path / "one")]
    assert main(one) == 0
    assert "seed study: organmnist3d" not in (tmp_path / "one" / "pareto.html").read_text()
    _screenshot_report(tmp_path / "one", tmp_path)


def _screenshot_report(out: Path, tmp_path: Path) -> None:
    """pareto.html as a browser renders it, for the README (where Chromium is at hand)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return
    browser = _browser()
    try:
        browser.get((out / "pareto.html").as_uri())
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".main-svg .xtitle"))
        assert browser.find_element(By.CSS_SELECTOR, ".xtitle").text.startswith("FLOPs (log scale")
        browser.save_screenshot(str(tmp_path / "report.png"))
        _for_docs(tmp_path / "report.png")
    finally:
        browser.quit()


def test_status_prints_the_hypervolume_and_each_pareto_architecture(search, capsys) -> None:
    from nas3d.cli import main
    from nas3d.front import pareto_points
    from nas3d.pareto import study_hypervolume
    from nas3d.study import load_study

    storage_url, _, study = search
    _, config = load_study("smoke", study._storage)
    assert main(["status", "--storage", storage_url, "--study-name", "smoke"]) == 0
    out = capsys.readouterr().out
    assert f"hypervolume {study_hypervolume(study.trials, config.data):.4f}" in out
    for p in pareto_points(study.trials):
        assert (f"  {p.arch}" in out) == p.pareto


def test_status_of_one_trial_shows_attrs_curve_reason_and_artifacts(search, capsys) -> None:
    from nas3d.cli import main

    storage_url, _, study = search
    done = next(t for t in study.trials if t.state.name == "COMPLETE")
    status = ["status", "--storage", storage_url, "--study-name", "smoke", "--trial"]
    assert main([*status, str(done.number)]) == 0
    out = capsys.readouterr().out
    assert f"trial {done.number} of study 'smoke': complete" in out
    assert f"arch: {done.user_attrs['arch']}" in out
    # every trained trial records its curve: one row per epoch run, under the curve's header
    assert "learning curve:" in out and "val_auc" in out and "not recorded" not in out
    assert f"trial-{done.number}.pt" in out
    assert f"trial-{done.number}.svg  image/svg+xml" in out or not tool_available("dot", why=GRAPHVIZ_WHY)

    pruned = next(t for t in study.trials if t.state.name == "PRUNED")
    assert main([*status, str(pruned.number)]) == 0
    out = capsys.readouterr().out
    assert f"reason: {pruned.user_attrs['failure_reason']}" in out and "artifacts: none" in out

    # the recorded curve as the worker writes it (nas3d.early_stopping.CURVE_ATTR: lists by key), on a
    # trial of its own study so the shared one stays as trained: one row per epoch, values as stored
    curve = {"epoch": [1, 2], "train_loss": [0.7, 0.66], "val_loss": [0.69, 0.65], "val_auc": [0.61, 0.72],
             "val_acc": [0.55, 0.6]}
    other = optuna.create_study(study_name="smoke-curve", storage=storage_url,
                                directions=["maximize", "minimize"])
    other.add_trial(optuna.trial.create_trial(values=[0.72, 1e6], user_attrs={"learning_curve": curve,
                                                                              "best_epoch": 2}))
    assert main(["status", "--storage", storage_url, "--study-name", "smoke-curve", "--trial", "0"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"epoch\s+train_loss\s+val_loss\s+val_auc\s+val_acc\n", out)
    assert re.search(r"\s1\s+0\.7000\s+0\.6900\s+0\.6100\s+0\.5500\n", out)
    assert re.search(r"\s2\s+0\.6600\s+0\.6500\s+0\.7200\s+0\.6000\s+best", out)


@pytest.mark.usefixtures("graphviz_dot")
def test_export_writes_the_picture_next_to_the_checkpoint(search, tmp_path: Path, monkeypatch) -> None:
    from nas3d.cli import main

    storage_url, root, study = search
    monkeypatch.setenv("NAS3D_ARTIFACTS", str(root / "artifacts"))
    done = next(t for t in study.trials if t.state.name == "COMPLETE")
    out = tmp_path / "best.pt"
    argv = ["export", "--storage", storage_url, "--study-name", "smoke", "--trial", str(done.number),
            "--out", str(out), "--picture"]
    assert main(argv) == 0
    picture = (tmp_path / "best.svg").read_text()
    assert "<svg" in picture and f"smoke trial {done.number}" in picture
    assert main(argv) == 2  # both files are kept unless --force
    assert main([*argv, "--force"]) == 0
