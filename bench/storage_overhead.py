"""Per-trial storage + sampler overhead of a nas3d worker, as a share of a trial's training time.

Target: at most 1 % of a typical trial's training time with 2,000 finished trials in the study.

What runs. For each backend (SQLite file, PostgreSQL database) and each study size N, a fresh storage
gets a study made by ``nas3d.study.create_study`` from ``studies/smoke.toml`` with the seed study's
default search space (the ``[space]`` table reset to ``SearchSpace()``: 15 ops, S/C in {1, 2},
F in {8, 16, 32}) and its sampler (``tpe``: ``make_sampler``'s multivariate/group/constant-liar TPE,
``--sampler`` to change). The study is filled with N finished trials through ``study.add_trials``:
architectures drawn by the real ``nas3d.space.sample_architecture`` on a RandomSampler, with the user
attrs and system attrs the real objective writes (arch, arch_json, arch_hash, params, thop_macs,
val_acc, train_seconds, epochs, best_epoch, device; ``constraints``; ``duplicate_of`` on repeats;
over-``max_params`` architectures PRUNED with a ``failure_reason``, as the objective prunes them).
Objective values are plausible fakes: FLOPs and params from an analytic count of the convolutions,
val_auc a noisy function of FLOPs. smoke.toml's ``[constraints] max_params = 1e6`` is kept, so the
sampler's constraint handling is part of the cost (the dataset studies set no constraint by default).

Then the real worker loop runs, in this process, twice per cell, each time on a freshly filled study:
``nas3d.worker.run_worker`` (fresh storage object and cold cache, like a newly started worker process)
with the study's budget set to N + 1 + K, so it trains exactly 1 + K trials. Only training is
replaced: ``nas3d.objective.train_trial`` becomes a stand-in that does ``--standin-seconds`` of real torch
CPU work (many small ops on one thread, as a training loop's host thread launches kernels) and returns
a made-up result. Storage is never mocked.

**In turn** (``--no-claim-ahead``): the worker samples each trial between trainings. Per trained trial
(free trials it decided on the way, duplicates for instance, included), timers wrapped around the real
calls give:

    lock     the study lock (file lock for SQLite, advisory lock for PostgreSQL)
    stale    optuna.storages.fail_stale_trials (the worker's call)
    budget   nas3d.budget.budget_state
    ask      study.ask(): trial creation (or popping a queued trial) and the sampler's before_trial
    suggest  nas3d.space.sample_architecture: one param write per choice, and the sampling itself.
             Optuna 5 computes a trial's relative (multivariate) params lazily, on its first
             suggest, so TPE's main work (one Parzen fit per parameter group over all trials) is here
    dup      TrialObjective._earlier_evaluation (duplicate lookup)
    rest     everything else of the loop and the objective: the orphan check, the worker mark and
             first heartbeat, set_user_attr calls, the constraint write, study.tell, heartbeat
             thread start
    db+smp   sum of the above: the storage + sampler overhead the target is about
    sampler  of db+smp, the time inside the sampler's own methods (infer_relative_search_space,
             sample_relative, sample_independent, before_trial, after_trial; spread over ask,
             suggest and rest), the trial reads those methods make included
    costs    measure_costs (FLOPs on the meta device + thop on a CPU copy): per-trial CPU work that
             is not storage, shown apart; also build (model construction) and ckpt (checkpoint
             save + artifact upload + its user attr)

**Claiming ahead** (the worker's default): the next trial's claim (everything above but the result
writes and ``tell``, plus ``measure_costs``) runs in the worker's claim process while the current
trial trains. What the
device still waits for is measured from the main thread's timeline: ``gap`` = idle time between the
end of one training and the start of the next; ``critical`` = the gap less the checkpoint upload and
the next model's build (both device work a trial needs either way), i.e. the storage and sampler time
left on the critical path (result attrs, ``tell``, and any wait for an unfinished claim); ``claim`` =
how long the claim took in its process; ``slow`` = how much longer the stand-in training took beside
a claim (median) than alone (median of as many runs of it, at least 5, right after the worker:
run-to-run drift of the machine would otherwise dominate). The claim process competes for a core and
memory bandwidth; a claim in a thread of the worker also competed for the GIL, and slowed this
stand-in by about the claim's own length (measured while the claim ran in a thread: 288 ms on SQLite,
222 ms on PostgreSQL at 2,000 trials). The share
compared with the target is (critical + slow) / trial seconds. The stand-in must outlast a claim (the
verdict says when one did not): a 20 s GPU trial outlasts a 0.5 s claim by far.

The first trial of a fresh worker reads every trial from the database (Optuna's ``_CachedStorage``
caches finished trials afterwards): it is reported apart as ``cold``; the table's means are over the
K warm trials that follow, the steady state of a long-running worker.

Typical trial time: ``--trial-seconds`` (default 20 s). That default is an estimate, not a
measurement: the seed OrganMNIST3D architecture costs 37.7 GFLOPs forward per 28³ sample, so ~29
TFLOP per epoch (forward + backward on 243 train samples, forward on 40 val); at an assumed ~60
TFLOP/s effective on an H100-class GPU in bf16 that is ~0.5 s per epoch, and ~40 of the 50 allowed
epochs gives ~20 s. ``--measure-trial`` replaces it with one real ``train_trial`` of that
architecture on synthetic 28³ data of OrganMNIST3D's search shape (243 train, 40 val, 11 classes)
with the seed budget (at most 50 epochs, patience 5, batch 128) on ``--device``: run it on the GPU
the workers use. On a CPU one epoch of that architecture takes minutes; ``--measure-max-epochs``
caps the run (a capped run is shorter, so the share it gives is an overestimate).

Reading the output: one row per backend and size in each table; in the first, ``share`` = db+smp /
trial seconds (sampling in turn); in the second, (critical + slow) / trial seconds (claiming ahead).
The verdict line compares the largest size's claim-ahead share with the 1 % target, per backend.
Run on a quiet machine: the
timings are wall-clock, so other load inflates them. Nothing is asserted.

    python bench/storage_overhead.py                                   # both backends, 100/1000/2000
    python bench/storage_overhead.py --measure-trial --device cuda     # ground the trial time on a GPU
    python bench/storage_overhead.py --backends sqlite --sizes 100 --repeats 2   # quick check
    python bench/storage_overhead.py --baseline-sampler random         # the study's TPE vs another

``--baseline-sampler NAME`` also measures every cell with another sampler, in the same run, and prints
the ratio of their db+smp times. ``optuna-tpe`` is Optuna's ``TPESampler`` built here with nas3d's
options: what ``tpe`` is since nas3d dropped its own faster copy (docs/samplers.md#tpe-optunas-own). It
replaces the sampler in this process only, so its claim-ahead rows still show the claim process's
sampler, the study's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from _common import (
    PhaseTimer,
    default_pg_admin_url,
    format_table,
    mean,
    parse_backends,
    parse_list,
    redact,
    scratch_storage,
    smoke_config,
)
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

import nas3d.claim_process
import nas3d.claims
import nas3d.objective
import nas3d.study
import nas3d.worker
from nas3d.architecture import Architecture
from nas3d.config import StudyConfig
from nas3d.data import DeviceData, Split, write_synthetic_npz
from nas3d.ops import OPS
from nas3d.records import RESULT_ATTRS
from nas3d.samplers import SAMPLERS, TPE_OPTIONS
from nas3d.seeds import seed_architectures
from nas3d.space import SearchSpace, sample_architecture
from nas3d.storages import make_storage
from nas3d.study import DIRECTIONS, create_study
from nas3d.train import TrainConfig, TrainResult, train_trial

DEFAULT_TRIAL_SECONDS = 20.0
TARGET_SHARE = 0.01
STORAGE_PHASES = ("lock", "stale", "budget", "ask", "suggest", "dup", "rest")
OTHER_PHASES = ("costs", "build", "ckpt", "train")
SAMPLER_METHODS = ("infer_relative_search_space", "sample_relative", "sample_independent", "before_trial",
                   "after_trial")
# OrganMNIST3D at 28³: 972 train / 161 val samples, 11 classes; search uses a quarter of each.
ORGAN_TRAIN, ORGAN_VAL, ORGAN_CLASSES = 243, 40, 11
FAKE_DEVICE = "cuda:0 NVIDIA H100 80GB HBM3"


# --- filling a study with N plausible finished trials -----------------------------------------


@dataclass(frozen=True)
class PoolEntry:
    params: dict[str, Any]
    distributions: dict[str, BaseDistribution]
    arch: Architecture


def architecture_pool(n: int, space: SearchSpace, seed: int) -> list[PoolEntry]:
    """``n`` architectures drawn by the real ``sample_architecture`` on an in-memory RandomSampler study."""
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed))
    pool = []
    for _ in range(n):
        trial = study.ask()
        arch = sample_architecture(trial, space)
        pool.append(PoolEntry(dict(trial.params), dict(trial.distributions), arch))
    return pool


_KERNEL = {op: int(m.group(1)) for op in OPS if (m := re.search(r"conv(\d)", op))}


def estimated_costs(arch: Architecture, in_channels: int, num_classes: int, size: int) -> tuple[int, int]:
    """(FLOPs, params) counting the convolutions and classifier only; ``measure_costs`` takes ~0.1 s
    per architecture, too slow for thousands of filler trials, and the sampler only needs plausible
    values."""
    width, vol = arch.initial_filters, size**3
    flops, params = 2 * in_channels * width * 27 * vol, in_channels * width * 27
    channels = width
    for stack in range(arch.stacks):
        width = arch.initial_filters * 2**stack
        if stack:
            vol //= 8
        for _ in range(arch.cells_per_stack):
            if channels != width:
                flops, params = flops + 2 * channels * width * vol, params + channels * width
            for op in arch.ops:
                k3 = _KERNEL[op] ** 3
                flops, params = flops + 2 * width * width * k3 * vol, params + width * width * k3
            channels = width
    return flops + 2 * channels * num_classes, params + channels * num_classes + num_classes


def filler_trials(pool: Sequence[PoolEntry], config: StudyConfig, seed: int) -> list[FrozenTrial]:
    """Finished trials as the objective would have left them (see the module docstring)."""
    rng = np.random.default_rng(seed)
    first_of: dict[str, tuple[int, FrozenTrial]] = {}  # arch hash -> (trial number, trial)
    out = []
    in_ch, classes, size = config.data.in_channels, config.data.num_classes, config.data.size
    for number, entry in enumerate(pool):
        arch = entry.arch
        arch_hash = arch.arch_hash()
        flops, params = estimated_costs(arch, in_ch, classes, size)
        attrs: dict[str, Any] = {
            "arch": arch.short_str(),
            "arch_json": arch.to_json(),
            "arch_hash": arch_hash,
            "params": params,
            "thop_macs": flops // 2,
            "device": FAKE_DEVICE,
        }
        system: dict[str, Any] = {}
        limits = config.constraints
        if limits.active:
            values = limits.evaluate(flops=flops, params=params)
            system["constraints"] = [float(v) for v in values.values()]
            if any(v > 0 for v in values.values()):
                attrs["failure_reason"] = "over budget (filler trial)"
                out.append(_create(TrialState.PRUNED, entry, None, attrs, system))
                continue
        if arch_hash in first_of:
            earlier_number, earlier = first_of[arch_hash]
            attrs["duplicate_of"] = earlier_number
            attrs["duplicate_values"] = earlier.values
            attrs.update({k: earlier.user_attrs[k] for k in RESULT_ATTRS if k in earlier.user_attrs})
            attrs["failure_reason"] = f"duplicate of trial {earlier_number} (filler trial)"
            out.append(_create(TrialState.PRUNED, entry, None, attrs, system))
            continue
        auc = 0.78 + 0.17 * (1 - math.exp(-flops / 2e9)) + rng.normal(0, 0.03)
        epochs = int(rng.integers(8, 51))
        attrs.update(
            val_acc=round(float(np.clip(auc - 0.15 + rng.normal(0, 0.03), 0.05, 0.99)), 4),
            train_seconds=round(float(rng.uniform(5, 60)), 3),
            epochs=epochs,
            best_epoch=max(1, epochs - 5),
        )
        trial = _create(TrialState.COMPLETE, entry, [float(np.clip(auc, 0.5, 0.999)), float(flops)],
                        attrs, system)
        first_of[arch_hash] = (number, trial)  # numbers: the study is empty before add_trials
        out.append(trial)
    return out


def _create(
    state: TrialState, entry: PoolEntry, values: list[float] | None, attrs: dict[str, Any],
    system: dict[str, Any],
) -> FrozenTrial:
    return optuna.trial.create_trial(
        state=state, params=entry.params, distributions=entry.distributions, values=values,
        user_attrs=attrs, system_attrs=system,
    )


# --- the real worker loop, instrumented -------------------------------------------------------


class StandinTraining:
    """Stands in for ``train_trial``: a fixed amount of real torch work on the CPU (about
    ``--train-seconds``), then a made-up result.

    Real work, not a sleep, so that a claim made ahead competes with it as it would with a training
    loop's host thread: its duration with and without a claim beside it is the
    slowdown the claim costs (the ``slow`` column).
    """

    def __init__(self, seconds: float) -> None:
        self.x = torch.randn(8, 8, 12, 12, 12)
        self.w = torch.randn(8, 8, 3, 3, 3, requires_grad=True)
        self.steps = 0
        if seconds > 0:
            started, probe = time.perf_counter(), 20
            self._work(probe)
            self.steps = max(1, round(seconds / ((time.perf_counter() - started) / probe)))

    def alone(self, runs: int = 5) -> float:
        """Median seconds of the stand-in with nothing beside it."""
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            self._work(self.steps)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def _work(self, steps: int) -> None:
        for _ in range(steps):  # many small ops, as a training loop launches kernels
            torch.nn.functional.conv3d(self.x, self.w, padding=1).square().mean().backward()

    def __call__(self, model: torch.nn.Module, data: DeviceData, config: TrainConfig, device: Any, *,
                 progress: bool = False, should_stop: Any = None, on_epoch: Any = None) -> TrainResult:
        self._work(self.steps)
        return TrainResult(val_auc=0.9, val_acc=0.8, val_loss=0.5, best_epoch=10, epochs_run=15,
                           train_seconds=0.0, samples_per_second=0.0, history=())


@contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


class _IterationRecorder:
    """Splits the worker loop's phase times into one record per trial (lock acquire → run_trial end)."""

    def __init__(self) -> None:
        self.timer = PhaseTimer()
        self.records: list[dict[str, float]] = []
        self._start: float | None = None

    def begin(self) -> None:
        if self._start is None:
            self.timer.take()  # drop anything timed between iterations (start-up)
            self._start = time.perf_counter()

    def end(self) -> None:
        assert self._start is not None
        total = time.perf_counter() - self._start
        phases = self.timer.take()
        phases["total"] = total
        self.records.append(phases)
        self._start = None


@contextmanager
def instrumented_worker(recorder: _IterationRecorder, standin: StandinTraining) -> Iterator[None]:
    """Wrap the real calls of ``run_worker`` (sampling between trials) in timers; replace only
    ``train_trial``."""
    timer = recorder.timer
    real_lock = nas3d.worker.study_lock
    real_run_trial = nas3d.worker.run_trial

    def study_lock(*args: Any, **kwargs: Any) -> Any:
        lock = real_lock(*args, **kwargs)
        acquire = lock.acquire

        def timed_acquire() -> None:
            recorder.begin()
            with timer.phase("lock"):
                acquire()

        lock.acquire = timed_acquire  # type: ignore[method-assign]
        return lock

    real_load_study = nas3d.worker.load_study

    def load_study(*args: Any, **kwargs: Any) -> Any:
        study, config = real_load_study(*args, **kwargs)
        sampler = study.sampler
        for method in SAMPLER_METHODS:  # nested inside the phases above: the "sampler" column
            setattr(sampler, method, timer.wrap("sampler", getattr(sampler, method)))
        return study, config

    def run_trial(*args: Any, **kwargs: Any) -> None:
        try:
            real_run_trial(*args, **kwargs)
        finally:
            recorder.end()

    with ExitStack() as stack:
        for target, name, value in (
            (nas3d.worker, "study_lock", study_lock),
            (nas3d.worker, "load_study", load_study),
            (nas3d.claims, "budget_state", timer.wrap("budget", nas3d.claims.budget_state)),
            (optuna.storages, "fail_stale_trials", timer.wrap("stale", optuna.storages.fail_stale_trials)),
            (nas3d.worker, "run_trial", run_trial),
            (optuna.Study, "ask", timer.wrap("ask", optuna.Study.ask)),
            (nas3d.objective, "sample_architecture",
             timer.wrap("suggest", nas3d.objective.sample_architecture)),
            (nas3d.objective, "measure_costs", timer.wrap("costs", nas3d.objective.measure_costs)),
            (nas3d.objective, "build_model", timer.wrap("build", nas3d.objective.build_model)),
            (nas3d.objective, "train_trial", timer.wrap("train", standin)),
            (nas3d.objective.TrialObjective, "_earlier_evaluation",
             timer.wrap("dup", nas3d.objective.TrialObjective._earlier_evaluation)),
            (nas3d.objective.TrialObjective, "_store_checkpoint",
             timer.wrap("ckpt", nas3d.objective.TrialObjective._store_checkpoint)),
        ):
            stack.enter_context(_patched(target, name, value))
        yield


@dataclass
class _Timeline:
    """What a claim-ahead worker's main thread did, in order, and how long its ahead claims took."""

    trains: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (start, end)
    builds: list[float] = dataclasses.field(default_factory=list)
    ckpts: list[float] = dataclasses.field(default_factory=list)
    claims: list[float] = dataclasses.field(default_factory=list)  # claims made ahead, in their process


@contextmanager
def instrumented_claim_ahead(timeline: _Timeline, standin: StandinTraining) -> Iterator[None]:
    """Record the real ``run_worker``'s timeline with claims made ahead (in its claim process); replace
    only ``train_trial``."""
    real_result = nas3d.claim_process.ClaimProcess.result

    def result(self: Any) -> Any:
        try:
            return real_result(self)
        finally:
            if not self._wait:  # a claim made ahead; its duration as the claim process measured it
                timeline.claims.append(self.last_seconds)

    def timed(into: list[float], fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into.append(time.perf_counter() - started)
        return call

    def train(*args: Any, **kwargs: Any) -> TrainResult:
        started = time.perf_counter()
        result = standin(*args, **kwargs)
        timeline.trains.append((started, time.perf_counter()))
        return result

    with ExitStack() as stack:
        for target, name, value in (
            (nas3d.claim_process.ClaimProcess, "result", result),
            (nas3d.objective, "train_trial", train),
            (nas3d.objective, "build_model", timed(timeline.builds, nas3d.objective.build_model)),
            (nas3d.objective.TrialObjective, "_store_checkpoint",
             timed(timeline.ckpts, nas3d.objective.TrialObjective._store_checkpoint)),
        ):
            stack.enter_context(_patched(target, name, value))
        yield


def claim_ahead_row(timeline: _Timeline, alone: float) -> dict[str, float]:
    """Per warm trial: the device's idle gap between two trainings, what of it is storage and sampler
    (the gap less the checkpoint upload and the next model's build), the claim made meanwhile, and
    how much longer training took beside it than ``alone``."""
    # The steady state: the worker claims the last trial in turn, not ahead (with one worker and one
    # trial left, a claim ahead could idle another worker), so the last gap and the last two trainings
    # (beside which nothing was claimed) are left out.
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(timeline.trains)][:-1]
    # checkpoint k closes gap k; build k + 1 opens training k + 1
    critical = [g - c - b for g, c, b in zip(gaps, timeline.ckpts, timeline.builds[1:], strict=False)]
    beside = [end - start for start, end in timeline.trains[:-2]]
    return {"gap": mean(gaps), "critical": mean(critical), "critical_max": max(critical),
            "claim": mean(timeline.claims), "claim_max": max(timeline.claims),
            "slow": statistics.median(beside) - alone}


#: --sampler / --baseline-sampler values: the study's samplers, and Optuna's own TPESampler with the
#: options nas3d's TPE uses, built in this process (docs/samplers.md#tpe-optunas-own).
SAMPLER_CHOICES = (*SAMPLERS, "optuna-tpe")


@contextmanager
def sampler_variant(name: str) -> Iterator[None]:
    """Workers started inside get sampler ``name``; "optuna-tpe" replaces nas3d's TPE by Optuna's."""
    if name != "optuna-tpe":
        yield
        return

    def stock_tpe(settings: Any, **_: Any) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(**TPE_OPTIONS, seed=settings.sampler_seed)

    with _patched(nas3d.study, "make_sampler", stock_tpe):
        yield


def measure_backend_size(
    backend: str, n: int, pool: Sequence[PoolEntry], base: StudyConfig, args: argparse.Namespace,
    workdir: Path, sampler: str, standin: StandinTraining,
) -> dict[str, Any]:
    """Fill a fresh study with ``n`` trials and run 1 + K real worker iterations on it, sampling
    between trials; then the same on another fresh study with claims made ahead (the default)."""
    recorder = _IterationRecorder()
    fill_seconds, measured = _run_worker_on_filled_study(
        backend, n, pool, base, args, workdir, sampler, claim_ahead=False,
        instrument=instrumented_worker(recorder, standin),
    )
    if len(recorder.records) != 1 + args.repeats:  # one record per trained trial, free ones inside it
        raise RuntimeError(f"{backend} N={n}: timed {len(recorder.records)} trained trials, expected "
                           f"{1 + args.repeats}")
    cold, warm = recorder.records[0], recorder.records[1:]
    # What the measured trials turned out to be: trained, duplicate (not retrained), pruned (over budget).
    outcome = {"T": 0, "D": 0, "P": 0, "F": 0}
    for t in measured[1:]:
        if "duplicate_of" in t.user_attrs:  # recorded as PRUNED, but counted apart
            outcome["D"] += 1
        else:
            outcome[{TrialState.PRUNED: "P", TrialState.FAIL: "F"}.get(t.state, "T")] += 1
    row: dict[str, Any] = {"backend": backend, "n": n, "using": sampler, "fill_seconds": fill_seconds,
                           "outcome": " ".join(f"{k}{v}" for k, v in outcome.items() if v)}
    for phase in (*STORAGE_PHASES, *OTHER_PHASES, "sampler", "total"):
        if phase != "rest":
            row[phase] = mean([r.get(phase, 0.0) for r in warm])
    row["rest"] = mean([_rest(r) for r in warm])
    row["db_sampler"] = sum(row[p] for p in STORAGE_PHASES)
    row["cold_db_sampler"] = sum(cold.get(p, 0.0) for p in STORAGE_PHASES if p != "rest") + _rest(cold)
    row["db_sampler_max"] = max(sum(r.get(p, 0.0) for p in STORAGE_PHASES if p != "rest") + _rest(r)
                                for r in warm)
    timeline = _Timeline()
    _run_worker_on_filled_study(backend, n, pool, base, args, workdir, sampler, claim_ahead=True,
                                instrument=instrumented_claim_ahead(timeline, standin))
    row.update(claim_ahead_row(timeline, alone=standin.alone(runs=max(5, args.repeats))))
    return row


def _run_worker_on_filled_study(
    backend: str, n: int, pool: Sequence[PoolEntry], base: StudyConfig, args: argparse.Namespace,
    workdir: Path, sampler: str, *, claim_ahead: bool, instrument: Any,
) -> tuple[float, list[FrozenTrial]]:
    """A fresh storage, a study of ``n`` filler trials and a budget of 1 + K more, then the real worker
    loop (instrumented) until the budget is spent; returns the fill time and the trials it ran."""
    mode = "ahead" if claim_ahead else "inturn"
    name = f"overhead-{backend}-{n}-{sampler}-{mode}"
    named = dataclasses.replace(base, study=dataclasses.replace(base.study, name=name))
    filler = filler_trials(pool[:n], named, seed=args.seed)
    # The budget counts evaluated architectures, not duplicates: leave room for exactly 1 + K more.
    evaluated = sum("duplicate_of" not in t.user_attrs for t in filler)
    config = dataclasses.replace(
        base, study=dataclasses.replace(base.study, name=name, n_trials=evaluated + 1 + args.repeats)
    )
    with scratch_storage(backend, workdir, args.postgres_url, tag=f"{n}_") as url:
        study = create_study(config, make_storage(url))
        started = time.perf_counter()
        study.add_trials(filler)
        fill_seconds = time.perf_counter() - started
        del study
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with instrument, sampler_variant(sampler):
                ran = nas3d.worker.run_worker(name, url, device="cpu", claim_ahead=claim_ahead)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        # Duplicates proposed by the sampler are free, so a run may take more than 1 + K trials.
        if ran < 1 + args.repeats:
            raise RuntimeError(f"{backend} N={n} ({mode}): ran {ran} trials, expected >= {1 + args.repeats}")
        final = make_storage(url)
        measured = optuna.load_study(study_name=name, storage=final).get_trials(deepcopy=False)[n:]
        if hasattr(final, "engine"):
            final.engine.dispose()
    return fill_seconds, measured


def _ahead_cost(row: dict[str, Any]) -> float:
    """What claiming ahead still costs the device per trial: the storage and sampler work left between
    trainings, plus the slowdown of training beside the claim process (never credited below zero)."""
    return row["critical"] + max(0.0, row["slow"])


def _rest(record: dict[str, float]) -> float:
    named = sum(v for k, v in record.items() if k not in ("total", "sampler"))  # sampler is nested
    return max(0.0, record["total"] - named)


# --- a real trial, to ground the trial time ---------------------------------------------------


def measure_trial(device: str, max_epochs: int | None) -> TrainResult:
    """One ``train_trial`` of the seed OrganMNIST3D architecture on synthetic data of its search shape."""
    arch = seed_architectures()["organmnist3d"]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_npz(
            Path(tmp) / "organ-shape.npz", num_classes=ORGAN_CLASSES, n_train=ORGAN_TRAIN, n_val=ORGAN_VAL,
            n_test=ORGAN_CLASSES, size=28, seed=0,
        )
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    splits = {s: Split.from_arrays(arrays[f"{s}_images"], arrays[f"{s}_labels"], task="multi-class",
                                   device=device) for s in ("train", "val")}
    data = DeviceData(name="synthetic-organmnist3d-shape", num_classes=ORGAN_CLASSES, in_channels=1, size=28,
                      train=splits["train"], val=splits["val"], test=None)
    config = TrainConfig() if max_epochs is None else TrainConfig(max_epochs=max_epochs)
    model = nas3d.objective.build_model(arch, 1, ORGAN_CLASSES).to(device)
    return train_trial(model, data, config, device)


# --- the command ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Per-trial storage + sampler overhead of the worker loop vs a trial's training time.",
        epilog="See the module docstring for the method and how to read the table.",
    )
    parser.add_argument("--backends", default="sqlite,postgresql", help="sqlite and/or postgresql")
    parser.add_argument("--sizes", default="100,1000,2000", help="finished trials in the study before timing")
    parser.add_argument("--repeats", type=int, default=8,
                        help="warm trials timed per backend and size (after one cold trial); default 8")
    parser.add_argument("--sampler", default="tpe", choices=SAMPLER_CHOICES, help="the study's sampler")
    parser.add_argument("--baseline-sampler", choices=SAMPLER_CHOICES,
                        help="also measure each cell with this sampler, in the same run, and print the ratio")
    parser.add_argument("--seed", type=int, default=0, help="seed of the filler trials")
    parser.add_argument("--postgres-url", default=default_pg_admin_url(),
                        help="PostgreSQL server URL of a user that may CREATE DATABASE (default "
                             "$NAS3D_TEST_POSTGRES_URL or postgresql+psycopg://postgres@127.0.0.1:5432/"
                             "postgres); a fresh nas3d_bench_* database is made per measurement and dropped")
    parser.add_argument("--trial-seconds", type=float, default=DEFAULT_TRIAL_SECONDS,
                        help=f"typical trial training time in seconds (default {DEFAULT_TRIAL_SECONDS:g}: an "
                             "estimate for the seed OrganMNIST3D architecture on an H100-class GPU, see the "
                             "module docstring)")
    parser.add_argument("--measure-trial", action="store_true",
                        help="measure one real trial of the seed OrganMNIST3D architecture (synthetic data, "
                             "search shape, seed budget) on --device and use its time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for --measure-trial (default cuda if available, else cpu)")
    parser.add_argument("--measure-max-epochs", type=int, default=None,
                        help="cap --measure-trial's epochs (quick check; default: the seed's 50)")
    parser.add_argument("--standin-seconds", type=float, default=1.0,
                        help="CPU work standing in for each measured trial's training (default 1 s: longer "
                             "than a claim at 2,000 trials, so a claim made ahead can finish beside it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: one host thread, as a worker driving a GPU has)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        backends = parse_backends(args.backends)
        sizes = sorted(set(parse_list(args.sizes, int, "--sizes")))
    except ValueError as e:
        print(f"storage_overhead: error: {e}", file=sys.stderr)
        return 2
    if args.repeats < 1 or sizes[0] < 0:
        print("storage_overhead: error: --repeats must be >= 1 and --sizes >= 0", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # set_metric_names, heartbeat

    trial_seconds, trial_source = args.trial_seconds, "--trial-seconds"
    if args.measure_trial:
        result = measure_trial(args.device, args.measure_max_epochs)
        capped = args.measure_max_epochs is not None and result.epochs_run >= args.measure_max_epochs
        print(f"measured trial: seed organmnist3d architecture on {args.device}, {ORGAN_TRAIN} train / "
              f"{ORGAN_VAL} val samples: {result.train_seconds:.2f} s for {result.epochs_run} epochs "
              f"({result.train_seconds / result.epochs_run:.3f} s/epoch, best epoch {result.best_epoch})"
              + (" [capped by --measure-max-epochs: an underestimate of a full trial]" if capped else ""))
        trial_seconds, trial_source = result.train_seconds, f"measured on {args.device}"

    with tempfile.TemporaryDirectory(prefix="nas3d-bench-") as tmp:
        workdir = Path(tmp)
        # Where run_worker's data and (PostgreSQL) artifacts go: inside the scratch folder.
        os.environ["NAS3D_HOME"] = str(workdir / "home")
        os.environ["NAS3D_ARTIFACTS"] = str(workdir / "artifacts")
        os.environ.pop("NAS3D_STORAGE", None)
        # The study's sampler gets another seed than the filler pool: a RandomSampler with the same
        # seed would replay the pool and propose nothing but duplicates.
        study_sampler = "tpe" if args.sampler == "optuna-tpe" else args.sampler
        base = smoke_config(**{"data.root": str(workdir / "data"), "study.sampler": study_sampler,
                               "study.sampler_seed": args.seed + 1})
        base = dataclasses.replace(base, space=SearchSpace())
        pool = architecture_pool(sizes[-1], base.space, seed=args.seed)
        # The first FlopCounterMode run in a process costs ~1 s once (a worker pays it on its first
        # trial); pay it here so it does not land in whichever warm trial first trains.
        nas3d.objective.measure_costs(pool[0].arch, base.data.in_channels, base.data.num_classes,
                                      base.data.size)
        standin = StandinTraining(args.standin_seconds)
        variants = [args.sampler, *([args.baseline_sampler] if args.baseline_sampler else [])]
        print(f"study: smoke.toml with the default search space, sampler {' vs '.join(variants)}; "
              f"{args.repeats} warm trials per cell after 1 cold; trial time {trial_seconds:.2f} s "
              f"({trial_source}); torch threads {torch.get_num_threads()}")
        if "postgresql" in backends:
            print(f"postgresql server: {redact(args.postgres_url)}")
        rows = []
        for backend in backends:
            for n in sizes:
                for variant in variants:  # one after the other per cell, so drift hits both alike
                    study_variant = "tpe" if variant == "optuna-tpe" else variant
                    settings = dataclasses.replace(base.study, sampler=study_variant)
                    cell = dataclasses.replace(base, study=settings)
                    row = measure_backend_size(backend, n, pool, cell, args, workdir, variant, standin)
                    rows.append(row)
                    print(f"  {backend} N={n} {variant}: filled in {row['fill_seconds']:.1f} s, "
                          f"db+sampler {row['db_sampler'] * 1e3:.1f} ms/trial in turn, "
                          f"{row['critical'] * 1e3:.1f} ms claiming ahead", flush=True)

    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    headers = ["backend", "N", "using", *STORAGE_PHASES, "db+smp", "sampler", "max", "share", "cold", "costs",
               "build", "ckpt", "trials"]
    table = [
        [r["backend"], r["n"], r["using"], *(ms(r[p]) for p in STORAGE_PHASES), ms(r["db_sampler"]),
         ms(r["sampler"]), ms(r["db_sampler_max"]), f"{100 * r['db_sampler'] / trial_seconds:.2f}%",
         ms(r["cold_db_sampler"]), ms(r["costs"]), ms(r["build"]), ms(r["ckpt"]), r["outcome"]]
        for r in rows
    ]
    print()
    print("mean milliseconds per warm trial (sampler: part of db+smp spent in the sampler; max: slowest")
    print(f"warm trial; cold: first trial of a fresh worker; share: db+smp / {trial_seconds:.2f} s trial;")
    print("costs/build/ckpt: CPU work outside db+smp; trials: warm trials trained T, duplicate D, pruned P,")
    print("failed F)")
    print(format_table(headers, table))
    if args.baseline_sampler:
        for backend in backends:
            ratios = []
            for n in sizes:
                cell_rows = {r["using"]: r for r in rows if (r["backend"], r["n"]) == (backend, n)}
                ours, baseline = cell_rows[args.sampler], cell_rows[args.baseline_sampler]
                ratios.append(f"N={n} {baseline['db_sampler'] / ours['db_sampler']:.2f}x")
            print(f"{backend}: db+smp of {args.baseline_sampler} / {args.sampler}: " + ", ".join(ratios))
    print()
    print("claiming ahead (the worker's default): mean milliseconds per warm trial. gap: the device idle")
    print("between two trainings; critical: of it, storage and sampler (gap less checkpoint upload and")
    print("model build); claim: the next trial's claim, made in the claim process during training (max:")
    print(f"slowest); slow: how much longer the {args.standin_seconds:g} s stand-in training took beside a "
          "claim than alone (medians);")
    print("share: (critical + slow) / trial; in turn / ahead: db+smp / (critical + slow)")
    ahead_headers = ["backend", "N", "using", "in turn db+smp", "gap", "critical", "max", "claim",
                     "claim max", "slow", "share", "in turn / ahead"]
    ahead_table = [
        [r["backend"], r["n"], r["using"], ms(r["db_sampler"]), ms(r["gap"]), ms(r["critical"]),
         ms(r["critical_max"]), ms(r["claim"]), ms(r["claim_max"]), ms(r["slow"]),
         f"{100 * _ahead_cost(r) / trial_seconds:.2f}%", f"{r['db_sampler'] / _ahead_cost(r):.1f}x"]
        for r in rows
    ]
    print(format_table(ahead_headers, ahead_table))
    largest = sizes[-1]
    verdicts = []
    for backend in backends:
        r = next(r for r in rows
                 if r["backend"] == backend and r["n"] == largest and r["using"] == args.sampler)
        share, in_turn = _ahead_cost(r) / trial_seconds, r["db_sampler"] / trial_seconds
        fits = "" if r["claim_max"] < args.standin_seconds else " [a claim outlasted the stand-in training]"
        meets = "meets" if share <= TARGET_SHARE else "misses"
        verdicts.append(f"{backend} {100 * share:.2f}% claiming ahead ({meets}; in turn "
                        f"{100 * in_turn:.2f}%){fits}")
    print(f"verdict at N={largest} vs the {100 * TARGET_SHARE:g}% target: " + "; ".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
