"""Trials per hour with 1 vs 2 worker processes on the smoke study; target: 2 workers >= 1.8x one.

What runs. For each configuration (``--workers 1,2``) and each repeat, a fresh storage (SQLite file,
or a fresh PostgreSQL database with ``--backends postgresql``) gets its own study, made by
``nas3d.study.create_study`` from ``studies/smoke.toml`` (synthetic 28³ data, narrowed space, 2 epochs
per trial) with the budget set to ``--trials``. Then real worker processes run it to the end:
``python -m nas3d worker --device cpu`` once per worker (``--mode worker``, the default), each pinned
to ``--threads`` CPU threads (OMP_NUM_THREADS/MKL_NUM_THREADS, which also set torch's intra-op
threads; CUDA hidden), or the real launcher ``python -m nas3d launch --cpu --workers N``
(``--mode launch``; note the launcher gives each worker cpu_count // N threads itself, so there one
worker gets all the cores and ``--threads`` does not apply).

Same work for both configurations. With ``--arch-mix enqueue`` (the default) the study is given the
same ``--trials`` distinct architectures up front (drawn by the real ``sample_architecture`` with a
RandomSampler of the repeat's seed, queued with ``study.enqueue_trial``; the budget counts them
exactly). Each configuration then trains exactly the same networks, so the ratio measures parallel
scaling, not which architectures a run happened to draw; the sampler still runs on every ask, as
it does for any trial. With ``--arch-mix sample`` the study's own sampler draws (``--sampler``,
default ``random``: TPE's proposals depend on the order in which the workers finish, so the mix would
differ between the two configurations; random with the same ``study.sampler_seed`` draws from the
same distribution, though worker k adds k to the seed, so two workers do not draw the very same
list). Either way the seed is ``--seed`` + the repeat's index, the same for both configurations, and
duplicates (trials with user attr ``duplicate_of``, not retrained) are counted apart.

What is measured. Wall time from the first trial's ``datetime_start`` to the last trial's
``datetime_complete``, read from storage: process start-up (imports, data loading) is excluded.
The wall time of the whole run, start-up and shut-down included, is printed too (a worker with
nothing left to do waits for its peer's last trial, rechecking every 5 s, before it exits, so this
figure is coarse). Trials/hour = finished trials / wall; trained/hour counts only trials that were
trained (COMPLETE, not duplicates). ``busy`` is the sum of the trials' durations over
workers x wall: below 100 % are gaps between trials (the study lock, storage, start-up skew, a worker
idle at the end because the budget does not split evenly). ``train`` is the mean of the trials' own
``train_seconds``; ``trial`` the mean duration in storage (training + costs + storage work), so
their gap is the per-trial overhead, and a ``train`` that grows with 2 workers means the workers
compete for cores or memory bandwidth.

Reading the output: one row per run, then trials/hour per configuration summed over repeats and the
ratio of the largest configuration to one worker against the 1.8x target. Run on a quiet machine
with at least as many free cores as workers x threads; on a loaded machine the ratio says more
about the load than about nas3d. Nothing is asserted.

    python bench/worker_scaling.py                          # SQLite, 12 trials, 1 vs 2 workers
    python bench/worker_scaling.py --repeats 3 --trials 16 --backends sqlite,postgresql
    python bench/worker_scaling.py --trials 4 --set train.max_epochs=1   # quick check
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from _common import (
    REPO,
    default_pg_admin_url,
    format_table,
    parse_backends,
    parse_list,
    redact,
    scratch_storage,
    smoke_config,
)
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from nas3d.data import ensure_file
from nas3d.space import SearchSpace, sample_architecture
from nas3d.storages import make_storage
from nas3d.study import DIRECTIONS, create_study

TARGET_RATIO = 1.8


def architecture_plan(n: int, space: SearchSpace, seed: int) -> list[dict[str, Any]]:
    """Parameters of ``n`` distinct architectures (by hash), drawn as a RandomSampler trial would."""
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed))
    seen: set[str] = set()
    plan = []
    for _ in range(200 * n):
        trial = study.ask()
        arch = sample_architecture(trial, space)
        if arch.arch_hash() not in seen:
            seen.add(arch.arch_hash())
            plan.append(dict(trial.params))
            if len(plan) == n:
                return plan
    raise ValueError(f"the space holds fewer than {n} distinct architectures that a random draw finds")


def worker_env(threads: int, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NAS3D_STORAGE", "NAS3D_ARTIFACTS")}
    env.update(
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
        NAS3D_HOME=str(home), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    return env


def run_once(
    backend: str, workers: int, seed: int, repeat: int, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    name = f"scaling-{workers}w-r{repeat}"
    overrides: dict[str, object] = {
        "study.name": name, "study.n_trials": args.trials, "study.sampler": args.sampler,
        "study.sampler_seed": seed, "data.root": str(workdir / "data"),
    }
    overrides.update(args.overrides)
    config = smoke_config(**overrides)
    ensure_file(config.data)  # written once, before any timing
    with scratch_storage(backend, workdir, args.postgres_url, tag=f"{workers}w_") as url:
        storage = make_storage(url)
        study = create_study(config, storage)
        if args.arch_mix == "enqueue":
            for params in architecture_plan(args.trials, config.space, seed):
                study.enqueue_trial(params)
        env = worker_env(args.threads, workdir / "home")
        log_path = workdir / f"{name}-{backend}.log"
        base = [sys.executable, "-m", "nas3d"]
        if args.mode == "launch":
            commands = [[*base, "launch", "--study-name", name, "--storage", url, "--workers", str(workers),
                         "--cpu"]]
        else:
            commands = [[*base, "worker", "--study-name", name, "--storage", url, "--device", "cpu",
                         "--worker-index", str(i)] for i in range(workers)]
        with open(log_path, "w") as log:
            started = time.monotonic()
            processes = [subprocess.Popen(c, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
                         for c in commands]
            try:
                codes = [p.wait(timeout=max(1.0, args.timeout - (time.monotonic() - started)))
                         for p in processes]
            except subprocess.TimeoutExpired:
                for p in processes:
                    p.kill()
                    p.wait()
                raise RuntimeError(f"{name} on {backend}: workers still running after {args.timeout} s; "
                                   f"log: {log_path}") from None
            wall_total = time.monotonic() - started
        if any(codes):
            tail = log_path.read_text().splitlines()[-15:]
            detail = "\n".join(tail)
            raise RuntimeError(f"{name} on {backend}: worker exit codes {codes}; log tail:\n{detail}")
        trials = optuna.load_study(study_name=name, storage=make_storage(url)).get_trials(deepcopy=False)
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose()
    finished = [t for t in trials if t.state.is_finished()]
    if not finished:
        raise RuntimeError(f"{name} on {backend}: no finished trials")
    first = min(t.datetime_start for t in finished if t.datetime_start is not None)
    last = max(t.datetime_complete for t in finished if t.datetime_complete is not None)
    wall = (last - first).total_seconds()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished
                 if t.datetime_start and t.datetime_complete]
    trained = [t for t in finished if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    train_seconds = [t.user_attrs["train_seconds"] for t in trained if "train_seconds" in t.user_attrs]
    return {
        "backend": backend, "workers": workers, "repeat": repeat, "seed": seed,
        "trials": len(finished), "trained": len(trained),
        "duplicates": sum("duplicate_of" in t.user_attrs for t in finished),
        "pruned_failed": sum(t.state in (TrialState.PRUNED, TrialState.FAIL) for t in finished),
        "wall": wall, "wall_total": wall_total,
        "trial_mean": sum(durations) / len(durations),
        "train_mean": sum(train_seconds) / len(train_seconds) if train_seconds else float("nan"),
        "busy": sum(durations) / (workers * wall) if wall > 0 else float("nan"),
    }


def per_hour(count: float, seconds: float) -> float:
    return 3600.0 * count / seconds if seconds > 0 else float("nan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Trials/hour with 1 vs 2 nas3d worker processes on the smoke study (CPU).",
        epilog="See the module docstring for the method and how to read the output.",
    )
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    parser.add_argument("--trials", type=int, default=12, help="budget of each run (default 12)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per configuration; repeat r uses seed --seed + r (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="base sampler / architecture seed")
    parser.add_argument("--arch-mix", choices=("enqueue", "sample"), default="enqueue",
                        help="enqueue: the same distinct architectures in every configuration (default); "
                             "sample: let the study's sampler draw")
    parser.add_argument("--sampler", default="random", help="the study's sampler (default random)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker (default 1)")
    parser.add_argument("--mode", choices=("worker", "launch"), default="worker",
                        help="worker: N `nas3d worker` processes (default); launch: `nas3d launch --cpu`")
    parser.add_argument("--backends", default="sqlite", help="sqlite and/or postgresql (default sqlite)")
    parser.add_argument("--postgres-url", default=default_pg_admin_url(),
                        help="PostgreSQL server URL of a user that may CREATE DATABASE (default "
                             "$NAS3D_TEST_POSTGRES_URL or the local server); a fresh nas3d_bench_* database "
                             "per run, dropped afterwards")
    parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                        help="override a smoke.toml value, e.g. --set train.max_epochs=4 (repeatable)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take (default 1800)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configs = parse_list(args.workers, int, "--workers")
        backends = parse_backends(args.backends)
        args.overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects TABLE.KEY=VALUE, but got {item!r}")
            args.overrides[key.strip()] = value.strip()
        if args.trials < 1 or args.repeats < 1 or args.threads < 1 or min(configs) < 1:
            raise ValueError("--trials, --repeats, --threads and --workers must be >= 1")
    except ValueError as e:
        print(f"worker_scaling: error: {e}", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    baseline = min(configs)

    rows = []
    with tempfile.TemporaryDirectory(prefix="nas3d-bench-") as tmp:
        workdir = Path(tmp)
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                               env=worker_env(args.threads, workdir / "home"), capture_output=True, text=True)
        threads_seen = probe.stdout.strip() or "?"
        threads = threads_seen if args.mode == "worker" else "set by the launcher"
        print(f"smoke study, {args.trials} trials per run, arch mix {args.arch_mix!r}, sampler "
              f"{args.sampler!r}, mode {args.mode!r}, torch threads per worker {threads}, "
              f"{os.cpu_count()} CPUs; overrides {args.overrides or 'none'}")
        if "postgresql" in backends:
            print(f"postgresql server: {redact(args.postgres_url)}")
        for backend in backends:
            for repeat in range(args.repeats):
                # alternate the order so drift in machine load hits every configuration alike
                order = configs if repeat % 2 == 0 else list(reversed(configs))
                for workers in order:
                    row = run_once(backend, workers, args.seed + repeat, repeat, args, workdir)
                    rows.append(row)
                    print(f"  {backend} {workers} worker(s), repeat {repeat}: {row['trials']} trials in "
                          f"{row['wall']:.1f} s ({row['wall_total']:.1f} s with start-up)", flush=True)

    print()
    headers = ["backend", "workers", "rep", "trials", "trained", "dup", "wall s", "total s", "trials/h",
               "trained/h", "trials/h incl. start", "trial s", "train s", "busy"]
    table = [
        [r["backend"], r["workers"], r["repeat"], r["trials"], r["trained"], r["duplicates"],
         f"{r['wall']:.1f}", f"{r['wall_total']:.1f}", f"{per_hour(r['trials'], r['wall']):.0f}",
         f"{per_hour(r['trained'], r['wall']):.0f}", f"{per_hour(r['trials'], r['wall_total']):.0f}",
         f"{r['trial_mean']:.2f}", f"{r['train_mean']:.2f}", f"{100 * r['busy']:.0f}%"]
        for r in sorted(rows, key=lambda r: (r["backend"], r["workers"], r["repeat"]))
    ]
    print(format_table(headers, table))
    print()
    verdicts = []
    for backend in backends:
        summary = {}
        for workers in configs:
            runs = [r for r in rows if r["backend"] == backend and r["workers"] == workers]
            wall, wall_total = sum(r["wall"] for r in runs), sum(r["wall_total"] for r in runs)
            summary[workers] = (per_hour(sum(r["trials"] for r in runs), wall),
                                per_hour(sum(r["trained"] for r in runs), wall),
                                per_hour(sum(r["trials"] for r in runs), wall_total))
            print(f"{backend}, {workers} worker(s): {summary[workers][0]:.0f} trials/h, "
                  f"{summary[workers][1]:.0f} trained/h, {summary[workers][2]:.0f} trials/h with start-up")
        for workers in configs:
            if workers == baseline:
                continue
            ratio = summary[workers][0] / summary[baseline][0]
            base_trained = summary[baseline][1]
            trained_ratio = summary[workers][1] / base_trained if base_trained else float("nan")
            total_ratio = summary[workers][2] / summary[baseline][2]
            print(f"{backend}: {workers} vs {baseline} worker(s): {ratio:.2f}x trials/h, "
                  f"{trained_ratio:.2f}x trained/h, {total_ratio:.2f}x with start-up")
            if workers == max(configs):
                met = "meets" if ratio >= TARGET_RATIO else "misses"
                verdicts.append(f"{backend} {ratio:.2f}x ({met})")
    if verdicts:
        print(f"verdict, {max(configs)} vs {baseline} worker(s), trials/h vs the {TARGET_RATIO:g}x target: "
              + "; ".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
