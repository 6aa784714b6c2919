"""The objective every worker runs on each trial: sample, deduplicate, cost, train and record.

A trial decided without training (a duplicate of an architecture already evaluated, one over the
study's constraints, an infeasible one) is PRUNED and marked ``not_trained``; a training failure FAILS;
each with ``failure_reason``. A trained trial's checkpoint (and the architecture's picture, where
Graphviz's ``dot`` is installed) goes into the study's artifact store; where the store refuses it, the
trial still completes with its scores, marked ``checkpoint_missing`` with the store's error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import torch
from optuna.artifacts import upload_artifact
from optuna.trial import FrozenTrial, TrialState

from nas3d import records
from nas3d.architecture import Architecture, InfeasibleArchitecture
from nas3d.checkpoint import checkpoint_data, save_checkpoint
from nas3d.config import StudyConfig
from nas3d.costs import Costs, measure_costs
from nas3d.cv import CrossValidation, standard_error
from nas3d.data import DataShape, DeviceData
from nas3d.early_stopping import EpochMonitor
from nas3d.metrics import bootstrap_interval
from nas3d.model import build_model
from nas3d.proxies import proxy_batch, score_proxies
from nas3d.racing import FoldRace
from nas3d.space import sample_architecture
from nas3d.storages import StorageUnavailable, artifact_write_errors, describe_artifact_store
from nas3d.study import record_constraints
from nas3d.train import TrainResult, device_name, predict, train_trial
from nas3d.util import one_line

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore

logger = logging.getLogger(__name__)

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
        # Checkpoints the artifact store refused since it last took one, and the last refusal (one
        # line): a worker stops once the store keeps failing (nas3d.worker).
        self.store_failures_in_row = 0
        self.store_failure: str | None = None
        self.epochs_trained = 0  # epochs those trainings ran, stopped ones included
        self._folds: CrossValidation | None = None  # data.cv_folds > 1: built at the first training

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
                # "error" where it never reached training: then it costs no budget
                records.fail_with_reason(trial, f"{type(e).__name__}: {e}",
                                         not_trained=None if trained else "error")
            raise

    def _not_trained(self, trial: optuna.Trial, kind: str, reason: str) -> optuna.TrialPruned:
        records.fail_with_reason(trial, reason, not_trained=kind)
        return optuna.TrialPruned(reason)

    def _claim(self, trial: optuna.Trial) -> Architecture:
        try:
            arch = sample_architecture(trial, self.config.space)
        except InfeasibleArchitecture as e:
            raise self._not_trained(trial, "infeasible", f"infeasible: {e.reason}") from None
        arch_hash = arch.arch_hash()
        trial.set_user_attr(records.ARCH, arch.short_str())
        trial.set_user_attr(records.ARCH_JSON, arch.to_json())
        trial.set_user_attr(records.ARCH_HASH, arch_hash)

        earlier = self._earlier_evaluation(trial, arch_hash)
        if earlier is not None:
            # Recorded, not trained, and PRUNED rather than COMPLETE with copied values: a copy of a
            # good trial would count as fresh evidence for it, and TPE would propose it again and
            # again (bench/storage_overhead.py saw 376 duplicates per 8 new architectures that way).
            trial.set_user_attr(records.DUPLICATE_OF, earlier.number)
            if earlier.state == TrialState.COMPLETE:
                trial.set_user_attr(records.DUPLICATE_VALUES, earlier.values)
                for key in records.RESULT_ATTRS:
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
        trial.set_user_attr(records.PARAMS, costs.params)
        trial.set_user_attr(records.THOP_MACS, costs.thop_macs)
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
        trial.set_user_attr(records.DEVICE, device_name(self.device))
        self.trainings += 1
        k, trained = self.config.data.cv_folds, self.config.data.trained_folds
        folds = self._cross_validation(trial.study) if k > 1 else None
        racing = self.config.racing
        race = FoldRace(trial, racing, trained, costs.flops) if racing.active else None
        runs: list[TrainResult] = []
        best_model, best_fold = None, 0
        for fold in range(trained):
            # Fold i trains with seed train.seed + i: averaged over folds, the score averages the seed's
            # noise as well as the split's. Fold 0 (and a study without folds) trains as before.
            train_config = self.config.train if fold == 0 else dataclasses.replace(
                self.config.train, seed=self.config.train.seed + fold)
            # Seed before the model is built: its initial weights come from the global generator, so a
            # trial and its retry (or the same architecture in another worker) start from the same weights.
            torch.manual_seed(train_config.seed)
            model = build_model(arch, data.in_channels, data.num_classes).to(self.device)
            # Proxies are off unless asked for (31-36 s a trial at 64³ on a CPU); of the first model only.
            if fold == 0 and self.config.study.proxies:
                self._record_proxies(trial, model)
            # Records the learning curve every epoch and runs the [early_stopping] stopper at its rungs;
            # under cross-validation for the first fold only: MO-ASHA compares first folds with first folds.
            monitor = EpochMonitor(trial, self.config.early_stopping, train_config.max_epochs, costs.flops) \
                if fold == 0 else None
            fold_data = data if folds is None else folds.fold(fold)
            result = train_trial(model, fold_data, train_config, self.device, progress=self.progress,
                                 on_epoch=monitor, should_stop=self.should_stop)
            self.epochs_trained += result.epochs_run
            runs.append(result)
            if result.val_auc > runs[best_fold].val_auc or best_model is None:
                best_model, best_fold = model, fold
            self._record_runs(trial, runs, best_fold, cross_validated=folds is not None)
            if result.stopped_early:
                monitor.stop(result)  # PRUNED with the reason and the partial values; no checkpoint
            if race is not None:
                race.after_fold([r.val_auc for r in runs])  # PRUNED when dominated, its folds so far kept
        best = runs[best_fold]
        if folds is None or len(runs) == 1:  # one model (a hold-out fold too): the bootstrap interval
            self._record_val_interval(trial, best_model, data if folds is None else folds.fold(best_fold))
        fold_record = None if folds is None else {
            "best": best_fold, "k": k, "seed": self.config.data.cv_seed, "hash": folds.fingerprint,
            "val_auc": [r.val_auc for r in runs]}
        if self.artifact_store is not None:
            self._store_checkpoint(trial, best_model, best.val_auc, best.val_acc, costs.flops,
                                   fold=fold_record)
        val_auc = best.val_auc if folds is None else float(np.mean([r.val_auc for r in runs]))
        return val_auc, float(costs.flops)

    def _record_runs(self, trial: optuna.Trial, runs: list[TrainResult], best_fold: int, *,
                     cross_validated: bool) -> None:
        """What the trial records of its training so far: one run's numbers, or under cross-validation the
        folds' (``fold_val_auc``, ``fold_val_acc``, ``val_auc_se``; val ACC their mean, seconds and epochs
        their sums, the best epoch and ``best_fold`` those of the fold with the best val AUC)."""
        aucs, accs = [r.val_auc for r in runs], [r.val_acc for r in runs]
        trial.set_user_attr(records.VAL_ACC, float(np.mean(accs)) if cross_validated else accs[0])
        trial.set_user_attr(records.TRAIN_SECONDS, round(sum(r.train_seconds for r in runs), 3))
        trial.set_user_attr(records.EPOCHS, sum(r.epochs_run for r in runs))
        trial.set_user_attr(records.BEST_EPOCH, runs[best_fold].best_epoch)
        if cross_validated:
            trial.set_user_attr(records.FOLD_VAL_AUC, aucs)
            trial.set_user_attr(records.FOLD_VAL_ACC, accs)
            trial.set_user_attr(records.VAL_AUC_SE, standard_error(aucs))
            trial.set_user_attr(records.BEST_FOLD, best_fold)

    def _record_val_interval(self, trial: optuna.Trial, model: torch.nn.Module, data: DeviceData) -> None:
        """``val_auc_ci``: the 95 % BCa bootstrap interval of the kept epoch's val AUC over the val samples
        (nas3d.metrics.bootstrap_interval). Computed here, from one more pass over the val split, rather
        than storing the per-sample scores for later: status and report then read two numbers, and the
        trial's record stays small. None where the resamples leave it undefined."""
        train = self.config.train
        scores, _ = predict(model, data.val, self.device, train.batch_size, channels_last=train.channels_last)
        low, high = bootstrap_interval(data.val.labels.cpu().numpy(), [scores], data.task)
        trial.set_user_attr(records.VAL_AUC_CI, None if math.isnan(low) else [low, high])

    def _cross_validation(self, study: optuna.Study) -> CrossValidation:
        """This process's folds (built once), checked against the study's: the first worker to train
        records their fingerprint (``nas3d_cv_folds``), and a worker whose folds differ refuses to train."""
        if self._folds is None:
            data = self.config.data
            folds = CrossValidation.of(self.data, data.cv_folds, data.cv_seed)
            recorded = study.user_attrs.get(records.CV_FOLDS)
            if recorded is None:
                study.set_user_attr(records.CV_FOLDS, folds.fingerprint)
            elif recorded != folds.fingerprint:
                raise ValueError(
                    f"this worker's {data.cv_folds} folds (hash {folds.fingerprint}) differ from the ones "
                    f"the study recorded (hash {recorded}): its data (or scikit-learn's fold split) differs "
                    "from the first worker's; give every worker the same data and nas3d environment")
            self._folds = folds
        return self._folds

    def _record_proxies(self, trial: optuna.Trial, model: torch.nn.Module) -> None:
        """Zero-cost proxy scores of the untrained ``model`` (user attr ``proxies``; a non-finite score
        is recorded as None) and the seconds they took (``proxy_seconds``). They work on copies, so
        the model trains from the same weights as without them."""
        images, labels = proxy_batch(self.data.train)
        scores, seconds = score_proxies(model, images, labels)
        trial.set_user_attr(records.PROXIES, {k: v if np.isfinite(v) else None for k, v in scores.items()})
        trial.set_user_attr(records.PROXY_SECONDS, round(sum(seconds.values()), 3))

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
            if other.user_attrs.get(records.ARCH_HASH) == arch_hash and other.number != trial.number
            and records.NOT_TRAINED not in other.user_attrs and records.DUPLICATE_OF not in other.user_attrs
            and (other.state != TrialState.PRUNED or other.user_attrs.get(records.EARLY_STOPPED, False))
        ]
        order = {TrialState.COMPLETE: 0, TrialState.RUNNING: 1, TrialState.PRUNED: 2}
        matches.sort(key=lambda t: (order[t.state], t.number))
        return matches[0] if matches else None

    def _store_checkpoint(
        self, trial: optuna.Trial, model: torch.nn.Module, val_auc: float, val_acc: float, flops: int,
        fold: dict[str, Any] | None = None,
    ) -> None:
        metadata = {
            "study": trial.study.study_name,
            "trial": trial.number,
            "dataset": self.data.name,
            **checkpoint_data(self.config.data),  # what `nas3d retrain` loads, what `nas3d predict` does
            "metrics": {"val_auc": val_auc, "val_acc": val_acc, "flops": flops},
            # cross-validated: the model is the best fold's ("best", 0-based), its metrics that fold's
            **({"fold": fold} if fold is not None else {}),
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"trial-{trial.number}.pt"
            save_checkpoint(path, model, model.arch, in_channels=self.data.in_channels,
                            num_classes=self.data.num_classes, input_size=self.data.size, metadata=metadata)
            try:
                artifact_id = upload_artifact(
                    artifact_store=self.artifact_store, file_path=str(path), study_or_trial=trial
                )
            except artifact_write_errors() as e:
                # The store's fault, not the trial's: the training (the expensive part) stands, and
                # its architecture is recorded, so retraining it recovers the weights.
                self.store_failure = (f"the artifact store {describe_artifact_store(self.artifact_store)} "
                                      f"refused trial {trial.number}'s checkpoint: {one_line(e)}")
                self.store_failures_in_row += 1
                trial.set_user_attr(records.CHECKPOINT_MISSING, self.store_failure)
                logger.warning("trial %d keeps its scores without a checkpoint: %s", trial.number,
                               self.store_failure)
                return
            self.store_failures_in_row = 0
            picture_id = _upload_picture(self.artifact_store, trial, model.arch, Path(tmp))
        trial.set_user_attr(records.CHECKPOINT_ARTIFACT, artifact_id)
        if picture_id is not None:
            trial.set_user_attr(records.PICTURE_ARTIFACT, picture_id)


#: Why pictures could not be drawn, each warned about once per process (a search would repeat it per trial).
_PICTURE_WARNINGS: set[str] = set()


def _upload_picture(artifact_store: Any, trial: optuna.Trial, arch: Any, folder: Path) -> str | None:
    """Upload the architecture's picture beside its checkpoint; None without Graphviz's ``dot`` or when
    it fails (warned once per process and reason): a missing picture must not fail a trained trial."""
    from nas3d.drawing import PICTURE_SUFFIX, PictureUnavailable, write_picture

    try:
        path = write_picture(arch, folder / f"trial-{trial.number}{PICTURE_SUFFIX}",
                             title=f"{trial.study.study_name} trial {trial.number}")
    except PictureUnavailable as e:
        if str(e) not in _PICTURE_WARNINGS:
            _PICTURE_WARNINGS.add(str(e))
            logger.warning("no architecture picture for trial %d, nor for this process's later trials (their "
                           "checkpoints are kept): %s", trial.number, e)
        return None
    try:
        return upload_artifact(artifact_store=artifact_store, file_path=str(path), study_or_trial=trial)
    except artifact_write_errors() as e:
        logger.warning("no architecture picture for trial %d (its checkpoint is kept): %s", trial.number,
                       one_line(e))
        return None
