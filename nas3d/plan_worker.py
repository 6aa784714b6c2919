"""A plan worker: one process, one device, whatever work of a reproduce plan (:mod:`nas3d.plan`) is
ready, until none is left anywhere.

Its loop: search trials first (:func:`nas3d.worker.run_worker` on each search study with budget left,
returning once that budget is all claimed); then, as searches finish, their retrain jobs (queued once,
:func:`nas3d.plan.queue_searched_jobs`) and the baselines' jobs; while other workers still run trials
or jobs that may free or unlock work, it polls every few seconds. A job is claimed under its retrain
study's lock (stale jobs failed and queued again first, as for trials), beaten for while it trains, and
told its test AUC; a job whose training fails is failed with its reason, never scored; a job a stop
interrupted is failed and queued again, as is one whose data this host cannot read (missing or damaged
file: the worker then exits with that one line, exit 2, as a search worker does). A job saves its
progress every ``save_every`` epochs in the study's artifact store under the JOB's name (dataset,
model, seed), not the trial's, so a retry on any host resumes from the last saved epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import TrialState

from nas3d import records
from nas3d.claims import fail_orphans
from nas3d.data import DatasetCorrupt, DatasetUnavailable
from nas3d.heartbeat import Heartbeat, StopFlag, quiet_optuna_warnings
from nas3d.outcomes import interrupted, tell
from nas3d.plan import Plan, load_plan, queue_searched_jobs, search_finished
from nas3d.storages import (
    DEFAULT_HEARTBEAT_INTERVAL,
    StorageMissing,
    StorageUnavailable,
    grace_period_for,
    make_storage,
    resolve_storage_url,
    storage_retry_window,
    study_artifact_store,
    study_lock,
)
from nas3d.study import load_study
from nas3d.train import TrainingStopped
from nas3d.train import torch_device as check_device
from nas3d.worker import WorkerStorageLost, run_worker

__all__ = ["POLL_SECONDS", "ArtifactProgress", "progress_id", "run_plan_worker"]

logger = logging.getLogger(__name__)

#: Seconds between looks while other workers hold the only work left.
POLL_SECONDS = 3.0


class ArtifactProgress:
    """A job's saved progress (:class:`nas3d.retrain.ProgressStore`) in the study's artifact store."""

    def __init__(self, store: Any, artifact_id: str) -> None:
        self.store, self.artifact_id = store, artifact_id

    def load(self) -> bytes | None:
        try:
            with contextlib.closing(self.store.open_reader(self.artifact_id)) as reader:
                return reader.read()
        except (ArtifactNotFound, FileNotFoundError):
            return None

    def save(self, data: bytes) -> None:
        self.store.write(self.artifact_id, io.BytesIO(data))

    def clear(self) -> None:
        with contextlib.suppress(ArtifactNotFound, FileNotFoundError):
            self.store.remove(self.artifact_id)


def progress_id(plan: Plan, dataset: str, job: dict[str, Any]) -> str:
    """The artifact id of a job's progress: its plan, dataset, size, model and seed (a retry of the job,
    a new trial, finds it)."""
    raw = f"progress-{plan.name}-{dataset}-{plan.size}-{job['model']}-seed{job['seed']}.pt"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


def run_plan_worker(
    plan_name: str,
    storage: Any,
    *,
    device: str = "cpu",
    worker_index: int = 0,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
    progress: bool = False,
    claim_ahead: bool = True,
    poll_seconds: float = POLL_SECONDS,
    say: Callable[[str], object] = logger.info,
) -> int:
    """Run the plan's work on ``device`` until none is left; returns the trials and jobs run here."""
    check_device(device)
    url = resolve_storage_url(storage)
    grace = grace_period_for(heartbeat_interval, grace_period)
    backend = make_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace,
                           retry_window=storage_retry_window(), must_exist=True)
    plan = load_plan(url, plan_name)
    stop = StopFlag()
    stop.install()
    quiet_optuna_warnings()
    say(f"plan worker {worker_index} on {device}: plan {plan.name!r}, {len(plan.datasets)} datasets")
    try:
        ran = _work(plan, url, backend, device, worker_index, heartbeat_interval, grace, progress,
                    claim_ahead, poll_seconds, stop, say)
    except StorageMissing:
        raise  # bad input: a restart cannot help (exit 2)
    except StorageUnavailable as e:  # past the retry window: exit EXIT_STORAGE, which launch restarts
        raise WorkerStorageLost(str(e)) from e
    if stop.requested:
        say(f"plan worker {worker_index} stopped by {stop.requested} after {ran} trials and jobs")
    else:
        say(f"plan worker {worker_index}: no work left in plan {plan.name!r} ({ran} trials and jobs here)")
    return ran


def _work(plan: Plan, url: str, backend: Any, device: str, worker_index: int, heartbeat_interval: int,
          grace: int, progress: bool, claim_ahead: bool, poll_seconds: float, stop: StopFlag,
          say: Callable[[str], object]) -> int:
    """The plan worker's loop (see the module docstring); the trials and jobs run here."""
    ran = 0
    while not stop.requested:
        searching = [d for d in plan.datasets if not _budget_claimed(plan, d, backend)]
        if searching:
            dataset = searching[0]
            ran += run_worker(plan.search_study(dataset), url, device=device, worker_index=worker_index,
                              heartbeat_interval=heartbeat_interval, grace_period=grace, progress=progress,
                              claim_ahead=claim_ahead, wait_for_running=False, stop=stop)
            continue
        busy = False  # some search or job still runs elsewhere: it may free or unlock work
        job = None
        for dataset in plan.datasets:
            if not queue_searched_jobs(plan, dataset, url, backend):
                busy = True
                _fail_stale(plan.search_study(dataset), url, backend, grace)
            job = _claim_job(plan, dataset, url, backend, worker_index, grace)
            if job is not None:
                break
            busy = busy or _running_jobs(plan, dataset, backend) > 0
        if job is not None:
            ran += run_job(plan, job[0], job[1], job[2], backend, device, stop, heartbeat_interval, say)
        elif busy:
            time.sleep(poll_seconds)
        else:
            break
    return ran


def _budget_claimed(plan: Plan, dataset: str, backend: Any) -> bool:
    """Whether no search trial of ``dataset`` may start (those running are other workers')."""
    from nas3d.budget import budget_state

    study, config = load_study(plan.search_study(dataset), backend)
    state = budget_state(study)
    return state.spent(config.study.n_trials)


def _fail_stale(name: str, url: str, backend: Any, grace: int) -> None:
    """Fail (and queue again) the trials of ``name`` whose worker died: no worker of that study is
    left to notice, once every plan worker has moved on."""
    study = optuna.load_study(study_name=name, storage=backend)
    with study_lock(url, name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        fail_orphans(study, older_than=grace, recovering=getattr(backend, "recovering", None))


def _running_jobs(plan: Plan, dataset: str, backend: Any) -> int:
    study = optuna.load_study(study_name=plan.retrain_study(dataset), storage=backend)
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _claim_job(plan: Plan, dataset: str, url: str, backend: Any, worker_index: int,
               grace: int) -> tuple[str, optuna.Study, optuna.Trial] | None:
    """The next waiting job of ``dataset``, asked and marked as this worker's under the study lock."""
    import os
    import socket

    name = plan.retrain_study(dataset)
    study = optuna.load_study(study_name=name, storage=backend, sampler=optuna.samplers.RandomSampler())
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
        return None
    with study_lock(url, name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        fail_orphans(study, older_than=grace, recovering=getattr(backend, "recovering", None))
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        trial = study.ask()  # pops the oldest waiting job
        if isinstance(backend, optuna.storages.RDBStorage):
            backend.record_heartbeat_now(trial._trial_id)
        marker = {"worker": worker_index, "host": socket.gethostname(), "pid": os.getpid()}
        backend.set_trial_system_attr(trial._trial_id, records.WORKER, marker)
    return dataset, study, trial


def run_job(plan: Plan, dataset: str, study: optuna.Study, trial: optuna.Trial, backend: Any, device: str,
            stop: StopFlag, heartbeat_interval: int, say: Callable[[str], object]) -> int:
    """Train, test and tell one claimed job; returns 1 when it ended here (0: interrupted, queued again)."""
    from nas3d.costs import measure_costs
    from nas3d.retrain import RetrainConfig, RetrainSource, run_seed_job
    from nas3d.study import load_trial

    job = dict(trial.user_attrs[records.JOB])
    heartbeat = (Heartbeat(backend, trial._trial_id, heartbeat_interval)
                 if isinstance(backend, optuna.storages.RDBStorage) else None)
    what = f"{dataset} {job['model']} seed {job['seed']} (job {trial.number})"
    try:
        search_name = plan.search_study(dataset)
        data = load_study(search_name, backend)[1].data
        if job["kind"] == "baseline":
            source = RetrainSource.from_baseline(job["model"])
        else:
            source = RetrainSource.from_trial(search_name, load_trial(backend, search_name, job["trial"]))
        costs = measure_costs(source.recipe, data.in_channels, data.num_classes, data.size, with_thop=False)
        trial.set_user_attr(records.FLOPS, costs.flops)
        trial.set_user_attr(records.PARAMS, costs.params)
        trial.set_user_attr(records.DEVICE, device)
        trial.set_user_attr(records.ARCH, source.recipe.describe())
        config = RetrainConfig.of(epochs=plan.retrain_epochs, seeds=(job["seed"],),  # the paper's recipe
                                  batch_size=plan.batch_size, recipe="paper")
        store = ArtifactProgress(study_artifact_store(backend, study.study_name),
                                 progress_id(plan, dataset, job))
        trial.set_user_attr(records.RESUMED_FROM, 0)

        def tell_line(line: str) -> None:  # run_seed_job says from which epoch it resumed, if it did
            found = re.search(r"resuming from epoch (\d+)", line)
            if found:
                trial.set_user_attr(records.RESUMED_FROM, int(found.group(1)))
            say(f"{what}: {line}")

        say(f"{what}: {plan.retrain_epochs} epochs on {device}, recipe {config.train.describe_recipe()}")
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = Path(folder) / f"{progress_id(plan, dataset, job).removeprefix('progress-')}"
            result = run_seed_job(source, data, config, job["seed"], device=device, progress_store=store,
                                  save_every=plan.save_every, say=tell_line, should_stop=stop,
                                  checkpoint_path=checkpoint)
            if result.completed:
                _upload(study, trial, checkpoint, what)
    except (DatasetUnavailable, DatasetCorrupt) as error:  # this host's data, not the job: give it back
        records.fail_and_requeue(study, trial, f"its worker could not read the data: {error}; re-queued")
        raise
    except TrainingStopped:
        interrupted(study, trial, stop.why(), trained=True)
        say(f"{what}: stopped by {stop.requested}; queued again, its progress kept")
        return 0
    except UpdateFinishedTrialError:
        logger.warning("%s was finished by another worker meanwhile (stale heartbeat); this run is discarded",
                       what)
        return 0
    except Exception as error:  # the job's own failure: recorded with its reason, never scored
        records.fail_with_reason(trial, f"{type(error).__name__}: {error}")
        tell(study, trial, state=TrialState.FAIL)
        say(f"{what}: failed: {type(error).__name__}: {error}")
        return 1
    finally:
        if heartbeat is not None:
            heartbeat.stop()
    kept = {k: v for k, v in dataclasses.asdict(result).items() if k != "test_scores"}
    trial.set_user_attr(records.JOB_RESULT, kept)
    if not result.completed:
        records.fail_with_reason(trial, result.reason or "its training failed (no reason given)")
        tell(study, trial, state=TrialState.FAIL)
        say(f"{what}: failed: {result.reason}")
        return 1
    trial.set_user_attr(records.TEST_AUC, result.test_auc)
    trial.set_user_attr(records.TEST_ACC, result.test_acc)
    tell(study, trial, values=[result.test_auc, costs.flops])
    say(f"{what}: test AUC {result.test_auc:.4f} ACC {result.test_acc:.4f}")
    return 1


def _upload(study: optuna.Study, trial: optuna.Trial, checkpoint: Path, what: str) -> None:
    """The job's best-val checkpoint into the study's artifact store (``nas3d export`` reads it); a
    store that refuses it leaves the job's scores standing, marked ``checkpoint_missing``."""
    from nas3d.storages import artifact_write_errors, describe_artifact_store

    store = study_artifact_store(study._storage, study.study_name)
    try:
        artifact = optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(checkpoint),
                                                    study_or_trial=trial)
    except artifact_write_errors() as error:
        reason = f"{describe_artifact_store(store)}: {type(error).__name__}: {error}"
        trial.set_user_attr(records.CHECKPOINT_MISSING, reason)
        logger.warning("%s: its checkpoint was not stored (%s); its scores stand", what, reason)
        return
    trial.set_user_attr(records.CHECKPOINT_ARTIFACT, artifact)


def all_done(plan: Plan, backend: Any) -> bool:
    """Whether every search has finished and every job has ended."""
    for dataset in plan.datasets:
        search, config = load_study(plan.search_study(dataset), backend)
        if not search_finished(search, config.study.n_trials):
            return False
        retrain = optuna.load_study(study_name=plan.retrain_study(dataset), storage=backend)
        if records.JOBS_QUEUED not in retrain.user_attrs:
            return False
        if retrain.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
            return False
    return True
