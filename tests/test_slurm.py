"""deploy/slurm/workers.sbatch on a real single-node Slurm: a 2-task array of CPU workers on a smoke
study in PostgreSQL finishes the exact budget, a task cancelled mid-trial re-queues its trial, and a
2-task array of plan workers (``--plan``) runs a tiny reproduce plan's searches and retrain jobs to
its table, and a plan task cancelled mid-retrain gives its job back to the other task, which resumes it
from its saved epoch.

The cluster (munged, slurmctld, slurmd) is started by the test in a temp folder (nas3d/testing/servers.py).
Skipped where the Slurm binaries are missing, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas3d import records
from nas3d.budget import budget_state
from nas3d.plan import job_key, load_plan
from nas3d.storages import make_storage
from nas3d.study import create_study, load_study
from nas3d.testing.servers import SLURM_BINARIES, ServerUnavailable, slurm_cluster
from nas3d.testing.storages import temporary_database
from tests.conftest import requires_tool, unavailable
from tests.test_reproduce import TINY
from tests.test_study import smoke_config
from tests.test_worker import counted, long_trials_study, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "slurm" / "workers.sbatch"
KILL_WAIT_S = 30  # Slurm's default: SIGKILL this long after SIGTERM


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    requires_tool(*SLURM_BINARIES, why="a single-node Slurm runs the job array "
                  "(Debian: apt-get install slurm-wlm munge)")
    try:
        cluster = slurm_cluster(cpus=2, kill_wait=KILL_WAIT_S)
        env = cluster.__enter__()
    except ServerUnavailable as e:
        unavailable(f"single-node Slurm: {e}")
    try:
        yield env
    finally:
        cluster.__exit__(None, None, None)


@pytest.fixture
def pg_url(postgres_server: str) -> Iterator[str]:
    with temporary_database(postgres_server, "nas3d_test_slurm") as url:
        yield url


def submit(slurm: dict[str, str], storage_url: str, study: str, tmp_path: Path,
           target: list[str] | None = None) -> str:
    """``sbatch --array=0-1 workers.sbatch STUDY`` (or ``target``, e.g. ``--plan NAME``) with CPU
    overrides; returns the job id."""
    env = {
        **os.environ, **slurm,
        "NAS3D_STORAGE": storage_url,  # from the environment, as the script requires
        "NAS3D_ARTIFACTS": str(tmp_path / "artifacts"),
        "NAS3D_DEVICE": "cpu",
        "NAS3D_COMMAND": f"{sys.executable} -m nas3d",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        "sbatch", "--parsable", "--array=0-1", "--gres=none", "--cpus-per-task=1", "--mem=1G",
        f"--output={tmp_path}/worker-%A_%a.out", f"--chdir={tmp_path}",
        str(SCRIPT), *(target or [study]), "--heartbeat-interval", "1", "--grace-period", "3",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip().split(";")[0]


def squeue(slurm: dict[str, str], job: str) -> list[str]:
    """``JOBID STATE`` of each array task still known to Slurm."""
    done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], env={**os.environ, **slurm},
                          capture_output=True, text=True)
    return done.stdout.split("\n")[:-1] if done.returncode == 0 else []


def outputs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("worker-*.out")))


def test_script_refuses_to_run_without_a_storage_url(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NAS3D_STORAGE"}
    done = subprocess.run(["bash", str(SCRIPT), "smoke"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "NAS3D_STORAGE is not set" in done.stderr
    assert "postgresql://" not in SCRIPT.read_text().split("set -euo pipefail")[1]


@pytest.mark.parametrize("args", [[], ["--verbose"], ["--plan"], ["--plan", "--no-claim-ahead"],
                                  ["--plan", ""]])
def test_a_bad_use_is_one_usage_line_and_exit_2(args: list[str]) -> None:
    done = subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, "NAS3D_STORAGE": "postgresql://x"},
                          capture_output=True, text=True)
    assert done.returncode == 2 and not done.stdout
    assert done.stderr.splitlines() == ["usage: sbatch --array=0-N workers.sbatch STUDY_NAME [nas3d worker "
                                        "options] | --plan NAME [nas3d reproduce options]"]


def test_job_array_finishes_exactly_the_budget(slurm: dict[str, str], pg_url: str, tmp_path: Path) -> None:
    config = smoke_config(tmp_path, **{"study.n_trials": 5, "study.name": "slurm-budget"})
    study = create_study(config, make_storage(pg_url))
    job = submit(slurm, pg_url, "slurm-budget", tmp_path)
    wait_for(lambda: not squeue(slurm, job), timeout=300, interval=0.5)
    logs = outputs(tmp_path)
    assert logs.count("study 'slurm-budget' has used its budget of 5 trained architectures") == 2, logs
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], logs
    assert budget_state(study).used == 5 == len(counted(study))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), logs


def test_cancelled_task_requeues_its_trial_and_the_study_finishes(
    slurm: dict[str, str], pg_url: str, tmp_path: Path
) -> None:
    study = long_trials_study(pg_url, tmp_path, "slurm-cancel")
    job = submit(slurm, pg_url, "slurm-cancel", tmp_path)

    def training() -> list[optuna.trial.FrozenTrial]:
        return [t for t in study.get_trials(deepcopy=False)
                if t.state == TrialState.RUNNING and "arch_hash" in t.user_attrs]

    wait_for(lambda: len(training()) == 2, timeout=240, interval=0.5)  # both tasks mid-trial
    cancelled_at = time.monotonic()
    subprocess.run(["scancel", f"{job}_0"], env={**os.environ, **slurm}, check=True)
    wait_for(lambda: f"{job}_0" not in " ".join(squeue(slurm, job)), timeout=KILL_WAIT_S + 30)
    # it left on SIGTERM, well before the SIGKILL that follows after KillWait
    assert time.monotonic() - cancelled_at < KILL_WAIT_S, outputs(tmp_path)
    wait_for(lambda: not squeue(slurm, job), timeout=400, interval=0.5)

    logs = outputs(tmp_path)
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], logs
    [interrupted] = [t for t in trials if t.state == TrialState.FAIL]
    assert interrupted.user_attrs["failure_reason"] == "interrupted: the worker received SIGTERM; re-queued"
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == interrupted.number]
    assert retry.state == TrialState.COMPLETE and retry.params == interrupted.params
    assert len(counted(study)) == 2 and all(t.state == TrialState.COMPLETE for t in counted(study))
    assert (f"trial {interrupted.number} failed (interrupted: the worker received SIGTERM; re-queued) "
            "and was queued again") in logs and "worker stopped by SIGTERM" in logs



#: tests/test_reproduce.py's tiny plan on two datasets: two 1-epoch search trials each at 8³, then one
#: 1-epoch retrain job each (the best model, seed 0, no baselines).
TINY_PLAN = ["--datasets", "adrenalmnist3d,vesselmnist3d", *TINY, "--no-baselines", "--select", "best"]


def nas3d(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas3d", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_plan_workers_as_a_job_array_run_the_searches_then_each_retrain_job_once(
    slurm: dict[str, str], pg_url: str, tmp_path: Path
) -> None:
    created = nas3d("reproduce", "--storage", pg_url, "--name", "slurm-plan", "--create", *TINY_PLAN,
                    "--artifacts", str(tmp_path / "artifacts"), "--cpu")
    assert created.returncode == 0, created.stderr[-3000:]
    job = submit(slurm, pg_url, "", tmp_path, target=["--plan", "slurm-plan", "--no-claim-ahead"])
    wait_for(lambda: not squeue(slurm, job), timeout=400, interval=0.5)

    logs = outputs(tmp_path)
    for index in (0, 1):
        log = (tmp_path / f"worker-{job}_{index}.out").read_text()
        assert f"plan worker {index} on cpu: plan 'slurm-plan', 2 datasets" in log, logs
        assert f"plan worker {index}: no work left in plan 'slurm-plan'" in log, logs
    backend = make_storage(pg_url)
    plan = load_plan(pg_url, "slurm-plan")
    for dataset in plan.datasets:
        search, config = load_study(plan.search_study(dataset), backend)
        assert budget_state(search).used == 2 == config.study.n_trials == len(counted(search)), logs
        assert not search.get_trials(states=(TrialState.RUNNING, TrialState.WAITING)), logs
        jobs = optuna.load_study(study_name=plan.retrain_study(dataset), storage=backend).get_trials()
        assert not [t for t in jobs if t.state in (TrialState.RUNNING, TrialState.WAITING)], logs
        done = [job_key(t.user_attrs[records.JOB]) for t in jobs if t.state == TrialState.COMPLETE]
        assert len(done) == len(set(done)) == 1, logs  # the best model, seed 0: once
        assert set(done) == {job_key(t.user_attrs[records.JOB]) for t in jobs}, logs

    report = nas3d("reproduce", "--storage", pg_url, "--name", "slurm-plan", "--report",
                   "--out", str(tmp_path / "table"))
    assert report.returncode == 0, report.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "table" / "table.csv").open()))
    searched = [r for r in rows if r["section"] == "searched"]
    assert [r["dataset"] for r in searched] == ["adrenalmnist3d", "vesselmnist3d"], rows
    assert all(r["seeds_done"] == "1" and 0 <= float(r["test_auc_mean"]) <= 1 for r in searched), rows
    assert "## Missing" not in (tmp_path / "table" / "table.md").read_text()


def test_a_plan_task_cancelled_mid_retrain_gives_its_job_to_the_other_task(
    slurm: dict[str, str], pg_url: str, tmp_path: Path
) -> None:
    # One search trial, then one retrain job of 12 epochs on 240 volumes at 12³, saved every epoch.
    created = nas3d("reproduce", "--storage", pg_url, "--name", "slurm-requeue", "--create",
                    "--datasets", "adrenalmnist3d", "--size", "12", "--synthetic", "--synthetic-scale", "0.2",
                    "--n-trials", "1", "--max-epochs", "1", "--retrain-epochs", "12", "--save-every", "1",
                    "--seeds", "0", "--no-baselines", "--select", "best",
                    "--artifacts", str(tmp_path / "artifacts"), "--cpu")
    assert created.returncode == 0, created.stderr[-3000:]
    plan = load_plan(pg_url, "slurm-requeue")
    retrain = optuna.load_study(study_name=plan.retrain_study("adrenalmnist3d"), storage=make_storage(pg_url))
    job = submit(slurm, pg_url, "", tmp_path, target=["--plan", "slurm-requeue", "--no-claim-ahead"])

    def saved_and_running() -> list[optuna.trial.FrozenTrial]:
        if not list((tmp_path / "artifacts").rglob("progress-*.pt")):
            return []
        return retrain.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

    wait_for(lambda: saved_and_running() or not squeue(slurm, job), timeout=300, interval=0.5)
    [running] = saved_and_running() or [None]
    assert running is not None, outputs(tmp_path)  # the job had saved an epoch and was still training
    holder = running.system_attrs[records.WORKER]["worker"]
    cancelled_at = time.monotonic()
    subprocess.run(["scancel", f"{job}_{holder}"], env={**os.environ, **slurm}, check=True)
    wait_for(lambda: f"{job}_{holder}" not in " ".join(squeue(slurm, job)), timeout=KILL_WAIT_S + 30)
    assert time.monotonic() - cancelled_at < KILL_WAIT_S, outputs(tmp_path)  # on SIGTERM, not SIGKILL
    wait_for(lambda: not squeue(slurm, job), timeout=400, interval=0.5)

    logs = outputs(tmp_path)
    jobs = retrain.get_trials()
    assert [t.state for t in jobs] == [TrialState.FAIL, TrialState.COMPLETE], logs
    assert records.failure_reason(jobs[0]).startswith("interrupted: the worker received SIGTERM"), logs
    assert records.retry_of(jobs[1]) == [jobs[0].number]
    assert job_key(jobs[1].user_attrs[records.JOB]) == job_key(jobs[0].user_attrs[records.JOB])
    assert jobs[1].system_attrs[records.WORKER]["worker"] == 1 - holder  # finished by the other task
    epoch = jobs[1].user_attrs[records.RESUMED_FROM]
    assert epoch >= 1 and jobs[1].user_attrs[records.JOB_RESULT]["epochs_run"] == 12, logs
    other = (tmp_path / f"worker-{job}_{1 - holder}.out").read_text()
    assert f"resuming from epoch {epoch} of 12" in other, logs
    assert f"plan worker {1 - holder}: no work left in plan 'slurm-requeue'" in other, logs
    assert f"plan worker {holder} stopped by SIGTERM" in logs, logs
