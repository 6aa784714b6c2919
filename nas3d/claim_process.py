"""Claims made ahead: the worker's claim process, which claims the next trial while the current one trains.

A claim (:mod:`nas3d.claims`) is Python work: the sampler, SQL round trips, measuring costs. In a thread
it would hold the GIL against the training loop and slow training by about its own length
(``bench/storage_overhead.py`` measured this); a process of its own uses another core. The process is
a ``multiprocessing`` child (spawn: a fork would copy training's threads and CUDA state), given the
worker's :class:`nas3d.claims.WorkerSettings` and spoken to through a ``Pipe``.

A claim process that dies (killed, out of memory) is replaced: the worker starts another, and fails
and queues again the trial the dead one had claimed but not handed over. A trial handed over is
checked before training: still RUNNING and this worker's, or the worker claims again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import optuna

from nas3d.claims import (
    LATER,
    Claim,
    TrialSource,
    WorkerSettings,
    claim_source,
    fail_left_behind,
    still_ours,
)
from nas3d.heartbeat import quiet_optuna_warnings
from nas3d.objective import ClaimedArchitecture
from nas3d.storages import StorageUnavailable

__all__ = ["MAX_CLAIM_PROCESS_STARTS", "ClaimProcess", "serve_claims"]

logger = logging.getLogger(__name__)

#: A claim process that dies this many times in a row before answering is not started again: it
#: would only die again (the worker then ends with its status).
MAX_CLAIM_PROCESS_STARTS = 3


@dataclass(frozen=True)
class _Request:
    wait: bool
    outage_age: float | None  # seconds since the worker's last outage; None: none seen


@dataclass(frozen=True)
class _Reply:
    decided: int  # free trials the claim process told so far
    seconds: float  # how long the claim took there
    trial_id: int | None = None
    architecture: ClaimedArchitecture | None = None
    later: bool = False
    storage_lost: str | None = None


class ClaimProcess:
    """Claims made ahead, in a child process, while this one trains (the default).

    A claim is Python work (the sampler, SQL round trips, measuring costs). In a thread it would hold
    the GIL against the training loop and slow training by about its own length
    (``bench/storage_overhead.py`` measured this); a process of its own uses another core.

    The child runs :func:`serve_claims` with the worker's :class:`WorkerSettings`: its own storage
    connection, study lock and sampler (seeded by this worker's number, so the proposals are the ones
    this worker would make itself). Each request gets one reply: a claimed trial, "later", "done" or
    "storage lost". The child beats for the trial it claimed until its next request, by which time this
    process beats for it. It ignores SIGINT/SIGTERM (this process decides what a stop means) and exits
    when its end of the pipe closes.
    """

    def __init__(self, source: TrialSource) -> None:
        self.source = source
        self.decided, self.last_seconds, self._wait = 0, 0.0, True
        self._decided_before = 0  # free trials told by claim processes that ended
        self._starts_unanswered = 0
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fork would copy training's threads and CUDA
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=serve_claims, args=(child_end, self.source.settings),
                                        name="nas3d-claims")
        # One thread, no GPU: costs are counted on the meta device, and idle BLAS threads that spin
        # (OpenBLAS's do) took a core from training on a 2-core machine. Read as the child imports.
        one = "1"
        with _environment(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=one, OPENBLAS_NUM_THREADS=one,
                          MKL_NUM_THREADS=one):
            self._process.start()
        child_end.close()  # the child's end lives in the child alone: its death ends our reads
        self._starts_unanswered += 1

    def request(self, *, wait: bool) -> None:
        self._wait = wait
        with contextlib.suppress(OSError):  # the child ended: result() starts another
            self._connection.send(self._request())

    def _request(self) -> _Request:
        # The child fails stale trials, but only one grace period after the last outage: an outage
        # that this process met (its heartbeats, its tell) while the child sat idle counts too.
        last = getattr(self.source.storage, "last_outage", -math.inf)
        return _Request(self._wait, time.monotonic() - last if last > -math.inf else None)

    def result(self) -> Claim | str | None:
        while True:
            try:
                reply: _Reply = self._connection.recv()
            except (EOFError, OSError):
                self._restart()
                continue
            self._starts_unanswered = 0
            self.decided, self.last_seconds = self._decided_before + reply.decided, reply.seconds
            if reply.storage_lost is not None:
                raise StorageUnavailable(reply.storage_lost)
            if reply.trial_id is None:
                return LATER if reply.later else None
            trial = optuna.Trial(self.source.study, reply.trial_id)  # asked, claimed, marked by the child
            claim = Claim(trial, reply.architecture, self.source.beat_for(trial))  # before the child stops
            if still_ours(self.source.storage, reply.trial_id, self.source.settings.marker):
                return claim
            claim.stop_beating()
            logger.warning("trial %d, claimed ahead, was finished by another worker meanwhile (stale "
                           "heartbeat); claiming another", trial.number)
            self.request(wait=self._wait)

    def _restart(self) -> None:
        """The child ended without a reply: start another, and fail and queue again what it held."""
        status = self._end()
        if self._starts_unanswered >= MAX_CLAIM_PROCESS_STARTS:
            raise RuntimeError(f"the claim process of this worker ended (status {status}) "
                               f"{self._starts_unanswered} times in a row before answering; its log is above")
        logger.warning("the claim process of this worker ended (status %s); starting another", status)
        self._decided_before = self.decided
        reason = (f"claimed by its worker's claim process, which ended (status {status}) before handing it "
                  "over; re-queued")
        fail_left_behind(self.source.study, self.source.settings.marker, reason)
        self._start()
        self.request(wait=self._wait)

    def _end(self) -> int | None:
        self._connection.close()  # the child's reads end: it exits once a claim in progress is done
        self._process.join(timeout=30)  # a trial it claims meanwhile goes stale
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        return self._process.exitcode

    def close(self) -> None:
        self._end()


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """These environment variables set while a child process starts (spawn copies the environment)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve_claims(connection: Any, settings: WorkerSettings) -> None:
    """The claim process's main loop (see :class:`ClaimProcess`): one reply to each request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s (claims): %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_optuna_warnings()
    try:
        source, lost = claim_source(settings), None
    except StorageUnavailable as e:  # the worker's own start-up reached the database just before
        source, lost = None, str(e)
    held: Claim | None = None
    while True:
        try:
            request: _Request = connection.recv()
        except (EOFError, OSError):  # the worker closed its end, or ended
            break
        if held is not None:  # a new request: the worker took the last claim and beats for it
            held.stop_beating()
            held = None
        started = time.perf_counter()
        try:
            if source is None:
                raise StorageUnavailable(lost)
            source.note_outage(request.outage_age)
            claim = source.claim(wait=request.wait)
        except StorageUnavailable as e:
            reply = {"storage_lost": str(e)}
        else:
            if isinstance(claim, Claim):
                held = claim
                reply = {"trial_id": claim.trial._trial_id, "architecture": claim.architecture}
            else:
                reply = {"later": claim == LATER}
        try:
            connection.send(_Reply(decided=source.decided if source else 0,
                                   seconds=time.perf_counter() - started, **reply))
        except OSError:  # the worker ended during this claim: nobody will train it
            if held is not None:
                source.give_back(held)
                held = None
            break
    if held is not None:
        held.stop_beating()
    connection.close()
