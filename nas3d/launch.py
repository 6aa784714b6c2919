"""Start and supervise worker processes: one per GPU slot, or N on the CPU.

Each worker is a separate ``nas3d worker`` process (its own CUDA context, its own heartbeat). GPU
workers see only their GPU (``CUDA_VISIBLE_DEVICES``), so ``cuda`` inside a worker is that GPU.
A worker that crashes is restarted (a few times per slot); SIGINT/SIGTERM are passed on to every
worker, which finishes or re-queues its trial and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nas3d.train import gpu_count, no_gpu_message
from nas3d.util import EXIT_USAGE

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

MAX_RESTARTS_PER_SLOT = 3


@dataclass
class Slot:
    index: int
    device: str  # "cuda" or "cpu"
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    handled: bool = False  # this process's exit has been dealt with


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
        return [
            Slot(i, "cuda", {**base, "CUDA_VISIBLE_DEVICES": str(gpu)})
            for i, gpu in enumerate(g for g in gpus for _ in range(workers_per_gpu))
        ]
    # Split the cores between CPU workers: oversubscribed threads make every trial slower.
    threads = str(max(1, (os.cpu_count() or 1) // cpu_workers))
    env = {**base, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return [Slot(i, "cpu", env) for i in range(cpu_workers)]


def worker_arguments(heartbeat_interval: int, grace_period: int | None, progress: bool) -> list[str]:
    """The ``nas3d worker`` flags every launched worker gets."""
    extra = ["--heartbeat-interval", str(heartbeat_interval)]
    if grace_period is not None:
        extra += ["--grace-period", str(grace_period)]
    return [*extra, "--progress"] if progress else extra


def launch(study_name: str, storage_url: str, slots: list[Slot], worker_args: list[str] = ()) -> int:
    """Run one worker per slot until all finish; returns 0 when every worker ended cleanly."""
    stopping = False

    def forward(signum: int, _frame) -> None:
        nonlocal stopping
        stopping = True
        for slot in slots:
            if slot.process and slot.process.poll() is None:
                slot.process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for slot in slots:
            _start(slot, study_name, storage_url, list(worker_args))
        while not all(slot.handled for slot in slots):
            time.sleep(0.2)
            for slot in slots:
                code = slot.process.poll() if slot.process else None
                if code is None or slot.handled:
                    continue
                slot.handled = True
                if code in (0, EXIT_USAGE) or stopping:
                    continue
                if slot.restarts < MAX_RESTARTS_PER_SLOT:
                    slot.restarts += 1
                    logger.warning(
                        "worker %d exited with code %d; restarting (%d/%d)",
                        slot.index, code, slot.restarts, MAX_RESTARTS_PER_SLOT,
                    )
                    _start(slot, study_name, storage_url, list(worker_args))
                else:
                    logger.error("worker %d exited with code %d; giving up on this slot", slot.index, code)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [s.process.returncode for s in slots if s.process]
    return 0 if all(c == 0 for c in codes) else 1


def _start(slot: Slot, study_name: str, storage_url: str, worker_args: list[str]) -> None:
    command = [
        sys.executable, "-m", "nas3d", "worker",
        "--study-name", study_name,
        "--storage", storage_url,
        "--device", slot.device,
        "--worker-index", str(slot.index),
        *worker_args,
    ]
    logger.info("starting worker %d on %s", slot.index, slot.device)
    slot.process = subprocess.Popen(command, env=slot.env)
    slot.handled = False
