"""Claiming a worker's next trial: under the study lock, decide what it will train, and do it ahead.

A claim, under the study lock: fail trials whose worker died (stale heartbeat; Optuna re-queues them)
and trials orphaned by a lost ``ask`` reply; count the budget (:mod:`nas3d.budget`); ``ask``; record
the worker on the trial (:data:`nas3d.budget.WORKER_ATTR`) and beat once; sample the architecture,
record its hash, and decide whether it is a duplicate of a trial that trained or is training it (then
it is recorded against that trial and PRUNED). Then the lock is released: no two workers can claim
one architecture. Outside it, the trial's costs are measured; over the study's constraints it is
PRUNED. Trials decided so, without training, are told here; the others go to the worker to train.

By default the next trial is claimed in the worker's claim process while the current one trains
("claim ahead", :class:`ClaimProcess`), so the device does not wait for the study lock, the sampler and
the storage between trials (``bench/storage_overhead.py`` measures what is left); ``--no-claim-ahead``
claims in turn, in the worker itself (:class:`InlineClaims`). A trial claimed ahead is RUNNING, with its
heartbeat, until it trains; a stop signal fails it and queues it again, as it does the interrupted trial.

The claim process is ``python -c "from nas3d.claims import serve_claims; serve_claims()"``, spoken to
in JSON lines on its standard input and output (the protocol: :class:`ClaimProcess`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from nas3d.architecture import Architecture
from nas3d.budget import WORKER_ATTR, budget_state, log_spent
from nas3d.costs import Costs
from nas3d.data import DataShape
from nas3d.heartbeat import Heartbeat, StopFlag, WorkerEnded, quiet_optuna_warnings
from nas3d.objective import ClaimedArchitecture, TrialObjective
from nas3d.outcomes import interrupted, settle
from nas3d.records import NOT_TRAINED as NOT_TRAINED_ATTR
from nas3d.storages import StorageUnavailable, make_storage, retry_transient, study_lock
from nas3d.study import load_study

__all__ = [
    "LATER",
    "Claim",
    "ClaimProcess",
    "InlineClaims",
    "TrialSource",
    "claim_source",
    "fail_orphans",
    "serve_claims",
    "with_retries",
]

logger = logging.getLogger(__name__)

@dataclass
class Claim:
    """A trial claimed for training here: its architecture decided, its heartbeat running."""

    trial: optuna.Trial
    architecture: ClaimedArchitecture
    heartbeat: Heartbeat | None

    def stop_beating(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()


#: From a claim made ahead: the budget looks spent only because trials are still running (this
#: worker's own among them), or so few trials are left that claiming one ahead could leave another
#: worker idle; claim again once the current trial is told.
LATER = "later"


class TrialSource:
    """Claims this worker's next trial to train, under the study lock (see the module docstring).

    Trials decided without training (duplicates, over the constraints, failed before training) are
    told here and counted in ``decided``.
    """

    def __init__(self, study: optuna.Study, storage: Any, lock: Any, objective: TrialObjective, *,
                 config: Any, marker: dict[str, Any], beats: bool, heartbeat_interval: int, grace: float,
                 window: float, max_free_streak: int, stop: StopFlag) -> None:
        self.study, self.storage, self.lock, self.objective = study, storage, lock, objective
        self.config, self.marker, self.beats = config, marker, beats
        self.heartbeat_interval, self.grace, self.window = heartbeat_interval, grace, window
        self.max_free_streak, self.stop = max_free_streak, stop
        self.decided = 0

    def claim(self, *, wait: bool = True) -> Claim | str | None:
        """The next trial to train, claimed; None once the study is done or a stop was requested.

        With ``wait=False`` (a claim made while this worker's own trial trains) it returns
        :data:`LATER` instead of waiting for running trials that might still need a retry.
        """
        while not self.stop():
            with_retries(self.lock.acquire, self.window, self.storage)
            try:
                trial = self._ask_under_lock(wait=wait)
            except BaseException:
                self.lock.release()
                raise
            if not isinstance(trial, optuna.Trial):  # None: the study is done; LATER: spent for now
                self.lock.release()
                if trial is None or not wait:
                    return trial
                # Another worker's trial may still go stale and need a retry: wait for it.
                time.sleep(min(5.0, self.heartbeat_interval))
                continue
            heartbeat = self.beat_for(trial)
            try:
                try:
                    arch = self.objective.claim(trial)
                finally:
                    self.lock.release()  # the hash and the verdict are recorded: others may ask
                # Outside the lock: counting FLOPs takes ~0.1 s a trial (seconds for a process's first),
                # and every other worker's claim, and a pooled server connection, would wait for it.
                architecture = self.objective.cost(trial, arch)
            except BaseException as error:
                try:
                    settle(self.study, trial, error, self.stop)
                finally:
                    if heartbeat is not None:
                        heartbeat.stop()
                self.decided += 1
                continue
            return Claim(trial, architecture, heartbeat)
        return None

    def _ask_under_lock(self, *, wait: bool) -> optuna.Trial | str | None:
        study, storage = self.study, self.storage
        if self.beats:  # none for a grace period after an outage (see _RDBStorage.recovering)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        fail_orphans(study, older_than=self.grace, recovering=getattr(storage, "recovering", None))
        state = budget_state(study)
        budget = self.config.study.n_trials
        if state.spent(budget, self.max_free_streak):
            if state.running == 0:
                log_spent(study.study_name, state, budget, self.max_free_streak)
                return None
            return LATER
        if not wait and state.left(budget) <= state.workers:
            # Near the end, a trial claimed ahead would wait for this worker's current trial while
            # another worker may go idle: leave the last ones to whoever is free first.
            return LATER
        trial = study.ask()
        if self.beats:  # first beat before the marker: a marked trial is always seen by staleness
            storage.record_heartbeat_now(trial._trial_id)
        storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, self.marker)
        return trial

    def beat_for(self, trial: optuna.Trial) -> Heartbeat | None:
        """A heartbeat thread for ``trial`` where the storage has heartbeats."""
        return Heartbeat(self.storage, trial._trial_id, self.heartbeat_interval) if self.beats else None

    def child_settings(self) -> dict[str, Any]:
        """What a claim process needs to claim as this source does (see :func:`claim_source`)."""
        return {"marker": self.marker, "heartbeat_interval": self.heartbeat_interval, "grace": self.grace,
                "retry_window": self.window, "max_free_streak": self.max_free_streak}

    def give_back(self, claim: Claim) -> None:
        """Fail a claimed trial this worker will not train (a stop came first) and queue it again."""
        try:
            interrupted(self.study, claim.trial, self.stop.why(), trained=False)
        finally:
            claim.stop_beating()


class InlineClaims:
    """Claims made in this process when asked for, after the current trial (``--no-claim-ahead``)."""

    def __init__(self, source: TrialSource) -> None:
        self.source, self._wait = source, True

    @property
    def decided(self) -> int:
        return self.source.decided

    def request(self, *, wait: bool) -> None:
        self._wait = wait

    def result(self) -> Claim | str | None:
        return self.source.claim(wait=self._wait)

    def close(self) -> None:
        pass


class ClaimProcess:
    """Claims made ahead, in a child process, while this one trains (the default).

    A claim is Python work (the sampler, SQL round trips, measuring costs). In a thread it would hold
    the GIL against the training loop and slow training by about its own length
    (``bench/storage_overhead.py`` measured this); a process of its own uses another core.

    The child runs :func:`serve_claims`: its own storage connection, study lock and sampler (seeded by
    this worker's number, so the proposals are the ones this worker would make itself). JSON lines:
    the first line to it is its settings; each request ``{"wait": bool}`` gets one reply, ``{"claim":
    trial_id, "arch": ..., "costs": ...}``, ``{"later": true}``, ``{"done": true}`` or ``{"storage_lost":
    message}``, each with ``decided`` (free trials told so far) and ``seconds``. The child beats for the
    trial it claimed until its next request, by which time this process beats for it. It ignores
    SIGINT/SIGTERM (this process decides what a stop means) and exits when its input closes.
    """

    def __init__(self, source: TrialSource, settings: dict[str, Any]) -> None:
        self.source = source
        self.decided, self.last_seconds, self._wait = 0, 0.0, True
        # One thread, no GPU: costs are counted on the meta device, and idle BLAS threads that spin
        # (OpenBLAS's do) took a core from training on a 2-core machine.
        one = "1"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": one, "OPENBLAS_NUM_THREADS": one,
               "MKL_NUM_THREADS": one}
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from nas3d.claims import serve_claims; serve_claims()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        self._send({**source.child_settings(), **settings, "worker_pid": os.getpid()})

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            self._ended()

    def _ended(self) -> None:
        raise RuntimeError(f"the claim process of this worker ended (status {self._process.wait()}); "
                           "its log is above")

    def request(self, *, wait: bool) -> None:
        self._wait = wait
        # The child fails stale trials, but only one grace period after the last outage: an outage
        # that this process met (its heartbeats, its tell) while the child sat idle counts too.
        last = getattr(self.source.storage, "last_outage", -math.inf)
        self._send({"wait": wait, "outage_age": time.monotonic() - last if last > -math.inf else None})

    def result(self) -> Claim | str | None:
        line = self._process.stdout.readline()
        if not line:
            self._ended()
        reply = json.loads(line)
        self.decided, self.last_seconds = reply["decided"], reply["seconds"]
        if "storage_lost" in reply:
            raise StorageUnavailable(reply["storage_lost"])
        if "claim" not in reply:
            return LATER if "later" in reply else None
        trial = optuna.Trial(self.source.study, reply["claim"])  # the trial the child asked, claimed, marked
        heartbeat = self.source.beat_for(trial)  # first: the child stops beating for it at the next request
        architecture = ClaimedArchitecture(Architecture.from_json(reply["arch"]), Costs(**reply["costs"]))
        return Claim(trial, architecture, heartbeat)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)  # it finishes a claim in progress, whose trial then goes stale
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def serve_claims() -> None:
    """The claim process's main loop (see :class:`ClaimProcess`); settings come on standard input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout goes to the log, not into the replies
    settings = json.loads(sys.stdin.readline())
    logging.basicConfig(level=settings["log_level"], stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s (claims): %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_optuna_warnings()
    try:
        source, lost = claim_source(settings), None
    except StorageUnavailable as e:  # the worker's own start-up reached the database just before
        source, lost = None, str(e)
    held: Claim | None = None
    for line in sys.stdin:
        if held is not None:  # a new request: the worker took the last claim and beats for it
            held.stop_beating()
            held = None
        started = time.perf_counter()
        reply: dict[str, Any]
        try:
            if source is None:
                raise StorageUnavailable(lost)
            request = json.loads(line)
            if request["outage_age"] is not None:
                seen = getattr(source.storage, "last_outage", -math.inf)
                source.storage.last_outage = max(seen, time.monotonic() - request["outage_age"])
            claim = source.claim(wait=request["wait"])
        except StorageUnavailable as e:
            reply = {"storage_lost": str(e)}
        else:
            if isinstance(claim, Claim):
                held = claim
                reply = {"claim": claim.trial._trial_id, "arch": claim.architecture.arch.to_json(),
                         "costs": dataclasses.asdict(claim.architecture.costs)}
            else:
                reply = {"later": True} if claim == LATER else {"done": True}
        reply.update(decided=source.decided if source else 0, seconds=time.perf_counter() - started)
        try:
            replies.write(json.dumps(reply) + "\n")
        except BrokenPipeError:  # the worker ended during this claim: nobody will train it
            if held is not None:
                source.give_back(held)
                held = None
            break
    if held is not None:
        held.stop_beating()
    with contextlib.suppress(BrokenPipeError):
        replies.close()


def claim_source(settings: dict[str, Any]) -> TrialSource:
    """The claim process's own storage, study (its sampler seeded by the worker's number) and lock."""
    url, name = settings["storage"], settings["study_name"]
    storage = make_storage(url, heartbeat_interval=settings["heartbeat_interval"],
                           grace_period=settings["grace"], retry_window=settings["retry_window"],
                           must_exist=True)
    study, config = load_study(name, storage, worker_number=settings["worker_number"])
    objective = TrialObjective(config, DataShape(**settings["shape"]), "cpu")
    return TrialSource(
        study, storage, study_lock(url, name), objective, config=config, marker=settings["marker"],
        beats=isinstance(storage, optuna.storages.RDBStorage),
        heartbeat_interval=settings["heartbeat_interval"], grace=settings["grace"],
        window=settings["retry_window"], max_free_streak=settings["max_free_streak"],
        stop=WorkerEnded(settings["worker_pid"]),
    )


def fail_orphans(
    study: optuna.Study, *, older_than: float, recovering: Callable[[], bool] | None = None
) -> int:
    """Fail RUNNING trials no worker claimed; call it holding the study lock. Returns how many.

    A worker marks its trial right after ``ask``, under the study lock. A RUNNING trial without the
    mark was created by an ``ask`` whose reply was lost (database outage) or whose worker died
    before marking it: no one will ever run or beat it. If it had popped a queued trial, that one
    is queued again. None while ``recovering()`` (the storage's, after an outage): a worker whose
    lock the outage dropped may still be marking its trial.
    """
    storage = study._storage
    cutoff = time.time() - older_than
    failed = 0
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if recovering is not None and recovering():  # after the read: an outage may have happened during it
        return 0
    for trial in running:
        if WORKER_ATTR in trial.system_attrs:
            continue
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        if started > cutoff:  # a lock lost to a server restart could let its worker still be marking it
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, NOT_TRAINED_ATTR, "lost")
            storage.set_trial_user_attr(
                trial._trial_id, "failure_reason", "orphaned: created by an ask whose worker never claimed it"
            )
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        failed += 1
        fixed = trial.system_attrs.get("fixed_params")
        if fixed:
            kept = {k: v for k, v in trial.user_attrs.items()
                    if k not in (NOT_TRAINED_ATTR, "failure_reason")}
            study.enqueue_trial(fixed, user_attrs=kept)
        logger.warning("trial %d was orphaned by a lost ask; failed%s", trial.number,
                       " and its queued parameters queued again" if fixed else "")
    return failed


def with_retries(call: Any, window: float, storage: Any) -> None:
    """``call()`` (the study lock) retried through ``StorageUnavailable`` for ``window`` seconds.

    On an RDB storage through its own retry loop, so that an outage ridden out here is recorded as the
    storage's ``last_outage``: a claim process waiting for the lock through an outage makes no storage
    call that would notice it, and must not then fail live trials whose workers have not beaten since
    (see ``_RDBStorage.recovering``). The storage's window is ``window`` (both come from the worker).
    """
    ride_out = getattr(storage, "ride_out", None)
    if ride_out is not None:
        return ride_out("study lock", call)
    return retry_transient(call, window=window, what="study lock",
                           transient=lambda e: isinstance(e, StorageUnavailable))
