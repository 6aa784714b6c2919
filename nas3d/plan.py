"""A reproduce plan: the paper's table as work in one storage (``nas3d reproduce``).

A plan named ``P`` holds, for each dataset ``D`` at size ``S``:

* the search study ``P-D-S``, made from ``studies/D.toml`` (else the seed study's defaults for ``D``),
  run by ordinary workers (:func:`nas3d.worker.run_worker`);
* the retrain study ``P-D-S-retrain``, whose trials are retrain JOBS, one model and one seed each:
  WAITING trials queued with ``enqueue_trial`` (their job in :data:`nas3d.records.JOB`), claimed, beaten
  for and queued again after a dead worker as search trials are. The baselines' jobs are queued when
  the plan is made; the searched models' once the search has finished, exactly once, under the retrain
  study's lock (:func:`queue_searched_jobs`).

The plan itself (datasets, size, seeds, retrain epochs, the selection rule, the baselines, synthetic
stand-ins) is recorded on the plan study ``P-plan`` (:data:`nas3d.records.PLAN`), so a worker on any
host needs only the storage and ``P``. Making a plan is idempotent: made again with the same settings
it changes nothing; with others it is refused, naming the difference.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas3d import records
from nas3d.baselines import BASELINES
from nas3d.budget import DEFAULT_MAX_FREE_STREAK, budget_state
from nas3d.data import DATASETS, SYNTHETIC
from nas3d.storages import make_storage, study_artifact_location, study_lock
from nas3d.study import load_study, prepare_study, study_id_of
from nas3d.util import did_you_mean

__all__ = [
    "DEFAULT_SCALE", "JOB_DIRECTIONS", "PAPER_DATASETS", "SELECTIONS", "DatasetState", "Plan",
    "choose_models", "dataset_state", "job_key", "load_plan", "make_plan", "queue_searched_jobs",
    "search_config",
]

logger = logging.getLogger(__name__)

#: The paper's six datasets, in its table's order.
PAPER_DATASETS = ("organmnist3d", "nodulemnist3d", "fracturemnist3d", "adrenalmnist3d", "vesselmnist3d",
                  "synapsemnist3d")
#: How the searched models to retrain are chosen from a search's Pareto front.
SELECTIONS = {
    "best": "the front member with the best val AUC",
    "best+seed": "the front member with the best val AUC, and the member nearest (in log FLOPs) to the "
                 "seed study's architecture for the dataset",
}
DEFAULT_SCALE = 0.1  # --synthetic-scale: a synthetic stand-in's train split, as a share of the real one's
#: A job's values: its test AUC (the seed's best-val epoch, tested) and the model's FLOPs.
JOB_DIRECTIONS = ("maximize", "minimize")
_STUDIES = Path(__file__).resolve().parents[1] / "studies"  # the source tree's study files


@dataclass(frozen=True)
class Plan:
    """What ``nas3d reproduce`` runs, as recorded in the plan study."""

    name: str
    datasets: tuple[str, ...] = PAPER_DATASETS
    size: int = 28
    seeds: tuple[int, ...] = (0, 42, 143, 1234, 3074)
    retrain_epochs: int = 200
    batch_size: int = 128
    save_every: int = 10  # epochs between a job's saved progress
    selection: str = "best+seed"
    baselines: tuple[str, ...] = tuple(BASELINES)
    n_trials: int | None = None  # None: each study file's budget
    max_epochs: int | None = None  # None: each study file's search epochs
    data_root: str | None = None
    #: Datasets run on synthetic stand-ins: ``{dataset: {"classes": C, "samples": N}}``.
    synthetic: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    synthetic_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("datasets", "seeds", "baselines"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "synthetic", {k: dict(v) for k, v in dict(self.synthetic).items()})

    @property
    def plan_study(self) -> str:
        return f"{self.name}-plan"

    def search_study(self, dataset: str) -> str:
        return f"{self.name}-{dataset}-{self.size}"

    def retrain_study(self, dataset: str) -> str:
        return f"{self.search_study(dataset)}-retrain"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def models_planned(self, dataset: str, queued: Mapping[str, Any] | None) -> int | None:
        """Retrain jobs planned for ``dataset``: known once its search's models are chosen."""
        if queued is None:
            return None
        return (len(queued.get("models", ())) + len(self.baselines)) * len(self.seeds)


def job_key(job: Mapping[str, Any]) -> tuple[str, int]:
    """What makes a job one: its model and its seed (a retry is the same job)."""
    return str(job["model"]), int(job["seed"])


# --- making and loading a plan ---------------------------------------------------------------------


def parse_datasets(text: str | None) -> tuple[str, ...]:
    """``--datasets all`` or ``a,b``: the flags, checked, in the paper's order where they are its."""
    if text is None or text.strip() == "all":
        return PAPER_DATASETS
    names = tuple(d.strip() for d in text.split(",") if d.strip())
    for name in names:
        if name not in DATASETS:
            close = did_you_mean(name, DATASETS)
            raise ValueError(f"--datasets: unknown dataset {name!r}" + (f" (did you mean {close!r}?)" if close
                             else "") + f"; give 'all' or some of {','.join(PAPER_DATASETS)}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"--datasets {text!r}: name each dataset once, e.g. adrenalmnist3d,vesselmnist3d")
    return names


def synthetic_shape(dataset: str, scale: float) -> dict[str, int]:
    """A synthetic stand-in of ``dataset``: its classes, and its train split scaled by ``scale`` (val
    and test are a quarter of train each, as the synthetic source makes them; at least 4 × classes)."""
    from medmnist import INFO

    info = INFO[dataset]
    classes = len(info["label"])
    return {"classes": classes, "samples": max(4 * classes, round(info["n_samples"]["train"] * scale))}


def search_config(plan: Plan, dataset: str) -> Any:
    """The search study's configuration: ``studies/<dataset>.toml`` (else the seed study's defaults)
    with the plan's name, size, budget, epochs and data; a synthetic stand-in searches on all of its
    (already small) splits, as the smoke study does: a quarter could miss a class."""
    from nas3d.config import resolve_study_config

    file = _STUDIES / f"{dataset}.toml"
    stand_in = plan.synthetic.get(dataset)
    flags = {"size": None if stand_in else plan.size, "name": plan.search_study(dataset),
             "n_trials": plan.n_trials, "max_epochs": plan.max_epochs, "data_root": plan.data_root}
    config = resolve_study_config(file if file.is_file() else None, dataset, flags)
    if stand_in is not None:  # the size with the dataset: a real flag takes 28 or 64 only
        config = config.with_overrides({
            "data.dataset": SYNTHETIC, "data.size": plan.size, "data.download": False,
            "data.search_fraction": 1.0,
            "data.synthetic_classes": stand_in["classes"], "data.synthetic_samples": stand_in["samples"],
        }, source=f"synthetic stand-in of {dataset}")
    return config


def make_plan(storage: Any, plan: Plan, *, artifacts: str | None = None) -> Plan:
    """Create ``plan`` in ``storage`` (or check the one there): its studies, the baselines' jobs, and
    the plan study last. Everything is checked (the data, the settings) before anything is written."""
    backend = make_storage(storage)
    existing = _recorded(backend, plan.plan_study)
    if existing is not None and existing != plan.to_dict():
        diff = next(k for k in plan.to_dict() if plan.to_dict()[k] != existing.get(k))
        raise ValueError(f"plan {plan.name!r} exists with {diff} = {existing.get(diff)!r}, not "
                         f"{plan.to_dict()[diff]!r}; drop the change, or give the new plan another --name")
    if plan.selection not in SELECTIONS:
        raise ValueError(f"--select {plan.selection!r}: choose one of {', '.join(SELECTIONS)}")
    configs = [search_config(plan, dataset) for dataset in plan.datasets]  # bad settings: nothing written
    for dataset, config in zip(plan.datasets, configs, strict=True):
        study = prepare_study(config, storage, artifacts=artifacts)
        study.set_user_attr(records.PLAN_OF, {"plan": plan.name, "dataset": dataset})
        retrain = optuna.create_study(study_name=plan.retrain_study(dataset), storage=backend,
                                      directions=list(JOB_DIRECTIONS), load_if_exists=True)
        retrain.set_user_attr(records.PLAN_OF, {"plan": plan.name, "dataset": dataset})
        retrain.set_user_attr(records.ARTIFACTS, study_artifact_location(backend, config.study.name))
        with warnings.catch_warnings():  # experimental since Optuna 3.2; the dashboard reads them
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retrain.set_metric_names(["test_auc", "flops"])
        baseline_jobs = [{"model": name, "kind": "baseline", "role": "baseline", "trial": None, "seed": seed}
                         for name in plan.baselines for seed in plan.seeds]
        with study_lock(storage, retrain.study_name):
            _queue(retrain, baseline_jobs)
    plan_study = optuna.create_study(study_name=plan.plan_study, storage=backend, load_if_exists=True)
    plan_study.set_user_attr(records.PLAN, plan.to_dict())
    return plan


def _recorded(backend: Any, name: str) -> dict[str, Any] | None:
    try:
        study_id = backend.get_study_id_from_name(name)
    except KeyError:
        return None
    return backend.get_study_user_attrs(study_id).get(records.PLAN)


def load_plan(storage: Any, name: str) -> Plan:
    """The plan ``name`` recorded in ``storage``; one line naming the plans there if it is not."""
    backend = make_storage(storage, must_exist=True)
    recorded = _recorded(backend, f"{name}-plan")
    if recorded is None:
        plans = [s.study_name.removesuffix("-plan") for s in backend.get_all_studies()
                 if records.PLAN in s.user_attrs]
        there = f"it holds {', '.join(map(repr, plans))}" if plans else "it holds none"
        raise LookupError(f"no reproduce plan named {name!r} in this storage ({there}); make it with "
                          "`nas3d reproduce --name NAME ...`")
    return Plan.from_dict(recorded)


def _queue(study: optuna.Study, jobs: list[dict[str, Any]]) -> int:
    """Queue the ``jobs`` not queued before (call it holding the study lock); returns how many."""
    known = {job_key(t.user_attrs[records.JOB]) for t in study.get_trials(deepcopy=False)
             if records.JOB in t.user_attrs}
    new = [job for job in jobs if job_key(job) not in known]
    for job in new:
        study.enqueue_trial({}, user_attrs={records.JOB: job})
    return len(new)


# --- choosing and queueing the searched models ---------------------------------------------------


def search_finished(study: optuna.Study, budget: int) -> bool:
    """No trial may start and none runs: the search is over."""
    state = budget_state(study)
    return state.spent(budget, DEFAULT_MAX_FREE_STREAK) and state.running == 0


def choose_models(plan: Plan, dataset: str, study: optuna.Study,
                  data: Any) -> tuple[list[dict[str, Any]], str]:
    """The front members to retrain by the plan's rule, as ``{"role", "trial"}``, and a note saying
    what was chosen (or why nothing)."""
    from nas3d.costs import measure_costs
    from nas3d.front import pareto_points
    from nas3d.seeds import seed_architectures

    front = sorted((p for p in pareto_points(study.get_trials(deepcopy=False)) if p.pareto),
                   key=lambda p: (-p.val_auc, p.flops, p.number))
    if not front:
        return [], f"search {study.study_name!r} trained nothing to the end: no searched model to retrain"
    best = front[0]
    chosen = [{"role": "best_val_auc", "trial": best.number}]
    note = f"trial {best.number}: best val AUC {best.val_auc:.4f} on the front of {len(front)}"
    seed = seed_architectures().get(dataset)
    if plan.selection == "best+seed" and seed is not None:
        target = measure_costs(seed, data.in_channels, data.num_classes, data.size, with_thop=False).flops
        near = min(front, key=lambda p: (abs(math.log(p.flops) - math.log(target)), p.number))
        if near.number != best.number:
            chosen.append({"role": "seed_flops", "trial": near.number})
        note += (f"; trial {near.number}: nearest the seed study's architecture ({target / 1e6:.1f} MFLOPs "
                 f"here) at {near.flops / 1e6:.1f} MFLOPs")
    return chosen, note


def queue_searched_jobs(plan: Plan, dataset: str, storage: Any, backend: Any) -> bool:
    """Once ``dataset``'s search has finished: choose its models and queue a job per model and seed,
    exactly once (under the retrain study's lock, marked by :data:`nas3d.records.JOBS_QUEUED`).
    Returns whether they are queued (now or before)."""
    retrain = optuna.load_study(study_name=plan.retrain_study(dataset), storage=backend)
    if records.JOBS_QUEUED in retrain.user_attrs:
        return True
    search, config = load_study(plan.search_study(dataset), backend)
    if not search_finished(search, config.study.n_trials):
        return False
    with study_lock(storage, retrain.study_name):
        if records.JOBS_QUEUED in retrain.user_attrs:  # another worker queued them first
            return True
        chosen, note = choose_models(plan, dataset, search, config.data)
        jobs = [{"model": f"trial{c['trial']}", "kind": "searched", "role": c["role"], "trial": c["trial"],
                 "seed": seed} for c in chosen for seed in plan.seeds]
        queued = _queue(retrain, jobs)
        retrain.set_user_attr(records.JOBS_QUEUED, {"models": chosen, "note": note})
    logger.info("%s: search finished; %s; %d retrain jobs queued", dataset, note, queued)
    return True


# --- where a dataset stands -------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetState:
    """One dataset's progress: its search's trials and its jobs, as ``--status`` and the table read them."""

    dataset: str
    budget: int
    trials_done: int  # search trials finished (complete or pruned: trained, or decided)
    trials_running: int
    search_done: bool
    queued: Mapping[str, Any] | None  # JOBS_QUEUED, once the searched models are chosen
    jobs: tuple[FrozenTrial, ...]  # every trial of the retrain study, retries included
    search_seconds: tuple[float, ...]  # durations of finished search trials
    job_seconds: tuple[float, ...]  # durations of completed jobs

    @property
    def jobs_by_key(self) -> dict[tuple[str, int], FrozenTrial]:
        """The latest attempt of each job."""
        latest: dict[tuple[str, int], FrozenTrial] = {}
        for trial in sorted(self.jobs, key=lambda t: t.number):
            if records.JOB in trial.user_attrs:
                latest[job_key(trial.user_attrs[records.JOB])] = trial
        return latest

    def count(self, *states: TrialState) -> int:
        return sum(t.state in states for t in self.jobs_by_key.values())

    @property
    def phase(self) -> str:
        if not self.search_done:
            return "searching"
        if self.queued is None or self.count(TrialState.WAITING, TrialState.RUNNING):
            return "retraining"
        return "done"


def _seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def dataset_state(plan: Plan, dataset: str, backend: Any) -> DatasetState:
    search, config = load_study(plan.search_study(dataset), backend)
    trials = search.get_trials(deepcopy=False)
    retrain_id = study_id_of(backend, plan.retrain_study(dataset))
    jobs = tuple(backend.get_all_trials(retrain_id, deepcopy=False))
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return DatasetState(
        dataset=dataset, budget=config.study.n_trials, trials_done=len(done),
        trials_running=sum(t.state == TrialState.RUNNING for t in trials),
        search_done=search_finished(search, config.study.n_trials),
        queued=backend.get_study_user_attrs(retrain_id).get(records.JOBS_QUEUED), jobs=jobs,
        search_seconds=tuple(s for t in done if (s := _seconds(t)) is not None),
        job_seconds=tuple(s for t in jobs
                          if t.state == TrialState.COMPLETE and (s := _seconds(t)) is not None),
    )
