"""Start and supervise worker processes: one per GPU slot, or N on the CPU.

Each worker is a separate ``nas3d worker`` process (its own CUDA context, its own heartbeat). GPU
workers see only their GPU (``CUDA_VISIBLE_DEVICES``), so ``cuda`` inside a worker is that GPU.

* A worker that exits for storage reasons (:data:`nas3d.util.EXIT_STORAGE`: the database stayed
  unreachable past its retry window, or at start-up) is started again with backoff for as long as
  the storage retry window lasts. One that crashes otherwise is restarted a few times per slot. One
  that rejected its input (exit 2), or whose artifact store kept refusing checkpoints
  (:data:`nas3d.util.EXIT_ARTIFACTS`), is not restarted: that cannot help.
* SIGINT/SIGTERM are passed on to every worker, which stops its trial between two batches, queues it
  again and exits. A worker still running ``kill_grace`` seconds later gets SIGKILL, and the trial
  it left RUNNING is failed and queued again here, so nothing stays RUNNING.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nas3d.storages import storage_retry_window
from nas3d.train import gpu_count, no_gpu_message
from nas3d.util import EXIT_ARTIFACTS, EXIT_STORAGE, EXIT_USAGE

logger = logging.getLogger(__name__)

MAX_RESTARTS_PER_SLOT = 3
#: Seconds a stopping worker gets to queue its trial again before SIGKILL (compose allows 60).
DEFAULT_KILL_GRACE_S = 30.0
_MAX_BACKOFF_S = 30.0


@dataclass
class Slot:
    index: int
    device: str  # "cuda" or "cpu"
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    handled: bool = False  # this process's exit has been dealt with
    restart_at: float | None = None  # monotonic time of a pending restart after a storage exit
    storage_exits: int = 0  # consecutive storage exits
    storage_since: float | None = None  # monotonic time of the first of them
    killed_pids: tuple[int, ...] = ()
    started_at: float = 0.0


def discover_gpus(gpus: str | None, *, cpu: bool = False) -> list[int] | None:
    """The GPU indices to run on: ``--gpus 0,1`` as given, else every visible GPU, else None (the
    CPU). ``cpu`` forces the CPU. A one-line ``ValueError`` for indices that are malformed, repeated
    or not on this machine, before any worker starts."""
    if cpu:
        return None
    if gpus is None:
        import torch

        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else None
    try:
        indices = [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        indices = []
    if not indices or any(i < 0 for i in indices):
        raise ValueError(f"--gpus expects comma-separated GPU indices such as 0,1, but got {gpus!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"--gpus {gpus}: an index is repeated; use --workers-per-gpu for several "
                         "workers on one GPU")
    missing = [i for i in indices if i >= gpu_count()]
    if missing:
        raise ValueError(f"--gpus {gpus}: {no_gpu_message(missing[0])}; name the GPUs nvidia-smi lists, "
                         "or use --cpu")
    return indices


def _device_id(index: int, visible: str | None) -> str:
    """What ``CUDA_VISIBLE_DEVICES`` must say for a worker to see GPU ``index`` as this process numbers
    it: under a parent restriction (``CUDA_VISIBLE_DEVICES=2,3``, a Slurm or Kubernetes allocation;
    ordinals, UUIDs or MIG ids) index 0 is the first listed device, not the machine's GPU 0."""
    if visible is None:
        return str(index)
    listed = [entry.strip() for entry in visible.split(",")]
    return listed[index] if index < len(listed) and listed[index] else str(index)


def plan_slots(
    *, gpus: list[int] | None, workers_per_gpu: int = 1, cpu_workers: int = 1
) -> list[Slot]:
    """The worker slots for ``--gpus 0,1 --workers-per-gpu K`` or ``--workers N`` on the CPU."""
    if workers_per_gpu < 1 or cpu_workers < 1:
        raise ValueError(
            f"--workers-per-gpu and --workers must be >= 1, but got {workers_per_gpu} and {cpu_workers}"
        )
    base = dict(os.environ)
    if gpus:
        visible = base.get("CUDA_VISIBLE_DEVICES")
        return [
            Slot(i, "cuda", {**base, "CUDA_VISIBLE_DEVICES": _device_id(gpu, visible)})
            for i, gpu in enumerate(g for g in gpus for _ in range(workers_per_gpu))
        ]
    # Split the cores between CPU workers: oversubscribed threads make every trial slower.
    threads = str(max(1, (os.cpu_count() or 1) // cpu_workers))
    env = {**base, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return [Slot(i, "cpu", env) for i in range(cpu_workers)]


def worker_arguments(
    heartbeat_interval: int, grace_period: int | None, progress: bool, claim_ahead: bool = True
) -> list[str]:
    """The ``nas3d worker`` flags every launched worker gets."""
    extra = ["--heartbeat-interval", str(heartbeat_interval)]
    if grace_period is not None:
        extra += ["--grace-period", str(grace_period)]
    extra += ["--progress"] if progress else []
    return extra if claim_ahead else [*extra, "--no-claim-ahead"]


def launch_from_flags(
    flags: Mapping[str, Any], storage_url: str, study: str | Callable[[], str]
) -> tuple[str, int]:
    """``nas3d launch`` and ``nas3d search`` by their flags: the devices and worker slots, checked before
    ``study`` (a callable) creates the study, then :func:`launch`; the study's name and the exit code."""
    gpus = discover_gpus(flags.get("gpus"), cpu=bool(flags.get("cpu")))
    slots = plan_slots(gpus=gpus, workers_per_gpu=flags["workers_per_gpu"], cpu_workers=flags["workers"])
    extra = worker_arguments(flags["heartbeat_interval"], flags.get("grace_period"),
                             bool(flags.get("progress")), flags.get("claim_ahead", True))
    name = study if isinstance(study, str) else study()
    return name, launch(name, storage_url, slots, extra)


def launch(
    study_name: str,
    storage_url: str,
    slots: list[Slot],
    worker_args: list[str] = (),
    *,
    kill_grace: float = DEFAULT_KILL_GRACE_S,
    retry_window: float | None = None,
    command: Sequence[str] = (),
    studies: Sequence[str] = (),
) -> int:
    """Run one worker per slot until all finish; returns 0 when every worker ended cleanly.

    ``retry_window`` (default :func:`nas3d.storages.storage_retry_window`): how long a slot whose
    worker keeps exiting for storage reasons is restarted. ``command``: the worker's subcommand and
    its own flags (default ``worker --study-name STUDY``; a reproduce plan's workers:
    ``reproduce --worker --name PLAN``), and ``studies`` the studies whose trials a killed worker may
    have left running (default ``study_name``'s).
    """
    head = list(command) or ["worker", "--study-name", study_name]
    window = storage_retry_window(retry_window)
    stopping: float | None = None  # monotonic time of the first stop signal

    def forward(signum: int, _frame) -> None:
        nonlocal stopping
        if stopping is None:
            stopping = time.monotonic()
        for slot in slots:
            slot.restart_at = None
            if slot.process and slot.process.poll() is None:
                slot.process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for slot in slots:
            _start(slot, head, storage_url, list(worker_args))
        while not all(slot.handled and slot.restart_at is None for slot in slots):
            time.sleep(0.2)
            now = time.monotonic()
            if stopping is not None and now - stopping > kill_grace:
                _kill_remaining(slots, kill_grace)
            for slot in slots:
                if slot.restart_at is not None and now >= slot.restart_at and stopping is None:
                    slot.restart_at = None
                    _start(slot, head, storage_url, list(worker_args))
                code = slot.process.poll() if slot.process else None
                if code is None or slot.handled:
                    continue
                slot.handled = True
                if code in (0, EXIT_USAGE, EXIT_ARTIFACTS) or stopping is not None:
                    continue
                if code == EXIT_STORAGE:
                    _schedule_storage_restart(slot, now, window)
                    continue
                slot.storage_exits, slot.storage_since = 0, None
                if slot.restarts < MAX_RESTARTS_PER_SLOT:
                    slot.restarts += 1
                    logger.warning(
                        "worker %d exited with code %d; restarting (%d/%d)",
                        slot.index, code, slot.restarts, MAX_RESTARTS_PER_SLOT,
                    )
                    _start(slot, head, storage_url, list(worker_args))
                else:
                    logger.error("worker %d exited with code %d; giving up on this slot", slot.index, code)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    killed = [pid for slot in slots for pid in slot.killed_pids]
    if killed:
        for name in studies or [study_name]:
            requeue_killed(name, storage_url, killed, retry_window=window)
    codes = [s.process.returncode for s in slots if s.process]
    return 0 if all(c == 0 for c in codes) else 1


def _schedule_storage_restart(slot: Slot, now: float, window: float) -> None:
    if now - slot.started_at > 60:  # it had been working: a new outage, with a window of its own
        slot.storage_exits, slot.storage_since = 0, None
    if slot.storage_since is None:
        slot.storage_since = now
    slot.storage_exits += 1
    delay = min(_MAX_BACKOFF_S, 2.0**slot.storage_exits)
    if now + delay - slot.storage_since > window:
        logger.error("worker %d could not reach the database for %.0f s; giving up on this slot",
                     slot.index, now - slot.storage_since)
        return
    logger.warning("worker %d lost the database; starting it again in %.0f s", slot.index, delay)
    slot.restart_at = now + delay


def _kill_remaining(slots: list[Slot], grace: float) -> None:
    for slot in slots:
        process = slot.process
        if process and process.poll() is None:
            logger.warning("worker %d still running %.0f s after the stop signal; killing it",
                           slot.index, grace)
            process.kill()
            process.wait()
            slot.killed_pids = (*slot.killed_pids, process.pid)


def requeue_killed(study_name: str, storage_url: str, pids: list[int], *, retry_window: float = 0.0) -> int:
    """Fail and queue again the trials that workers ``pids`` of this host left RUNNING when killed.

    Their heartbeat would fail them after the grace period too, but only while some worker runs.
    """
    import optuna
    from optuna.trial import TrialState

    from nas3d.records import WORKER, fail_and_requeue
    from nas3d.storages import make_storage

    storage = make_storage(storage_url, retry_window=retry_window)
    study = optuna.load_study(study_name=study_name, storage=storage)
    host, done = socket.gethostname(), 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        marker = trial.system_attrs.get(WORKER) or {}
        if marker.get("host") != host or marker.get("pid") not in pids:
            continue
        reason = "killed: its worker did not stop within the grace period after the stop signal; re-queued"
        done += fail_and_requeue(study, trial, reason)
    return done


def _start(slot: Slot, head: list[str], storage_url: str, worker_args: list[str]) -> None:
    command = [
        sys.executable, "-m", "nas3d", *head,
        "--storage", storage_url,
        "--device", slot.device,
        "--worker-index", str(slot.index),
        *worker_args,
    ]
    logger.info("starting worker %d on %s", slot.index, slot.device)
    slot.process = subprocess.Popen(command, env=slot.env)
    slot.handled = False
    slot.started_at = time.monotonic()
