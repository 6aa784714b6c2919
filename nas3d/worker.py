"""A worker: one process, one device, trials of one study until the study's budget is spent.

Several workers (on one or many hosts) share a study through its storage, its study lock and its
artifact store (recorded in the study). Each trial goes:

1. Under the study lock: fail trials whose worker died (stale heartbeat; Optuna re-queues them) and
   trials orphaned by a lost ``ask`` reply; count the budget; ``ask``; record this worker on the
   trial and beat once; sample the architecture, record its hash, and decide whether it is a
   duplicate of a trial that trained or is training it (then it is recorded against that trial and
   PRUNED). Then the lock is released: no two workers can claim one architecture.
2. Measure its costs; over the study's constraints it is PRUNED.
3. Train (the heartbeat thread beats meanwhile), upload the checkpoint, ``tell``.

Steps 1 and 2 of the next trial run in the worker's claim process while step 3 of the current one trains
("claim ahead"), so the device does not wait for the study lock, the sampler and the storage between
trials (``bench/storage_overhead.py`` measures what is left); ``--no-claim-ahead`` runs them in turn,
in the worker itself. A trial claimed ahead is RUNNING, with its heartbeat, until it trains; a stop
signal fails it and queues it again, as it does the interrupted trial.

The budget counts trained architectures: a trial decided without training (duplicate, over the
constraints, failed before training, orphaned) is free, as is a failed trial that was queued again
(its retry counts). A study stops once ``max_free_streak`` trials in a row were free, so a sampler
that can only find known or over-cap architectures cannot run forever.

Faults: storage calls retry through a database outage for the retry window
(``$NAS3D_STORAGE_RETRY_WINDOW``, default 600 s); past it the worker exits with
:data:`EXIT_STORAGE`, which ``nas3d launch`` restarts. Anything raised inside a trial fails that trial
with its reason and the worker goes on. Only bad input found before the first trial raises (the CLI
exits 2). SIGINT/SIGTERM only set a flag; training checks it between batches, and the interrupted
trial is failed and queued again.
A trial the early stopper ended counts toward the budget: its architecture was trained (to a rung and
ranked there), only not to the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from nas3d.architecture import Architecture
from nas3d.costs import Costs
from nas3d.data import DataShape, load_splits
from nas3d.pareto import EARLY_STOPPED_ATTR
from nas3d.storages import (
    DEFAULT_HEARTBEAT_INTERVAL,
    StorageMissing,
    StorageUnavailable,
    check_artifact_store,
    make_storage,
    open_artifact_store,
    resolve_storage_url,
    retry_transient,
    storage_retry_window,
    study_artifact_location,
    study_lock,
)
from nas3d.study import (
    NOT_TRAINED_ATTR,
    ClaimedArchitecture,
    TrialObjective,
    allocate_worker_number,
    load_study,
)
from nas3d.train import TrainingStopped
from nas3d.train import torch_device as check_device
from nas3d.util import EXIT_STORAGE

logger = logging.getLogger(__name__)

#: Trial system attr naming the worker that runs it: ``{"worker": N, "host": ..., "pid": ...}``.
WORKER_ATTR = "nas3d:worker"
#: How many trials in a row may be free (duplicates, over the constraints, ...) before a study stops.
DEFAULT_MAX_FREE_STREAK = 100


class WorkerStorageLost(SystemExit):
    """The database stayed unreachable past the retry window: the process exits :data:`EXIT_STORAGE`.

    A ``SystemExit`` so that ``python -m nas3d worker`` ends with that status (restartable), not
    with the usage-error status 2; library callers may catch it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_STORAGE)
        self.message = message
        # SystemExit prints nothing: say why in the log, in one line.
        logger.error("worker exits (status %d, to be restarted): %s", EXIT_STORAGE, message)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class BudgetState:
    used: int  # trials that count against the budget: trained or training, and queued ones
    free: int  # trials decided without training (duplicates, over the constraints, ...)
    free_streak: int  # free trials after the last counted trial that has started
    duplicates: int
    waiting: int
    running: int
    stopped: int = 0  # trials the early stopper ended (counted in ``used``)
    workers: int = 0  # distinct workers with a RUNNING trial

    def left(self, budget: int) -> int:
        """Trials that may still start: the unused budget and the queued trials."""
        return max(0, budget - self.used) + self.waiting

    def spent(self, budget: int, max_free_streak: int = DEFAULT_MAX_FREE_STREAK) -> bool:
        """No trial may start: the budget is used (queued trials count already and still run), or
        the last ``max_free_streak`` trials were all free."""
        return self.free_streak >= max_free_streak or (self.waiting == 0 and self.used >= budget)


def _is_free(trial: optuna.trial.FrozenTrial) -> bool:
    # duplicate_of alone: a study from before NOT_TRAINED_ATTR existed
    return NOT_TRAINED_ATTR in trial.user_attrs or "duplicate_of" in trial.user_attrs


def budget_state(study: optuna.Study) -> BudgetState:
    """Count the study's trials the way the budget does (see the module docstring)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    counted = [t for t in trials if t.number not in retried and not _is_free(t)]
    last = max((t.number for t in counted if t.state != TrialState.WAITING), default=-1)
    return BudgetState(
        used=len(counted),
        free=sum(_is_free(t) for t in trials),
        free_streak=sum(_is_free(t) for t in trials if t.number > last),
        duplicates=sum("duplicate_of" in t.user_attrs for t in trials),
        waiting=sum(t.state == TrialState.WAITING for t in trials),
        running=sum(t.state == TrialState.RUNNING for t in trials),
        stopped=sum(bool(t.user_attrs.get(EARLY_STOPPED_ATTR)) for t in trials),
        workers=len({(t.system_attrs.get(WORKER_ATTR) or {}).get("worker") for t in trials
                     if t.state == TrialState.RUNNING}),
    )


class StopFlag:
    """SIGINT/SIGTERM set ``requested`` and nothing else: no exception lands inside a storage write
    or an upload. Training polls it between batches."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handle)
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name

    def __call__(self) -> bool:
        return self.requested is not None

    def why(self) -> str:
        return f"the worker received {self.requested}"


class _WorkerEnded(StopFlag):
    """A claim process's stop flag: set once its worker has ended (the process was re-parented), so
    that it claims nothing more for a worker that cannot train it."""

    def __init__(self, worker_pid: int) -> None:
        super().__init__()
        self._worker = worker_pid  # not getppid() here: the worker may have ended during start-up

    def __call__(self) -> bool:
        if self.requested is None and os.getppid() != self._worker:
            self.requested = "ended"
        return self.requested is not None

    def why(self) -> str:
        return "its worker ended before taking it"


class _Heartbeat:
    """Beats for one trial every ``interval`` seconds in a thread, as ``Study.optimize`` would
    (the worker runs ask/tell itself, to control retries and failures)."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)  # skips a beat on a transient error
            except Exception:
                logger.exception("heartbeat of trial id %d failed", self._trial_id)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


@dataclass
class _Claim:
    """A trial claimed for training here: its architecture decided, its heartbeat running."""

    trial: optuna.Trial
    architecture: ClaimedArchitecture
    heartbeat: _Heartbeat | None

    def stop_beating(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()


#: From a claim made ahead: the budget looks spent only because trials are still running (this
#: worker's own among them), or so few trials are left that claiming one ahead could leave another
#: worker idle; claim again once the current trial is told.
LATER = "later"


class _TrialSource:
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

    def claim(self, *, wait: bool = True) -> _Claim | str | None:
        """The next trial to train, claimed; None once the study is done or a stop was requested.

        With ``wait=False`` (a claim made while this worker's own trial trains) it returns
        :data:`LATER` instead of waiting for running trials that might still need a retry.
        """
        while not self.stop():
            _with_retries(self.lock.acquire, self.window, self.storage)
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
                    _settle(self.study, trial, error, self.stop)
                finally:
                    if heartbeat is not None:
                        heartbeat.stop()
                self.decided += 1
                continue
            return _Claim(trial, architecture, heartbeat)
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
                _log_end(study.study_name, state, budget, self.max_free_streak)
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

    def beat_for(self, trial: optuna.Trial) -> _Heartbeat | None:
        """A heartbeat thread for ``trial`` where the storage has heartbeats."""
        return _Heartbeat(self.storage, trial._trial_id, self.heartbeat_interval) if self.beats else None

    def child_settings(self) -> dict[str, Any]:
        """What a claim process needs to claim as this source does (see :func:`_claim_source`)."""
        return {"marker": self.marker, "heartbeat_interval": self.heartbeat_interval, "grace": self.grace,
                "retry_window": self.window, "max_free_streak": self.max_free_streak}

    def give_back(self, claim: _Claim) -> None:
        """Fail a claimed trial this worker will not train (a stop came first) and queue it again."""
        try:
            _interrupted(self.study, claim.trial, self.stop.why(), trained=False)
        finally:
            claim.stop_beating()


class _InlineClaims:
    """Claims made in this process when asked for, after the current trial (``--no-claim-ahead``)."""

    def __init__(self, source: _TrialSource) -> None:
        self.source, self._wait = source, True

    @property
    def decided(self) -> int:
        return self.source.decided

    def request(self, *, wait: bool) -> None:
        self._wait = wait

    def result(self) -> _Claim | str | None:
        return self.source.claim(wait=self._wait)

    def close(self) -> None:
        pass


class _ClaimProcess:
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

    def __init__(self, source: _TrialSource, settings: dict[str, Any]) -> None:
        self.source = source
        self.decided, self.last_seconds, self._wait = 0, 0.0, True
        # One thread, no GPU: costs are counted on the meta device, and idle BLAS threads that spin
        # (OpenBLAS's do) took a core from training on a 2-core machine.
        one = "1"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": one, "OPENBLAS_NUM_THREADS": one,
               "MKL_NUM_THREADS": one}
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from nas3d.worker import serve_claims; serve_claims()"],
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

    def result(self) -> _Claim | str | None:
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
        return _Claim(trial, architecture, heartbeat)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)  # it finishes a claim in progress, whose trial then goes stale
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def serve_claims() -> None:
    """The claim process's main loop (see :class:`_ClaimProcess`); settings come on standard input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout goes to the log, not into the replies
    settings = json.loads(sys.stdin.readline())
    logging.basicConfig(level=settings["log_level"], stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s (claims): %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_optuna_warnings()
    try:
        source, lost = _claim_source(settings), None
    except StorageUnavailable as e:  # the worker's own start-up reached the database just before
        source, lost = None, str(e)
    held: _Claim | None = None
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
            if isinstance(claim, _Claim):
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


def _claim_source(settings: dict[str, Any]) -> _TrialSource:
    """The claim process's own storage, study (its sampler seeded by the worker's number) and lock."""
    url, name = settings["storage"], settings["study_name"]
    storage = make_storage(url, heartbeat_interval=settings["heartbeat_interval"],
                           grace_period=settings["grace"], retry_window=settings["retry_window"],
                           must_exist=True)
    study, config = load_study(name, storage, worker_number=settings["worker_number"])
    objective = TrialObjective(config, DataShape(**settings["shape"]), "cpu")
    return _TrialSource(
        study, storage, study_lock(url, name), objective, config=config, marker=settings["marker"],
        beats=isinstance(storage, optuna.storages.RDBStorage),
        heartbeat_interval=settings["heartbeat_interval"], grace=settings["grace"],
        window=settings["retry_window"], max_free_streak=settings["max_free_streak"],
        stop=_WorkerEnded(settings["worker_pid"]),
    )


def run_worker(
    study_name: str,
    storage: str | None = None,
    *,
    device: str = "cpu",
    worker_index: int = 0,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
    progress: bool = False,
    retry_window: float | None = None,
    max_free_streak: int = DEFAULT_MAX_FREE_STREAK,
    claim_ahead: bool = True,
) -> int:
    """Run trials of ``study_name`` on ``device`` until its budget is spent; returns trials run here.

    ``claim_ahead``: claim the next trial (sample, deduplicate, measure its costs) in a child process
    while the current one trains, so the device does not wait for the storage and the sampler between
    trials. The sampler then proposes it without the current trial's result, as it would with one
    more worker (TPE's constant liar covers running trials).

    The device and the storage are checked first. Raises ``ValueError`` / ``LookupError`` /
    ``FileNotFoundError`` / ``StorageMissing`` for bad input found before the first trial (a device
    that is not here, a storage that does not exist, an unknown study, an unreachable artifact store,
    missing data), each one line, before anything is written; and
    :class:`WorkerStorageLost` when the database is unreachable for longer than ``retry_window``
    seconds (default :func:`nas3d.storages.storage_retry_window`).
    """
    torch_device = check_device(device)
    window = storage_retry_window(retry_window)
    storage_url = resolve_storage_url(storage)
    try:
        optuna_storage = make_storage(
            storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
            retry_window=window, must_exist=True,
        )
        load_study(study_name, optuna_storage, check_data=True)  # bad input first: study, changed data
        lock = study_lock(storage_url, study_name)
        _with_retries(lock.acquire, window, optuna_storage)
        try:
            study, _ = load_study(study_name, optuna_storage)
            number = allocate_worker_number(study)
        finally:
            lock.release()
        study, config = load_study(study_name, optuna_storage, worker_number=number)
        location = study_artifact_location(optuna_storage, study_name)
    except StorageMissing:
        raise  # bad input: a restart cannot help (exit 2)
    except StorageUnavailable as e:
        raise WorkerStorageLost(str(e)) from e
    check_artifact_store(location)  # one line, before any training, if this host cannot reach it
    data = load_splits(config.data, torch_device, for_search=True)
    stop = StopFlag()
    stop.install()
    objective = TrialObjective(config, data, torch_device, open_artifact_store(location), progress=progress,
                               should_stop=stop)
    source = _TrialSource(
        study, optuna_storage, lock, objective, config=config,
        marker={"worker": number, "host": socket.gethostname(), "pid": os.getpid()},
        beats=isinstance(optuna_storage, optuna.storages.RDBStorage), heartbeat_interval=heartbeat_interval,
        grace=grace_period or 4 * heartbeat_interval, window=window, max_free_streak=max_free_streak,
        stop=stop,
    )
    logger.info("worker %d (number %d in study %r) on %s, artifacts in %s",
                worker_index, number, study_name, device, location)

    claims: _InlineClaims | _ClaimProcess = _InlineClaims(source)
    if claim_ahead:
        claims = _ClaimProcess(source, {
            "study_name": study_name, "storage": storage_url, "worker_number": number,
            "shape": dataclasses.asdict(data.shape),
            "log_level": logging.getLogger("nas3d").getEffectiveLevel(),
        })
    trained = 0
    try:
        _quiet_optuna_warnings()
        claims.request(wait=True)
        claim = claims.result()
        while isinstance(claim, _Claim):
            asked = not stop.requested
            if asked:
                claims.request(wait=False)  # claimed ahead while this trial trains (in turn: after it)
            try:
                train = functools.partial(objective.train, claim.trial, claim.architecture)
                run_trial(study, claim.trial, train, stop)
            finally:
                claim.stop_beating()
            trained += 1
            claim = claims.result() if asked else None
            if isinstance(claim, _Claim) and stop.requested:
                source.give_back(claim)
                claim = None
            elif claim == LATER and not stop.requested:
                claims.request(wait=True)
                claim = claims.result()
    except StorageUnavailable as e:
        raise WorkerStorageLost(str(e)) from e
    finally:
        claims.close()
    if stop.requested:
        logger.info("worker stopped by %s after %d trials", stop.requested, trained + claims.decided)
    return trained + claims.decided


def _quiet_optuna_warnings() -> None:
    # The worker runs ask/tell with its own heartbeat thread (to retry and to own failures); Optuna
    # warns that heartbeats are meant for Study.optimize, which is what this module replaces.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")


def _log_end(study_name: str, state: BudgetState, budget: int, max_free_streak: int) -> None:
    if state.free_streak >= max_free_streak:
        logger.warning(
            "study %r stops early: the last %d trials were all duplicates of evaluated architectures or "
            "over the constraints (%d trained of %d); widen the space, relax [constraints], or use "
            "another sampler", study_name, state.free_streak, state.used, budget,
        )
    else:
        logger.info("study %r has used its budget of %d trained architectures", study_name, budget)


def run_trial(
    study: optuna.Study, trial: optuna.Trial, evaluate: Callable[[], Any], stop: StopFlag
) -> None:
    """Evaluate one asked trial (``evaluate()`` returns its values) and tell its outcome; failures
    stay the trial's.

    A trial interrupted by ``stop`` is failed and queued again; anything else raised fails the trial
    with its reason (set by the objective). Only :class:`StorageUnavailable` propagates.
    """
    try:
        values = evaluate()
    except BaseException as error:
        _settle(study, trial, error, stop)
    else:
        _tell(study, trial, values=values)


def _settle(study: optuna.Study, trial: optuna.Trial, error: BaseException, stop: StopFlag) -> None:
    """Tell ``trial`` the outcome ``error`` stands for; re-raise what is not the trial's."""
    if isinstance(error, optuna.TrialPruned):
        _tell(study, trial, state=TrialState.PRUNED)
    elif isinstance(error, TrainingStopped):
        _interrupted(study, trial, stop.why(), trained=True)
    elif isinstance(error, StorageUnavailable) or not isinstance(error, Exception):
        raise error  # a lost database: the trial stays RUNNING, its heartbeat stops, another worker retries
    else:
        logger.warning("trial %d failed: %s: %s", trial.number, type(error).__name__, error)
        _tell(study, trial, state=TrialState.FAIL)


def _tell(study: optuna.Study, trial: optuna.Trial, **outcome: Any) -> None:
    # skip_if_finished: another worker may have failed it as stale meanwhile (then its retry counts)
    study.tell(trial, skip_if_finished=True, **outcome)


def _interrupted(study: optuna.Study, trial: optuna.Trial, why: str, *, trained: bool) -> None:
    """Fail a trial a stop interrupted (during or before its training) and queue it again, unless it
    is finished already: ``launch`` fails and queues again the trials of a worker it killed."""
    when = "" if trained else " before its training began"
    try:
        trial.set_user_attr("failure_reason", f"interrupted{when}: {why}; re-queued")
    except optuna.exceptions.UpdateFinishedTrialError:
        return
    _tell(study, trial, state=TrialState.FAIL)
    requeue(study, study._storage.get_trial(trial._trial_id))


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed trial again with its parameters; the retry replaces it in the budget."""
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("failure_reason", NOT_TRAINED_ATTR)}
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=user_attrs,
            system_attrs={
                "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                "retry_history": history,
            },
        )
    )
    logger.info("trial %d was interrupted and queued again", trial.number)


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


def _with_retries(call: Any, window: float, storage: Any) -> None:
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
