"""Early stopping across trials: learning curves, and a multi-objective ASHA stopper (MO-ASHA).

Optuna refuses ``trial.report`` in multi-objective studies and its pruners exclude them. nas3d needs
less than a general pruner: FLOPs are known exactly before a trial trains, so only validation AUC is
uncertain while it runs. This module implements the asynchronous successive-halving stopper of
Schmucker et al. (2021, "Multi-objective asynchronous successive halving"), in its stopping form:

- **Rungs** sit at epochs ``min_epochs * eta**k`` below ``train.max_epochs`` (:func:`rung_epochs`).
- A trial that finishes a rung's epoch records its **rung value**: the best validation AUC it has
  reached so far (the trial's score is its best epoch, so this is the score it would report if it
  stopped here), paired with its FLOPs.
- It then **continues only if it is in the top** ``floor(n / eta)`` of the ``n`` trials that have
  reached that rung so far (itself included), ranked by non-dominated sorting on (rung AUC, max; FLOPs,
  min). Whole fronts are taken while they fit; inside the front that does not fit whole, the
  tie-break is **crowding distance** (NSGA-II's, on AUC and log10 FLOPs, the axes of the hypervolume
  in :mod:`nas3d.pareto`): the trials that spread the front most go on. Identical points get the same
  distance, and a trial tied with the last one taken also continues, so a decision never depends on
  the order in which trials arrived or which worker computes it. With fewer than ``eta`` trials at
  the rung there is no top ``1/eta`` to be in, and the trial continues.
- **Across workers and hosts** the rung state is the study storage itself: every trial writes its
  learning curve (user attr ``learning_curve``) after each epoch, before it reads the other trials'
  curves at a rung. Of two trials reaching a rung at once, at least the later writer sees the other:
  no rung value is lost, and each trial decides each rung once, recording the decision (user attr
  ``early_stopping``) with the trials it was compared with.
- It composes with the per-trial patience stop of :func:`nas3d.train.train_trial`: a trial that
  patience ends at a rung's epoch has finished its training and is not judged there (its rung value
  still counts for the trials after it).

A stopped trial is recorded PRUNED (see :meth:`EpochMonitor.stop`), so the front, ``status``,
export and hypervolumes hold fully trained trials only while the sampler still sees the
architecture among its poor ("above") trials.

Peers at a rung are RUNNING, COMPLETE and PRUNED trials with a learning curve that long; FAILed
trials (diverged or interrupted; an interrupted one is re-queued and measured again) and duplicates
(which never train) are not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import moocore
import numpy as np

from nas3d import records
from nas3d.pareto import crowding_distances
from nas3d.train import EpochRecord, TrainResult
from nas3d.util import check_choice

__all__ = [
    "CURVE_KEYS",
    "OPTIONAL_CURVE_KEYS",
    "KINDS",
    "Decision",
    "EarlyStoppingConfig",
    "EpochMonitor",
    "RungEntry",
    "crowding_distances",
    "decide",
    "format_learning_curve",
    "learning_curve",
    "rung_epochs",
]

KINDS = ("none", "moasha")
#: The keys of the recorded curve (:data:`nas3d.records.CURVE`): one entry per epoch trained.
CURVE_KEYS = ("epoch", "train_loss", "val_loss", "val_auc", "val_acc")
#: Recorded beside CURVE_KEYS where the epoch has them (nas3d.train.EpochRecord's optional fields).
OPTIONAL_CURVE_KEYS = ("seconds", "full_val_auc", "full_val_acc")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """The ``[early_stopping]`` table.

    ``kind = "none"`` trains every trial until ``train.max_epochs`` or patience; ``"moasha"`` adds the
    stopper of this module. The default stays "none" so that a study stored before this table existed
    reads back as what it ran with; the study files choose explicitly.
    """

    kind: str = "none"
    eta: int = 3  # keep the top 1/eta at each rung; rungs are eta times apart
    # the first rung (epoch-1 AUCs on a quarter of val were at chance: docs/performance.md, "Early stopping")
    min_epochs: int = 2

    def __post_init__(self) -> None:
        check_choice("early_stopping.kind", self.kind, KINDS)
        if self.eta < 2:
            raise ValueError(f"early_stopping.eta must be >= 2, but got {self.eta!r}")
        if self.min_epochs < 1:
            raise ValueError(f"early_stopping.min_epochs must be >= 1, but got {self.min_epochs!r}")

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def rungs(self, max_epochs: int) -> tuple[int, ...]:
        """The rung epochs for a run of at most ``max_epochs`` (empty when the stopper is off)."""
        return rung_epochs(self.min_epochs, self.eta, max_epochs) if self.active else ()


def rung_epochs(min_epochs: int, eta: int, max_epochs: int) -> tuple[int, ...]:
    """``min_epochs * eta**k`` for k = 0, 1, ... while below ``max_epochs``.

    A rung at ``max_epochs`` itself would decide nothing: the trial ends there anyway.
    """
    if min_epochs < 1 or eta < 2 or max_epochs < 1:
        raise ValueError(
            f"rungs need min_epochs >= 1, eta >= 2, max_epochs >= 1, but got "
            f"(min_epochs={min_epochs}, eta={eta}, max_epochs={max_epochs})"
        )
    rungs, epoch = [], min_epochs
    while epoch < max_epochs:
        rungs.append(epoch)
        epoch *= eta
    return tuple(rungs)


# --- promotion ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RungEntry:
    """One trial's result at a rung: its best val AUC up to the rung's epoch, and its FLOPs."""

    trial: int  # trial number
    val_auc: float
    flops: float


@dataclass(frozen=True)
class Decision:
    """What the stopper decided for one trial at one rung, as recorded on the trial."""

    rung: int  # 0-based rung index
    epoch: int  # the rung's epoch
    val_auc: float  # the trial's rung value
    proceed: bool  # True: train on; False: stopped here
    at_rung: int  # trials at the rung when it decided, itself included
    promoted: int  # how many of them go on: at_rung // eta (0: too few to decide, all go on)
    front: int | None  # the trial's non-dominated front among them, 1 = first (None: too few)
    crowding: float | None  # its crowding distance, when its front was the one cut (else None)
    peers: tuple[int, ...]  # numbers of the other trials it was compared with

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["peers"] = list(self.peers)
        if out["crowding"] is not None and math.isinf(out["crowding"]):
            out["crowding"] = "inf"  # JSON has no infinity
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Decision:
        crowding = data.get("crowding")
        return cls(**{**data, "peers": tuple(data["peers"]),
                      "crowding": float(crowding) if crowding is not None else None})

    def summary(self) -> str:
        verdict = "continue" if self.proceed else "stop"
        if self.promoted == 0:
            return (f"rung {self.rung} (epoch {self.epoch}): {verdict}, {self.at_rung} at the rung < eta: "
                    "too few to rank")
        where = f"front {self.front}"
        if self.crowding is not None:
            where += f", crowding {self.crowding:.3g}"
        return (f"rung {self.rung} (epoch {self.epoch}): {verdict}, {where}; "
                f"top {self.promoted} of {self.at_rung} go on")


def decide(
    candidate: RungEntry, others: Sequence[RungEntry], eta: int
) -> tuple[bool, int, int | None, float | None]:
    """Whether ``candidate`` is in the top ``len(all) // eta`` of itself and ``others`` at a rung.

    Returns ``(proceed, promoted, front, crowding)``: ``promoted`` is how many go on (0 when there are
    fewer than ``eta`` trials: too few to decide, and the candidate proceeds), ``front`` the
    candidate's 1-based non-dominated front, ``crowding`` its crowding distance when its front is the
    one cut by the promotion boundary. See the module docstring for the ranking and its tie-break.
    """
    if eta < 2:
        raise ValueError(f"eta must be >= 2, but got {eta!r}")
    entries = [candidate, *others]
    promoted = len(entries) // eta
    if promoted == 0:
        return True, 0, None, None
    # Minimised objectives: 1 - AUC, log10 FLOPs (log: the axis the hypervolume uses; ranks do not
    # change under it, crowding distances do).
    points = np.array([[1.0 - e.val_auc, math.log10(max(e.flops, 1.0))] for e in entries])
    ranks = moocore.pareto_rank(points)
    mine = int(ranks[0])
    taken = int(np.sum(ranks < mine))  # trials in better fronts
    front = mine + 1  # moocore numbers fronts 0, 1, 2, ... without gaps
    in_front = ranks == mine
    if taken + int(in_front.sum()) <= promoted:
        return True, promoted, front, None  # the candidate's whole front goes on
    if taken >= promoted:
        return False, promoted, front, None  # better fronts fill every place
    slots = promoted - taken
    distance = crowding_distances(points[in_front])
    mine_distance = float(distance[0])  # the candidate is row 0, and the first of its front
    cutoff = float(np.sort(distance)[::-1][slots - 1])
    return mine_distance >= cutoff, promoted, front, mine_distance


# --- learning curves ------------------------------------------------------------------------------


def learning_curve(trial: Any) -> dict[str, list[float]]:
    """The trial's per-epoch curve as lists by key (``CURVE_KEYS``), ready to plot; empty lists for a
    trial that recorded none (it never trained, or predates curves).

    ``trial`` is a ``FrozenTrial`` (``study.trials[n]``) or anything with ``user_attrs``::

        curve = learning_curve(study.trials[17])
        plt.plot(curve["epoch"], curve["val_auc"])
    """
    stored = trial.user_attrs.get(records.CURVE) or {}
    curve = {key: list(stored.get(key, [])) for key in CURVE_KEYS}
    curve.update({key: list(stored[key]) for key in OPTIONAL_CURVE_KEYS if key in stored})
    return curve


def decisions(trial: Any) -> list[Decision]:
    """The stopper's recorded decisions for ``trial``, by rung."""
    return [Decision.from_json(d) for d in trial.user_attrs.get(records.DECISIONS, [])]


def format_learning_curve(trial: Any) -> str:
    """A trial's learning curve and stopper decisions as text, for ``nas3d status --trial N``."""
    attrs = trial.user_attrs
    state = trial.state.name.lower()
    lines = [f"trial {trial.number} ({state}): {attrs.get(records.ARCH, '?')}"]
    if records.EARLY_STOPPED in attrs or records.FAILURE_REASON in attrs:
        lines.append(f"  {attrs.get(records.FAILURE_REASON, 'stopped early')}")
    if trial.values is not None:
        lines.append(f"  val_auc {trial.values[0]:.4f}, {trial.values[1] / 1e6:.1f} MFLOPs")
    elif records.EARLY_STOPPED_VALUES in attrs:
        auc, flops = attrs[records.EARLY_STOPPED_VALUES]
        lines.append(f"  best val_auc {auc:.4f} before it stopped, {flops / 1e6:.1f} MFLOPs "
                     "(not on the front)")
    curve = learning_curve(trial)
    if not curve["epoch"]:
        lines.append("  no learning curve recorded")
        return "\n".join(lines)
    by_epoch = {d.epoch: d for d in decisions(trial)}
    best_epoch = attrs.get(records.BEST_EPOCH)
    header = ("epoch", "train_loss", "val_loss", "val_auc", "val_acc")
    lines.append("  " + "  ".join(f"{h:>10}" for h in header))
    for i, epoch in enumerate(curve["epoch"]):
        cells = [f"{epoch:>10d}"] + [f"{curve[k][i]:>10.4f}" for k in header[1:]]
        notes = []
        if epoch == best_epoch:
            notes.append("best")
        if epoch in by_epoch:
            notes.append(by_epoch[epoch].summary())
        lines.append("  " + "  ".join(cells) + ("  " + "; ".join(notes) if notes else ""))
    return "\n".join(lines)


# --- the per-trial side: recording and deciding ---------------------------------------------------


class EpochMonitor:
    """The ``on_epoch`` callback of :func:`nas3d.train.train_trial` for one trial.

    Records the learning curve after every epoch and, at a rung, asks the stopper whether to go on.
    ``trial`` is a live ``optuna.Trial``: everything it writes goes to the study storage at once,
    where the other workers read it.
    """

    def __init__(self, trial: Any, config: EarlyStoppingConfig, max_epochs: int, flops: float) -> None:
        self.trial = trial
        self.config = config
        self.rungs = config.rungs(max_epochs)
        self.flops = float(flops)
        self.curve: dict[str, list[float]] = {key: [] for key in CURVE_KEYS}
        self.decisions: list[Decision] = []
        trial.set_user_attr(records.FLOPS, int(flops))
        # A re-queued trial arrives with the attrs of the attempt that was interrupted: start clean.
        for key in (records.CURVE, records.DECISIONS):
            if key in trial.user_attrs:
                trial.set_user_attr(key, {} if key == records.CURVE else [])

    @property
    def stopped(self) -> Decision | None:
        """The decision that stopped the trial, if one did."""
        return next((d for d in self.decisions if not d.proceed), None)

    def __call__(self, record: EpochRecord, last: bool) -> bool:
        for key in CURVE_KEYS:
            self.curve[key].append(getattr(record, key))
        for key in OPTIONAL_CURVE_KEYS:
            if getattr(record, key) is not None:
                self.curve.setdefault(key, []).append(getattr(record, key))
        # Written before the rung check reads the others: see "across workers" in the module docstring.
        self.trial.set_user_attr(records.CURVE, self.curve)
        if last or record.epoch not in self.rungs:
            return True
        decision = self._decide(self.rungs.index(record.epoch), record.epoch)
        self.decisions.append(decision)
        self.trial.set_user_attr(records.DECISIONS, [d.to_json() for d in self.decisions])
        return decision.proceed

    def _decide(self, rung: int, epoch: int) -> Decision:
        from optuna.trial import TrialState

        mine = RungEntry(self.trial.number, max(self.curve["val_auc"][:epoch]), self.flops)
        states = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        others = []
        for other in self.trial.study.get_trials(deepcopy=False, states=states):
            if other.number == self.trial.number or records.DUPLICATE_OF in other.user_attrs:
                continue
            entry = rung_entry(other, epoch)
            if entry is not None:
                others.append(entry)
        proceed, promoted, front, crowding = decide(mine, others, self.config.eta)
        return Decision(rung, epoch, mine.val_auc, proceed, len(others) + 1, promoted, front, crowding,
                        tuple(sorted(e.trial for e in others)))

    def stop(self, result: TrainResult) -> None:
        """Record the trial as stopped early and raise ``optuna.TrialPruned``.

        PRUNED, not COMPLETE with partial values: ``study.best_trials`` (the dashboard's front),
        status, export and every hypervolume then hold fully trained trials only, while TPE still
        counts the architecture among its poor ("above") trials. The partial values are kept in
        ``early_stopped_values``, as a duplicate keeps the values it copied.
        """
        import optuna

        decision = self.stopped
        assert decision is not None, "stop() without a stopping decision"
        self.trial.set_user_attr(records.EARLY_STOPPED, True)
        self.trial.set_user_attr(records.EARLY_STOPPED_VALUES, [result.val_auc, self.flops])
        reason = (f"stopped early at epoch {decision.epoch} (rung {decision.rung}): not in the top "
                  f"{decision.promoted} of {decision.at_rung} trials at that rung")
        records.fail_with_reason(self.trial, reason)
        raise optuna.TrialPruned(reason)


def rung_entry(trial: Any, epoch: int) -> RungEntry | None:
    """``trial``'s rung value at ``epoch`` from its stored curve, or None if it has not reached it."""
    attrs = trial.user_attrs
    aucs = (attrs.get(records.CURVE) or {}).get("val_auc", [])
    if len(aucs) < epoch or records.FLOPS not in attrs:
        return None
    return RungEntry(trial.number, max(aucs[:epoch]), float(attrs[records.FLOPS]))
