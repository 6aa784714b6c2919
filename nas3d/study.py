# Long module: creating studies, the objective each trial runs and checkpoint export share one set of
# study records (config attr, trial attrs, artifacts); TrialObjective is the part to move out next.
"""Studies: creating and loading them, and the objective every worker runs on each trial.

A study is multi-objective: ``val_auc`` (maximise) and ``flops`` (minimise). Its resolved
configuration lives in the study's user attrs, so a worker needs only the study's name and storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import torch
from optuna.artifacts import upload_artifact
from optuna.trial import FrozenTrial, TrialState

from nas3d.architecture import Architecture, InfeasibleArchitecture
from nas3d.checkpoint import Checkpoint, checkpoint_data, load_checkpoint, save_checkpoint
from nas3d.config import StudyConfig
from nas3d.costs import Costs, measure_costs
from nas3d.data import DataShape, DeviceData, check_manifest_unchanged, prepare_data
from nas3d.early_stopping import EpochMonitor
from nas3d.model import build_model
from nas3d.pareto import EARLY_STOPPED_ATTR
from nas3d.proxies import proxy_batch, score_proxies
from nas3d.samplers import make_sampler
from nas3d.seeds import seed_architectures
from nas3d.space import params_for, sample_architecture
from nas3d.storages import (
    ARTIFACTS_ATTR,
    StorageSpec,
    StorageUnavailable,
    make_storage,
    prepare_artifact_location,
    resolve_artifact_location,
    resolve_storage,
)
from nas3d.train import device_name, train_trial
from nas3d.util import atomic_path, did_you_mean, one_line

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore

logger = logging.getLogger(__name__)

METRIC_NAMES = ("val_auc", "flops")
DIRECTIONS = ("maximize", "minimize")
CONFIG_ATTR = "nas3d_config"
# Copied from an earlier trial onto a duplicate of its architecture.
RESULT_ATTRS = ("val_acc", "params", "thop_macs", "train_seconds", "epochs", "best_epoch", "device")
#: Set on a trial that was decided without training (and so costs no budget): "duplicate",
#: "over_constraints", "infeasible" or "error" (it failed before its training began).
NOT_TRAINED_ATTR = "not_trained"
WORKERS_ATTR = "nas3d:workers"  # study system attr: how many worker numbers were handed out


class StudyNotFound(LookupError):
    """No study of that name in the storage."""


def create_study(
    config: StudyConfig, storage: optuna.storages.BaseStorage, *, artifacts: str | None = None
) -> optuna.Study:
    """Create the study ``config`` describes, or return it if it exists with the same configuration.

    ``artifacts`` (``--artifacts``): the study's artifact store, a folder or ``s3://bucket/prefix``
    (default: ``$NAS3D_ARTIFACTS``, else beside a SQLite file, else ``<home>/artifacts``). It is
    recorded in the study, checked reachable, and used by every worker and command of the study.
    Raises ``ValueError`` when a study of that name exists with a different configuration or artifact
    store (workers of one study must all train the same way and write to one place), for a relative
    folder given to a PostgreSQL study, and when the store cannot be reached.
    """
    location = resolve_artifact_location(artifacts, getattr(storage, "url", None))
    if artifacts is not None or _existing_location(storage, config.study.name) is None:
        prepare_artifact_location(location)  # before the study exists: a bad store creates nothing
    study = optuna.create_study(
        study_name=config.study.name,
        storage=storage,
        directions=list(DIRECTIONS),
        sampler=make_sampler(config.study, space=config.space, ode=config.ode),
        load_if_exists=True,
    )
    wanted = config.to_dict()
    existing = study.user_attrs.get(CONFIG_ATTR)
    if existing is not None:
        # Read back through the current dataclasses, so a setting added since the study was created
        # compares as its default instead of as a difference.
        existing = StudyConfig.from_dict(existing, source=f"study {config.study.name!r}").to_dict()
        if existing != wanted and _first_difference(existing, wanted).startswith("data.manifest_hash:"):
            raise ValueError(
                f"study {config.study.name!r} was created from other contents of manifest "
                f"{config.data.dataset} (its files' hash changed); restore them, or give a study of the new "
                "data another name (study.name / --name)"
            )
        if existing != wanted:
            raise ValueError(
                f"study {config.study.name!r} already exists with a different configuration "
                f"({_first_difference(existing, wanted)}); give the new one another name "
                "(study.name / --name) or drop the change"
            )
        recorded = study.user_attrs.get(ARTIFACTS_ATTR)
        if recorded is None:  # created before stores were recorded: record the one it used
            study.set_user_attr(ARTIFACTS_ATTR, location)
        elif artifacts is not None and recorded != location:
            raise ValueError(
                f"study {config.study.name!r} already exists with its artifacts in {recorded}, not "
                f"{location}; drop --artifacts, or give the new study another name (--name)"
            )
        return study
    study.set_user_attr(ARTIFACTS_ATTR, location)
    study.set_user_attr(CONFIG_ATTR, wanted)
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and what the dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(METRIC_NAMES))
    if config.study.warm_start == "seed":
        enqueue_seed_architectures(study, config)
    return study


def prepare_study(
    config: StudyConfig, storage: str | StorageSpec | None, *, artifacts: str | None = None
) -> optuna.Study:
    """Check what the study needs (its data, its storage), then create it (recording ``artifacts``,
    see :func:`create_study`), or check the existing one.

    The data is checked first (present, and readable as the configured dataset), so a missing or
    corrupt file never leaves an empty study behind, and nas3d never falls back to other data. A
    manifest's samples are all prepared (and cached), and the study records the manifest's absolute
    path, class names, channels and content hash (:func:`nas3d.data.prepare_data`).
    """
    config = dataclasses.replace(config, data=prepare_data(config.data))
    return create_study(config, make_storage(storage), artifacts=artifacts)


def _existing_location(storage: optuna.storages.BaseStorage, name: str) -> str | None:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id).get(ARTIFACTS_ATTR)


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for table in sorted(set(old) | set(new)):
        for key in sorted(set(old.get(table, {})) | set(new.get(table, {}))):
            before, after = old.get(table, {}).get(key), new.get(table, {}).get(key)
            if before != after:
                return f"{table}.{key}: stored {before!r}, asked {after!r}"
    return "unknown difference"


def enqueue_seed_architectures(study: optuna.Study, config: StudyConfig) -> int:
    """Queue the seed study's published architectures (those inside the space) as the first trials."""
    queued = 0
    for dataset, arch in seed_architectures().items():
        try:
            params = params_for(arch, config.space)
        except ValueError as e:
            logger.warning("warm start: skipping the %s seed architecture: %s", dataset, e)
            continue
        study.enqueue_trial(params, user_attrs={"warm_start": f"seed:{dataset}"}, skip_if_exists=True)
        queued += 1
    return queued


def load_study(
    name: str, storage: optuna.storages.BaseStorage, *, worker_number: int | None = None,
    check_data: bool = False,
) -> tuple[optuna.Study, StudyConfig]:
    """Load study ``name`` with its stored configuration.

    ``check_data``: refuse (:class:`nas3d.data.ManifestChanged`, one line) a study made from a manifest
    whose files here hash otherwise than when it was created: every worker must train on the same data.

    ``worker_number`` (a number no other worker of the study has, from
    :func:`allocate_worker_number`) seeds this worker's own sampler: workers with one seed would
    propose the same architectures in lockstep, and a restarted worker would replay its first life.
    """
    study_id = study_id_of(storage, name, fix="create it first with `nas3d create-study --study FILE` "
                                              "(or run `nas3d search`)")
    # Read only this study's attrs: summaries of every study would load every trial in the database.
    user_attrs = storage.get_study_user_attrs(study_id)
    if CONFIG_ATTR not in user_attrs:
        raise ValueError(f"study {name!r} was not created by nas3d (no {CONFIG_ATTR!r} user attr)")
    config = StudyConfig.from_dict(user_attrs[CONFIG_ATTR], source=f"study {name!r}")
    if check_data:
        check_manifest_unchanged(config.data)
    settings = config.study
    if settings.sampler_seed is not None and worker_number is not None:
        seed = int(np.random.SeedSequence([settings.sampler_seed, worker_number]).generate_state(1)[0])
        settings = dataclasses.replace(settings, sampler_seed=seed)
    study = optuna.load_study(
        study_name=name, storage=storage, sampler=make_sampler(settings, space=config.space, ode=config.ode)
    )
    return study, config


def study_id_of(storage: optuna.storages.BaseStorage, name: str, *, fix: str | None = None) -> int:
    """The id of study ``name``; else :class:`StudyNotFound`, one line naming the closest name, the
    studies there are and ``fix``."""
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        pass
    names = [s.study_name for s in storage.get_all_studies()]
    close = did_you_mean(name, names)
    there = (f"did you mean {close!r}? " if close else "") + (
        f"it holds {', '.join(map(repr, names[:10]))}{' ...' if len(names) > 10 else ''}" if names
        else "it holds no studies")
    fix = fix or ("`nas3d status` lists them (is --storage / $NAS3D_STORAGE the one the workers used?)")
    raise StudyNotFound(f"no study named {name!r} in this storage ({there}); {fix}")


def allocate_worker_number(study: optuna.Study) -> int:
    """The next worker number of ``study`` (0, 1, 2, ... over the study's life, never reused).

    Call it holding the study lock: the read and the write must not interleave with another worker's.
    """
    storage, study_id = study._storage, study._study_id
    number = int(storage.get_study_system_attrs(study_id).get(WORKERS_ATTR, 0))
    storage.set_study_system_attr(study_id, WORKERS_ATTR, number + 1)
    return number


def record_constraints(trial: optuna.trial.Trial, values: Mapping[str, float]) -> None:
    """Record constraint values (feasible iff all <= 0) where both samplers and the dashboard see them.

    Optuna 5 samplers read ``trial.constraints``, which merges the legacy list under system attr
    ``"constraints"`` with the per-name ``"constraints:<name>"`` keys of ``Trial.set_constraint``;
    optuna-dashboard 0.21 shows only the legacy list. So we write the list alone (in ``values``
    order; writing both formats would count every constraint twice). Call once per trial, before
    the objective returns.
    """
    vals = [float(v) for v in values.values()]
    if any(v != v for v in vals):
        raise ValueError(f"constraint values must not be NaN, got {dict(values)}")
    # No public setter for system attrs exists in Optuna 5; this is what Optuna itself does
    # for samplers' constraints_func (optuna.samplers._base._process_constraints_after_trial).
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", vals)


@dataclasses.dataclass(frozen=True)
class ClaimedArchitecture:
    """A trial's architecture once it is decided that it trains: sampled, recorded, new to the study
    and within its constraints, with its costs measured."""

    arch: Architecture
    costs: Costs


class TrialObjective:
    """Sample, deduplicate, cost, train and record one trial; returns ``(val_auc, flops)``.

    Failures are never disguised as scores: an infeasible or over-budget architecture, or a duplicate of
    one already evaluated (or being evaluated), is PRUNED without training and marked
    ``not_trained``; a training failure (out of memory, non-finite loss, any exception) FAILS; each
    with ``failure_reason`` set.

    A call does it all. A worker runs the parts apart: :meth:`claim` (sample, record the hash and
    deduplicate, under the study lock, so no other worker can claim the same architecture meanwhile),
    :meth:`cost` (costs and constraints, after the lock is released) and :meth:`train`.
    ``should_stop`` is polled between training batches (a worker's stop signal); when it returns
    true training raises :class:`nas3d.train.TrainingStopped`.
    """

    def __init__(
        self,
        config: StudyConfig,
        data: DeviceData | DataShape,
        device: torch.device | str,
        artifact_store: ArtifactStore | None = None,
        *,
        progress: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        # Claiming needs the data's shape only (a claim process has no samples); training needs the data.
        self.data = data if isinstance(data, DeviceData) else None
        self.shape = data.shape if isinstance(data, DeviceData) else data
        self.device = torch.device(device)
        self.artifact_store = artifact_store
        self.progress = progress
        self.should_stop = should_stop
        self.trainings = 0  # how many trials this objective actually trained
        self.epochs_trained = 0  # epochs those trainings ran, stopped ones included

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        return self.train(trial, self.cost(trial, self.claim(trial)))

    def claim(self, trial: optuna.Trial) -> Architecture:
        """Sample ``trial``'s architecture, record it and its hash, and decide whether it is new.

        Raises ``optuna.TrialPruned`` for a trial decided without training (``not_trained`` and
        ``failure_reason`` set); any other error is recorded on the trial (``not_trained = "error"``:
        it costs no budget) and raised. :meth:`cost` does the same.
        """
        with self._recording_failures(trial, trained=False):
            return self._claim(trial)

    def cost(self, trial: optuna.Trial, arch: Architecture) -> ClaimedArchitecture:
        """Measure a claimed architecture's costs, record them, and check the study's constraints."""
        with self._recording_failures(trial, trained=False):
            return self._cost(trial, arch)

    def train(self, trial: optuna.Trial, claimed: ClaimedArchitecture) -> tuple[float, float]:
        """Train a claimed trial and record its results; ``(val_auc, flops)``. A trial the early stopper
        ends raises ``optuna.TrialPruned``; any other error is recorded on the trial and raised."""
        with self._recording_failures(trial, trained=True):
            return self._train(trial, claimed)

    @contextlib.contextmanager
    def _recording_failures(self, trial: optuna.Trial, *, trained: bool) -> Iterator[None]:
        try:
            yield
        except (optuna.TrialPruned, StorageUnavailable):
            raise  # a lost database: writing the reason would only wait out the retry window again
        except Exception as e:
            # Whatever broke, the trial says why (Optuna keeps only a log line otherwise). Best effort:
            # the trial may already be finished (failed as stale by another worker).
            with contextlib.suppress(Exception):
                trial.set_user_attr("failure_reason", f"{type(e).__name__}: {e}")
                if not trained:  # it never reached training: it costs no budget
                    trial.set_user_attr(NOT_TRAINED_ATTR, "error")
            raise

    def _not_trained(self, trial: optuna.Trial, kind: str, reason: str) -> optuna.TrialPruned:
        trial.set_user_attr(NOT_TRAINED_ATTR, kind)
        trial.set_user_attr("failure_reason", reason)
        return optuna.TrialPruned(reason)

    def _claim(self, trial: optuna.Trial) -> Architecture:
        try:
            arch = sample_architecture(trial, self.config.space)
        except InfeasibleArchitecture as e:
            raise self._not_trained(trial, "infeasible", f"infeasible: {e.reason}") from None
        arch_hash = arch.arch_hash()
        trial.set_user_attr("arch", arch.short_str())
        trial.set_user_attr("arch_json", arch.to_json())
        trial.set_user_attr("arch_hash", arch_hash)

        earlier = self._earlier_evaluation(trial, arch_hash)
        if earlier is not None:
            # Recorded, not trained, and PRUNED rather than COMPLETE with copied values: a copy of a
            # good trial would count as fresh evidence for it, and TPE would propose it again and
            # again (bench/storage_overhead.py saw 376 duplicates per 8 new architectures that way).
            trial.set_user_attr("duplicate_of", earlier.number)
            if earlier.state == TrialState.COMPLETE:
                trial.set_user_attr("duplicate_values", earlier.values)
                for key in RESULT_ATTRS:
                    if key in earlier.user_attrs:
                        trial.set_user_attr(key, earlier.user_attrs[key])
                reason = f"duplicate of trial {earlier.number} (the same architecture); not trained again"
            elif earlier.state == TrialState.PRUNED:
                reason = (f"duplicate of trial {earlier.number}, which the early stopper ended (the same "
                          "architecture); not trained again")
            else:
                # Waiting for it would idle this device for a whole training run; its result (or, if
                # its worker dies, its retry's) is the one this architecture gets.
                reason = (f"duplicate of trial {earlier.number}, which is training the same architecture; "
                          "not trained again")
            raise self._not_trained(trial, "duplicate", reason)
        return arch

    def _cost(self, trial: optuna.Trial, arch: Architecture) -> ClaimedArchitecture:
        shape = self.shape
        costs = measure_costs(arch, shape.in_channels, shape.num_classes, shape.size)
        trial.set_user_attr("params", costs.params)
        trial.set_user_attr("thop_macs", costs.thop_macs)
        limits = self.config.constraints
        if limits.active:
            values = limits.evaluate(flops=costs.flops, params=costs.params)
            record_constraints(trial, values)
            broken = {k: v for k, v in values.items() if v > 0}
            if broken:
                reason = "over budget: " + ", ".join(
                    f"{k} {getattr(costs, k):.4g} > max_{k} {getattr(limits, 'max_' + k):.4g}" for k in broken
                )
                raise self._not_trained(trial, "over_constraints", reason)
        return ClaimedArchitecture(arch, costs)

    def _train(self, trial: optuna.Trial, claimed: ClaimedArchitecture) -> tuple[float, float]:
        arch, costs, data = claimed.arch, claimed.costs, self.data
        if data is None:
            raise ValueError("this objective was made with a data shape only: it can claim, not train")
        trial.set_user_attr("device", device_name(self.device))
        # Seed before the model is built: its initial weights come from the global generator, so a
        # trial and its retry (or the same architecture in another worker) start from the same weights.
        torch.manual_seed(self.config.train.seed)
        model = build_model(arch, data.in_channels, data.num_classes).to(self.device)
        self.trainings += 1
        self._record_proxies(trial, model)
        # Records the learning curve every epoch and runs the [early_stopping] stopper at its rungs.
        monitor = EpochMonitor(trial, self.config.early_stopping, self.config.train.max_epochs, costs.flops)
        result = train_trial(model, data, self.config.train, self.device, progress=self.progress,
                             on_epoch=monitor, should_stop=self.should_stop)
        self.epochs_trained += result.epochs_run
        trial.set_user_attr("val_acc", result.val_acc)
        trial.set_user_attr("train_seconds", round(result.train_seconds, 3))
        trial.set_user_attr("epochs", result.epochs_run)
        trial.set_user_attr("best_epoch", result.best_epoch)
        if result.stopped_early:
            monitor.stop(result)  # PRUNED with the reason and the partial values; no checkpoint
        if self.artifact_store is not None:
            self._store_checkpoint(trial, model, result.val_auc, result.val_acc, costs.flops)
        return result.val_auc, float(costs.flops)

    def _record_proxies(self, trial: optuna.Trial, model: torch.nn.Module) -> None:
        """Zero-cost proxy scores of the untrained ``model`` (user attr ``proxies``; a non-finite score
        is recorded as None) and the seconds they took (``proxy_seconds``). They work on copies, so
        the model trains from the same weights as without them."""
        images, labels = proxy_batch(self.data.train)
        scores, seconds = score_proxies(model, images, labels)
        trial.set_user_attr("proxies", {k: v if np.isfinite(v) else None for k, v in scores.items()})
        trial.set_user_attr("proxy_seconds", round(sum(seconds.values()), 3))

    def _earlier_evaluation(self, trial: optuna.Trial, arch_hash: str) -> FrozenTrial | None:
        """The trial that trained (COMPLETE), is training (RUNNING) or was stopped early at a rung
        (PRUNED, ``early_stopped``) with this architecture, if any.

        RUNNING trials count because concurrent workers would otherwise train one architecture at the
        same time; the worker holds the study lock from ``ask`` to the claim, so every RUNNING trial
        it sees has its hash and its verdict recorded already. A stopped architecture is not trained
        again: training is seeded, so it would follow the same curve to the same rung.
        """
        states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
        matches = [
            other for other in trial.study.get_trials(deepcopy=False, states=states)
            if other.user_attrs.get("arch_hash") == arch_hash and other.number != trial.number
            and NOT_TRAINED_ATTR not in other.user_attrs and "duplicate_of" not in other.user_attrs
            and (other.state != TrialState.PRUNED or other.user_attrs.get(EARLY_STOPPED_ATTR, False))
        ]
        order = {TrialState.COMPLETE: 0, TrialState.RUNNING: 1, TrialState.PRUNED: 2}
        matches.sort(key=lambda t: (order[t.state], t.number))
        return matches[0] if matches else None

    def _store_checkpoint(
        self, trial: optuna.Trial, model: torch.nn.Module, val_auc: float, val_acc: float, flops: int
    ) -> None:
        metadata = {
            "study": trial.study.study_name,
            "trial": trial.number,
            "dataset": self.data.name,
            **checkpoint_data(self.config.data),  # what `nas3d retrain` loads, what `nas3d predict` does
            "metrics": {"val_auc": val_auc, "val_acc": val_acc, "flops": flops},
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"trial-{trial.number}.pt"
            save_checkpoint(path, model, model.arch, in_channels=self.data.in_channels,
                            num_classes=self.data.num_classes, input_size=self.data.size, metadata=metadata)
            artifact_id = upload_artifact(
                artifact_store=self.artifact_store, file_path=str(path), study_or_trial=trial
            )
            picture_id = _upload_picture(self.artifact_store, trial, model.arch, Path(tmp))
        trial.set_user_attr("checkpoint_artifact", artifact_id)
        if picture_id is not None:
            trial.set_user_attr("picture_artifact", picture_id)


def _upload_picture(artifact_store: Any, trial: optuna.Trial, arch: Any, folder: Path) -> str | None:
    """Upload the architecture's picture beside its checkpoint; None (and a warning) without Graphviz's
    ``dot`` or when it fails: a missing picture must not fail a trained trial."""
    from subprocess import CalledProcessError

    from graphviz import ExecutableNotFound

    from nas3d.drawing import PICTURE_SUFFIX, write_picture

    try:
        path = write_picture(arch, folder / f"trial-{trial.number}{PICTURE_SUFFIX}",
                             title=f"{trial.study.study_name} trial {trial.number}")
    except ExecutableNotFound:
        logger.warning("no architecture picture for trial %d: Graphviz's `dot` is not installed "
                       "(apt-get install graphviz)", trial.number)
        return None
    except CalledProcessError as e:  # e.g. a Graphviz without its layout plugins (`dot -c` not run)
        stderr = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        logger.warning("no architecture picture for trial %d: Graphviz's `dot` failed: %s", trial.number,
                       stderr[0] if stderr else f"exit status {e.returncode}")
        return None
    return upload_artifact(artifact_store=artifact_store, file_path=str(path), study_or_trial=trial)


def load_trial(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> FrozenTrial:
    """Trial ``number`` of study ``study_name``; one-line ``LookupError`` naming what exists."""
    study_id = study_id_of(storage, study_name)
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    except KeyError:
        count = len(storage.get_all_trials(study_id, deepcopy=False))
        numbers = f"numbered 0 to {count - 1}" if count else "none yet"
        raise LookupError(f"study {study_name!r} has no trial {number} (its trials: {numbers})") from None
    return storage.get_trial(trial_id)


def _no_checkpoint_reason(trial: FrozenTrial) -> str:
    state = trial.state.name.lower()
    attrs = trial.user_attrs
    if trial.state in (TrialState.RUNNING, TrialState.WAITING):
        return f"it is {state}; export it once it completes"
    if trial.state == TrialState.COMPLETE:
        return "it completed without one (its worker had no artifact store)"
    verb = {"PRUNED": "was pruned", "FAIL": "failed"}.get(trial.state.name, f"is {state}")
    reason = f"it {verb} ({one_line(attrs.get('failure_reason', 'no reason recorded'))})"
    if "duplicate_of" in attrs:
        reason += f"; export trial {attrs['duplicate_of']}, which trained this architecture"
    return reason


def export_checkpoint(
    storage: optuna.storages.BaseStorage | StorageSpec | str | None,
    artifact_store: Any,
    study_name: str,
    number: int,
    out: str | Path,
    *,
    overwrite: bool = False,
    picture: bool = False,
) -> tuple[FrozenTrial, Checkpoint]:
    """Copy trial ``number``'s checkpoint out of the artifact store to ``out``; returns the trial and
    the checkpoint as loaded back. The file appears whole or not at all, and an existing ``out`` is
    replaced only with ``overwrite`` and only by a file that loads and is that trial's architecture.
    With ``picture``, the architecture's picture goes beside it (``out`` with suffix ``.svg``).

    ``storage`` may be a storage string or spec, opened read-only (it must exist); ``artifact_store``
    None means the one that goes with it."""
    from optuna.artifacts import download_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound

    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file path, e.g. {out / f'trial-{number}.pt'}")
    for path in (out, out.with_suffix(".svg")) if picture else (out,):
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists; pass --force to overwrite it, or choose another --out")
    if not isinstance(storage, optuna.storages.BaseStorage):
        from nas3d.storages import artifact_store_for

        spec = resolve_storage(storage)
        storage = make_storage(spec, must_exist=True)
        artifact_store = artifact_store if artifact_store is not None else artifact_store_for(spec)
    trial = load_trial(storage, study_name, number)
    artifact_id = trial.user_attrs.get("checkpoint_artifact")
    if artifact_id is None:
        raise LookupError(f"trial {trial.number} of study {study_name!r} has no checkpoint: "
                          + _no_checkpoint_reason(trial))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out) as partial:
            download_artifact(artifact_store=artifact_store, file_path=str(partial), artifact_id=artifact_id)
            checkpoint = load_checkpoint(partial)  # only a file that loads replaces ``out``
            _check_identity(checkpoint, trial, study_name)
    except ArtifactNotFound:
        raise LookupError(
            f"trial {trial.number}'s checkpoint (artifact {artifact_id}) is not in the artifact store "
            f"{getattr(artifact_store, '_base_path', '?')}; point $NAS3D_ARTIFACTS at the folder the "
            "workers wrote to"
        ) from None
    if picture and checkpoint.architecture is not None:
        from nas3d.drawing import PICTURE_SUFFIX, write_picture

        write_picture(checkpoint.architecture, out.with_suffix(PICTURE_SUFFIX),
                      title=f"{study_name} trial {trial.number}")
    return trial, checkpoint


def _check_identity(checkpoint: Checkpoint, trial: FrozenTrial, study_name: str) -> None:
    """Refuse a stored checkpoint that is not this trial's: another trial's file, or another architecture."""
    recorded = (checkpoint.metadata.get("study"), checkpoint.metadata.get("trial"))
    if recorded != (study_name, trial.number):
        raise ValueError(f"the checkpoint stored for trial {trial.number} of study {study_name!r} records "
                         f"study {recorded[0]!r} trial {recorded[1]!r}; the artifact store is mixed up")
    arch = checkpoint.architecture
    if arch is None or arch.arch_hash() != trial.user_attrs.get("arch_hash"):
        raise ValueError(f"the checkpoint stored for trial {trial.number} of study {study_name!r} holds "
                         f"{checkpoint.recipe.describe()}, not the trial's {trial.user_attrs.get('arch')}")
