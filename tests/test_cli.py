"""The `nas3d` command end to end, as a user runs it (real processes, real storages)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas3d.storage import make_storage
from nas3d.worker import budget_state

REPO = Path(__file__).resolve().parents[1]


def nas3d(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "nas3d", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_search_smoke_study_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = nas3d("search", "--study", str(REPO / "studies" / "smoke.toml"), "--data-root", str(data),
                   "--n-trials", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "study 'smoke' ready" in result.stdout
    assert "(budget 3)" in result.stdout
    study = optuna.load_study(study_name="smoke", storage=make_storage(None))
    assert budget_state(study).used == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    status = nas3d("status", cwd=tmp_path)
    assert status.returncode == 0 and "val_auc" in status.stdout


def test_missing_dataset_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    result = nas3d("search", "--dataset", "nodulemnist3d", "--data-root", str(empty),
                   "--set", "data.download=false", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "nodulemnist3d.npz not found in" in lines[0] and "zenodo" in lines[0].lower()
    assert optuna.get_all_study_summaries(make_storage(None)) == []


def test_download_failure_offline_never_switches_data(tmp_path: Path) -> None:
    # With download on and no network the job stops with the same kind of one-line error.
    result = nas3d("search", "--dataset", "adrenalmnist3d", "--data-root", str(tmp_path / "d"), cwd=tmp_path,
                   timeout=120)
    if result.returncode == 0:  # pragma: no cover - a machine with network access downloads it
        pytest.skip("the network is available here: medmnist downloaded the file")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "adrenalmnist3d" in result.stderr
    assert optuna.get_all_study_summaries(make_storage(None)) == []


def test_bad_study_file_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((REPO / "studies" / "smoke.toml").read_text().replace("max_epochs", "max_epoch"))
    result = nas3d("create-study", "--study", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "max_epoch" in result.stderr and "max_epochs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_worker_for_unknown_study_says_how_to_create_it(tmp_path: Path) -> None:
    result = nas3d("worker", "--study-name", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert "no study named 'nope'" in result.stderr and "create-study" in result.stderr


@pytest.mark.slow
def test_launch_runs_several_workers_against_postgresql(postgres_url: str, tmp_path: Path) -> None:
    name = "launch-pg"
    created = nas3d("create-study", "--study", str(REPO / "studies" / "smoke.toml"), "--name", name,
                    "--n-trials", "5", "--data-root", str(tmp_path / "data"), "--storage", postgres_url,
                    cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    result = nas3d("launch", "--study-name", name, "--storage", postgres_url, "--cpu", "--workers", "2",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("starting worker") == 2
    study = optuna.load_study(study_name=name, storage=make_storage(postgres_url))
    assert budget_state(study).used == 5
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
