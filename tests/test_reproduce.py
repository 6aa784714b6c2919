"""``nas3d reproduce``: the paper's table as one plan of searches and retrain jobs, end to end on
synthetic stand-ins; a killed job resumes from its saved epoch; two workers on PostgreSQL do each
job once; a finished plan only gets its table written again; bad input is one line."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas3d import records
from nas3d.plan import Plan, job_key, load_plan, make_plan
from nas3d.plan_worker import run_plan_worker
from nas3d.storages import make_storage
from nas3d.table import plan_status, seed_stats, write_table
from nas3d.testing.storages import temporary_database
from tests.test_worker import HEARTBEAT

#: The smallest plan that is still the paper's: every dataset, two search trials of one epoch at 8³,
#: one retrain seed of one epoch, on stand-ins a twentieth of the real train splits.
TINY = ["--size", "8", "--synthetic", "--synthetic-scale", "0.05", "--n-trials", "2", "--max-epochs", "1",
        "--retrain-epochs", "1", "--seeds", "0"]


def nas3d(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nas3d", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def all_trials(storage_url: str) -> list[optuna.trial.FrozenTrial]:
    backend = make_storage(storage_url)
    return [t for s in backend.get_all_studies() for t in backend.get_all_trials(s._study_id)]


def job_trials(storage_url: str, plan: Plan, dataset: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=plan.retrain_study(dataset), storage=make_storage(storage_url))
    return study.get_trials()


def tiny_plan(name: str, datasets: tuple[str, ...], **settings) -> Plan:
    from nas3d.plan import synthetic_shape

    fields = dict(name=name, datasets=datasets, size=8, seeds=(0,), retrain_epochs=1, n_trials=2,
                  max_epochs=1, selection="best", baselines=(), synthetic_scale=0.05)
    fields.update(settings)
    scale = fields["synthetic_scale"]
    return Plan(**fields, synthetic={d: synthetic_shape(d, scale) for d in datasets})


@pytest.mark.slow
def test_the_synthetic_plan_writes_the_six_dataset_table_and_a_rerun_only_rewrites_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    out = tmp_path / "table"
    command = ["reproduce", "--storage", url, "--name", "dry", *TINY, "--no-baselines", "--select", "best",
               "--cpu", "--workers", "1", "--no-claim-ahead", "--out", str(out), *HEARTBEAT]
    first = nas3d(*command)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "PARTIAL" not in table and "## Missing" not in table, table
    rows = list(csv.DictReader((out / "table.csv").open()))
    searched = [r for r in rows if r["section"] == "searched"]
    assert [r["dataset"] for r in searched] == ["organmnist3d", "nodulemnist3d", "fracturemnist3d",
                                                "adrenalmnist3d", "vesselmnist3d", "synapsemnist3d"]
    assert all(r["data"] == "synthetic" and r["seeds_done"] == "1" and 0 <= float(r["test_auc_mean"]) <= 1
               and float(r["flops_vs_resnet18"]) > 0 for r in searched), searched
    (mean,) = [r for r in rows if r["section"] == "mean"]
    assert mean["dataset"] == "6 of 6"
    assert float(mean["test_auc_mean"]) == pytest.approx(sum(float(r["test_auc_mean"]) for r in searched) / 6)
    assert "| nas3d reproduce, searched models (6 of 6 datasets) |" in table
    assert "| Seed study (published six-dataset mean) | 0.915 | 0.847 |" in table
    assert "## Six-dataset mean" in table and "| adrenalmnist3d | 0.827 | 0.721 | 0.828 | 0.745 |" in table
    assert "epochs on cpu, recipe paper\n" in first.stdout + first.stderr  # the paper's, as published
    for line in first.stdout.splitlines()[1:7]:
        assert " done " in line and "trials 2/2" in line and "retrains 1/1" in line, first.stdout

    before = {(t.number, t._trial_id, t.state) for t in all_trials(url)}
    (out / "table.md").unlink()
    again = nas3d(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "has no work left: writing its table only" in again.stderr
    assert "starting worker" not in again.stderr
    assert {(t.number, t._trial_id, t.state) for t in all_trials(url)} == before
    assert (out / "table.md").read_text() == table


@pytest.mark.slow
def test_baselines_are_jobs_from_the_start_and_rows_of_the_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    plan = tiny_plan("base", ("adrenalmnist3d",), n_trials=1, baselines=("resnet18", "resnet50"))
    make_plan(url, plan)
    queued = job_trials(url, plan, "adrenalmnist3d")
    assert sorted(job_key(t.user_attrs[records.JOB]) for t in queued) == [("resnet18", 0), ("resnet50", 0)]
    assert all(t.state == TrialState.WAITING for t in queued)
    folder, complete = write_table(url, "base", tmp_path / "partial")
    assert not complete
    partial = (folder / "table.md").read_text()
    assert "PARTIAL" in partial and "- adrenalmnist3d searched: its search has 0 of 1 trials done" in partial
    assert "- adrenalmnist3d resnet18: waiting" in partial
    status = plan_status(url, "base").splitlines()
    assert status[1].split() == ["adrenalmnist3d", "searching", "trials", "0/1", "retrains", "0/3+", "left",
                                 "?"]
    assert status[-1].endswith("over 1 running)")  # no "+retrains" estimate above: no footnote for it

    ran = run_plan_worker("base", url, heartbeat_interval=1, grace_period=3, claim_ahead=False,
                          poll_seconds=0.5)
    assert ran == 1 + 3  # one search trial, the searched model's job and the two baselines'
    folder, complete = write_table(url, "base", tmp_path / "table")
    assert complete
    rows = {r["model"]: r for r in csv.DictReader((folder / "table.csv").open()) if r["section"] == "other"}
    assert set(rows) == {"resnet18", "resnet50"}
    assert float(rows["resnet18"]["flops_vs_resnet18"]) == pytest.approx(1.0)
    assert float(rows["resnet50"]["flops_vs_resnet50"]) == pytest.approx(1.0)
    table = (folder / "table.md").read_text()
    assert "retrained resnet18 AUC" in table and "## Missing" not in table
    status = plan_status(url, "base").splitlines()
    assert status[1].split() == ["adrenalmnist3d", "done", "trials", "1/1", "retrains", "3/3", "left", "0m"]
    assert "+retrains" not in status[-1]
    # nas3d status names each study's score: the retrain study's jobs record test AUC, the search val AUC
    from nas3d.report import status_report
    retrains = status_report(url, plan.retrain_study("adrenalmnist3d"))
    assert "trial   test_auc" in retrains and "val_auc" not in retrains
    assert "trial    val_auc" in status_report(url, plan.search_study("adrenalmnist3d"))


def test_a_job_whose_data_is_damaged_here_is_queued_again_and_the_worker_stops(tmp_path: Path) -> None:
    from nas3d.data import DatasetCorrupt
    from nas3d.worker import run_worker

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    root = tmp_path / "data"
    plan = make_plan(url, tiny_plan("bad", ("adrenalmnist3d",), n_trials=1, data_root=str(root)))
    assert run_worker(plan.search_study("adrenalmnist3d"), url, heartbeat_interval=1, claim_ahead=False) == 1
    (npz,) = root.glob("synthetic_*.npz")
    npz.write_bytes(b"not an npz")  # this host's copy of the data, damaged after the search
    with pytest.raises(DatasetCorrupt, match="is not a readable MedMNIST npz"):
        run_plan_worker("bad", url, heartbeat_interval=1, grace_period=3, claim_ahead=False)
    jobs = job_trials(url, plan, "adrenalmnist3d")
    assert [t.state for t in jobs] == [TrialState.FAIL, TrialState.WAITING]  # given back, never scored
    assert "its worker could not read the data" in records.failure_reason(jobs[0])
    assert jobs[1].user_attrs[records.JOB] == jobs[0].user_attrs[records.JOB]


def test_seed_stats_are_the_student_t_interval_over_seeds() -> None:
    stats = seed_stats([0.8, 0.9, 0.7])
    assert stats["mean"] == pytest.approx(0.8) and stats["std"] == pytest.approx(0.1)
    # t(0.975, 2) = 4.3027: the half-width is 4.3027 * 0.1 / sqrt(3)
    assert stats["mean"] - stats["ci_low"] == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-5)
    assert stats["ci_high"] == 1.0  # 0.8 + 0.248, clipped to the AUC's range
    assert seed_stats([0.8]) == {"mean": 0.8, "std": None, "ci_low": None, "ci_high": None}
    # two seeds: t(0.975, 1) = 12.7 would put the interval past both ends; AUC and ACC stay in [0, 1]
    assert seed_stats([0.95, 0.85]) | {"std": None} == {"mean": pytest.approx(0.9), "std": None,
                                                        "ci_low": pytest.approx(0.9 - 12.706205 * 0.05),
                                                        "ci_high": 1.0}
    assert seed_stats([0.02, 0.12])["ci_low"] == 0.0


@pytest.mark.parametrize(("extra", "says"), [
    (["--datasets", "adrenalmnist3", "--synthetic"], "unknown dataset 'adrenalmnist3' (did you mean "),
    (["--datasets", "adrenalmnist3d", "--size", "8"], "data.size must be one of (28, 64)"),
    (["--datasets", "adrenalmnist3d", "--synthetic", "--synthetic-scale", "2"], "--synthetic-scale must be"),
    (["--datasets", "adrenalmnist3d", "--synthetic", "--seeds", "0,0"], "--seeds must be distinct"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  extra: list[str], says: str) -> None:
    from tests.test_cli import one_line_error, run_main

    db = tmp_path / "db.sqlite"
    assert run_main("reproduce", "--storage", f"sqlite:///{db}", *extra, "--cpu") == 2
    assert says in one_line_error(capsys)
    assert not db.exists() or not all_trials(f"sqlite:///{db}")


def test_a_plan_made_again_with_other_settings_is_refused_and_its_recorded_ones_are_the_defaults(
        tmp_path: Path) -> None:
    from nas3d.reproduce import plan_from_flags

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    plan = make_plan(url, tiny_plan("p", ("adrenalmnist3d",)))
    assert load_plan(url, "p") == plan
    with pytest.raises(ValueError, match="plan 'p' exists with retrain_epochs = 1, not 3; drop the change"):
        make_plan(url, tiny_plan("p", ("adrenalmnist3d",), retrain_epochs=3))
    flags = {"name": "p", "datasets": None, "synthetic": None, "baselines": None, "seeds": None}
    assert plan_from_flags(flags, plan) == plan
    with pytest.raises(LookupError, match="no reproduce plan named 'q' in this storage .it holds 'p'"):
        load_plan(url, "q")


def _wait_for(predicate, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_stopped_or_killed_retrain_job_resumes_from_its_last_saved_epoch(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    # A job of 12 epochs on 240 volumes, its progress saved after every epoch.
    plan = make_plan(url, tiny_plan("kill", ("adrenalmnist3d",), n_trials=1, retrain_epochs=12, save_every=1,
                                    synthetic_scale=0.2, size=12))
    progress = tmp_path / "artifacts" / "progress-kill-adrenalmnist3d-12-trial0-seed0.pt"
    command = [sys.executable, "-m", "nas3d", "reproduce", "--worker", "--storage", url, "--name", "kill",
               *HEARTBEAT]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def start(index: int, log: Path) -> subprocess.Popen:
        with log.open("w") as output:
            return subprocess.Popen([*command, "--worker-index", str(index)], env=env, stdout=output,
                                    stderr=subprocess.STDOUT)

    # SIGTERM mid-job: the job saves its epoch, is failed with the reason and queued again, the worker exits.
    first = start(0, tmp_path / "first.log")
    _wait_for(lambda: progress.is_file() or first.poll() is not None)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    jobs = job_trials(url, plan, "adrenalmnist3d")
    assert [t.state for t in jobs] == [TrialState.FAIL, TrialState.WAITING]
    assert "interrupted: the worker received SIGTERM" in records.failure_reason(jobs[0])

    # kill -9 mid-job, after it resumed and saved again: only its heartbeat can tell.
    log = tmp_path / "second.log"
    second = start(1, log)
    _wait_for(lambda: "resuming from epoch" in log.read_text() or second.poll() is not None)
    saved = progress.stat().st_mtime_ns
    _wait_for(lambda: not progress.is_file() or progress.stat().st_mtime_ns != saved
              or second.poll() is not None)
    os.kill(second.pid, signal.SIGKILL)
    second.wait()
    jobs = job_trials(url, plan, "adrenalmnist3d")
    assert [t.state for t in jobs] == [TrialState.FAIL, TrialState.RUNNING], log.read_text()[-3000:]
    before = jobs[1].user_attrs[records.RESUMED_FROM]
    assert before >= 1

    third = nas3d(*command[3:], "--worker-index", "2")
    assert third.returncode == 0, third.stderr[-3000:]
    resumed = [line for line in third.stderr.splitlines() if "resuming from epoch" in line]
    jobs = job_trials(url, plan, "adrenalmnist3d")
    assert [t.state for t in jobs] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert "stale heartbeat" in records.failure_reason(jobs[1])
    assert records.retry_of(jobs[2]) == [0, 1]
    epoch = jobs[2].user_attrs[records.RESUMED_FROM]
    assert before < epoch < 12 and resumed and f"resuming from epoch {epoch} of 12" in resumed[0]
    assert jobs[2].user_attrs[records.JOB_RESULT]["epochs_run"] == 12
    assert not progress.exists()  # cleared once the job is done
    assert jobs[2].user_attrs[records.CHECKPOINT_ARTIFACT]  # the job's best-val weights, stored


@pytest.mark.slow
def test_two_workers_on_postgresql_share_one_plan_and_do_each_job_once(
        postgres_server: str, tmp_path: Path) -> None:
    with temporary_database(postgres_server, "nas3d_reproduce") as url:
        plan = make_plan(url, tiny_plan("pg", ("adrenalmnist3d", "vesselmnist3d"), seeds=(0, 1),
                                        baselines=("resnet18",)),
                         artifacts=str(tmp_path / "artifacts"))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = ["reproduce", "--worker", "--storage", url, "--name", "pg", "--no-claim-ahead", *HEARTBEAT]
        workers = [subprocess.Popen([sys.executable, "-m", "nas3d", *command, "--worker-index", str(i)],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for i in range(2)]
        logs = [w.communicate(timeout=600)[1] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-2000:] for log in logs)
        for dataset in plan.datasets:
            search = optuna.load_study(study_name=plan.search_study(dataset), storage=make_storage(url))
            trained = [t for t in search.get_trials() if t.state == TrialState.COMPLETE]
            assert len(trained) == 2 and len({t.user_attrs[records.ARCH_HASH] for t in trained}) == 2
            jobs = job_trials(url, plan, dataset)
            keys = [job_key(t.user_attrs[records.JOB]) for t in jobs]
            assert all(t.state == TrialState.COMPLETE for t in jobs), [t.state for t in jobs]
            assert len(keys) == len(set(keys)) == 4, keys  # (searched model + resnet18) x 2 seeds, once each
        assert all("no work left" in log for log in logs)
        backend = make_storage(url)  # both took work: the trials and jobs carry both workers' marks
        marks = {t.system_attrs[records.WORKER]["pid"] for s in backend.get_all_studies()
                 for t in backend.get_all_trials(s._study_id) if t.state == TrialState.COMPLETE}
        assert marks == {w.pid for w in workers}
        folder, complete = write_table(url, "pg", tmp_path / "table")
        assert complete


REAL_ROOT = Path(os.environ.get("NAS3D_MEDMNIST_ROOT", "/work/shared/data"))


@pytest.mark.skipif(not (REAL_ROOT / "adrenalmnist3d.npz").is_file(),
                    reason=f"needs adrenalmnist3d.npz in {REAL_ROOT} (set NAS3D_MEDMNIST_ROOT)")
def test_a_dataset_whose_file_is_in_data_root_is_real_and_the_others_stand_ins(tmp_path: Path) -> None:
    from nas3d.reproduce import plan_from_flags
    from nas3d.study import load_study

    flags = {"name": "mixed", "datasets": "adrenalmnist3d,vesselmnist3d", "synthetic": True,
             "data_root": str(REAL_ROOT), "n_trials": 1}
    plan = plan_from_flags(flags, None)
    assert list(plan.synthetic) == ["vesselmnist3d"] and plan.size == 28
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    make_plan(url, plan)
    data = {d: load_study(plan.search_study(d), make_storage(url))[1].data for d in plan.datasets}
    real = data["adrenalmnist3d"]
    assert real.dataset == "adrenalmnist3d" and real.root == str(REAL_ROOT)
    assert data["vesselmnist3d"].dataset == "synthetic" and data["vesselmnist3d"].synthetic_classes == 2
    folder, _ = write_table(url, "mixed", tmp_path / "table")
    assert "Real data: adrenalmnist3d. Synthetic stand-ins (train split × 0.1): vesselmnist3d." in (
        folder / "table.md").read_text()
