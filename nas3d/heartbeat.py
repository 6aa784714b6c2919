"""The signs of life between a worker and the rest: the heartbeat thread that says a trial's worker
is alive, and the stop flags that say a worker (or its claim process) should end.

Heartbeats exist on RDB storages only (``nas3d.storages``): a trial whose beats stop for a grace period
is failed by the next worker and queued again. Stop flags turn SIGINT/SIGTERM into a flag that
training polls between batches, so no exception lands inside a storage write or an upload.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from types import FrameType
from typing import Any

__all__ = ["Heartbeat", "StopFlag", "WorkerEnded", "quiet_optuna_warnings"]

logger = logging.getLogger(__name__)

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


class WorkerEnded(StopFlag):
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


class Heartbeat:
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


def quiet_optuna_warnings() -> None:
    # The worker runs ask/tell with its own heartbeat thread (to retry and to own failures); Optuna
    # warns that heartbeats are meant for Study.optimize, which nas3d.worker replaces.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")
