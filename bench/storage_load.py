"""How many workers one PostgreSQL (directly, and through PgBouncer) serves: N simulated workers.

What runs. For each target (``direct``: PostgreSQL; ``pgbouncer``: the same server through a PgBouncer
in transaction mode that this script starts; ``direct-prepared``: direct with psycopg's prepared
statements on, ``?prepare_threshold=5``, the baseline for nas3d's default of turning them off) and
each N, a fresh database gets the smoke study (``studies/smoke.toml``) with the seed study's full
search space (so duplicates stay rare) and a budget of N × ``--trials-per-worker``. N worker processes
(forked, after torch and nas3d are imported, so they share those pages) then run the real worker loop,
``nas3d.worker.run_worker``: the study lock, stale-trial check, budget count, ``study.ask``, the real
define-by-run sampling (TPE), the duplicate lookup, the user attrs and constraints, the heartbeat and
``study.tell``. Only the trial's work is replaced: ``measure_costs``, ``build_model`` and
``train_trial`` become an analytic cost count and a sleep of ``--sleep`` seconds, and no checkpoint is
uploaded (the artifact store is not the database tier).

It prints, per target and N: trials/s (and its share of the ideal N / sleep), p50/p99 latency of
``study.ask`` and ``study.tell`` and of waiting for the study lock, the lock's hold time, errors
(worker exceptions, FAILED trials), whether the budget came out exact, RUNNING/WAITING trials left,
the number of PostgreSQL connections (backends) the database saw, and the PostgreSQL CPU time spent
per trial by the backends of the benchmark's database (read from /proc, so only on the database's
own host) and PgBouncer's.

Reading it. On a small machine the N Python workers compete with PostgreSQL for the CPU, so trials/s
at high N measures the machine. What carries over to a cluster, where every worker has its own host:
the database CPU per trial (one PostgreSQL core serves about 1 / that many trials per second) and the
lock hold time (the lock serialises ask: at most about 1 / hold trials per second per study).

    python bench/storage_load.py                                      # 8, 32, 64 workers, both targets
    python bench/storage_load.py --workers 64 --sleep 0.5 --targets direct,pgbouncer,direct-prepared
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository first on sys.path)

os.environ.setdefault("OMP_NUM_THREADS", "1")

import optuna  # noqa: E402
import psycopg  # noqa: E402
import torch  # noqa: E402
from _common import default_pg_admin_url, format_table, redact, scratch_storage, smoke_config  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from storage_overhead import estimated_costs  # noqa: E402

import nas3d.budget  # noqa: E402
import nas3d.objective  # noqa: E402
import nas3d.study  # noqa: E402
import nas3d.worker  # noqa: E402
from nas3d.costs import Costs  # noqa: E402
from nas3d.data import load_splits  # noqa: E402
from nas3d.space import SearchSpace  # noqa: E402
from nas3d.storages import _locks, make_storage  # noqa: E402
from nas3d.study import create_study  # noqa: E402
from nas3d.testing.servers import pgbouncer  # noqa: E402
from nas3d.train import TrainResult  # noqa: E402

TARGETS = ("direct", "pgbouncer", "direct-prepared")


# --- inside each worker process ---------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {"ask": [], "tell": [], "lock_wait": [], "lock_hold": []}
        self._held_since: float | None = None

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.samples[name].append(time.perf_counter() - start)

        return wrapper


def _sleep_objective(sleep_s: float) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    def costs(arch: Any, in_channels: int, num_classes: int, size: int) -> Costs:
        flops, params = estimated_costs(arch, in_channels, num_classes, size)
        return Costs(flops=flops, params=params, thop_macs=flops // 2)

    def build(arch: Any, in_channels: int, num_classes: int) -> torch.nn.Module:
        return torch.nn.Identity()

    def train(model: Any, data: Any, config: Any, device: Any, *, progress: bool = False) -> TrainResult:
        time.sleep(sleep_s)
        return TrainResult(val_auc=0.9, val_acc=0.8, val_loss=0.5, best_epoch=10, epochs_run=15,
                           train_seconds=sleep_s, samples_per_second=0.0, history=())

    return costs, build, train


class _NoArtifacts(nas3d.objective.TrialObjective):
    """The real objective, without a checkpoint upload (the artifact store is not under test)."""

    def __init__(self, config: Any, data: Any, device: Any, artifact_store: Any = None, **kw: Any) -> None:
        super().__init__(config, data, device, None, **kw)


def _worker(index: int, url: str, study_name: str, sleep_s: float, start: Any, results: Any) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"worker {index}: %(levelname)s %(message)s")
    recorder = _Recorder()
    costs, build, train = _sleep_objective(sleep_s)
    objective = nas3d.objective
    objective.measure_costs, objective.build_model, objective.train_trial = costs, build, train
    nas3d.worker.TrialObjective = _NoArtifacts
    optuna.Study.ask = recorder.timed("ask", optuna.Study.ask)
    optimize = optuna.study._optimize
    optimize._tell_with_warning = recorder.timed("tell", optimize._tell_with_warning)
    lock_cls = _locks._AdvisoryLock
    acquire, release = lock_cls.acquire, lock_cls.release

    def timed_acquire(self: Any) -> None:
        t0 = time.perf_counter()
        acquire(self)
        recorder.samples["lock_wait"].append(time.perf_counter() - t0)
        recorder._held_since = time.perf_counter()

    def timed_release(self: Any) -> None:
        if recorder._held_since is not None:
            recorder.samples["lock_hold"].append(time.perf_counter() - recorder._held_since)
            recorder._held_since = None
        release(self)

    lock_cls.acquire, lock_cls.release = timed_acquire, timed_release
    error = None
    ran = 0
    start.wait()
    try:
        ran = nas3d.worker.run_worker(study_name, url, device="cpu", worker_index=index)
    except BaseException as e:  # reported, not raised: the parent counts errors
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        traceback.print_exc()
    results.put({"index": index, "ran": ran, "error": error, **recorder.samples})


# --- the parent -------------------------------------------------------------------------------------


class _PgCpu:
    """CPU seconds of the PostgreSQL backends serving one database (from /proc, sampled while they
    live: a backend's time is gone once it exits), plus optionally one more process (PgBouncer)."""

    def __init__(self, admin_url: str, database: str, extra_pid: int | None = None) -> None:
        self.admin, self.database, self.extra_pid = admin_url, database, extra_pid
        self.seen: dict[int, float] = {}
        self.extra_start = self._cpu(extra_pid) if extra_pid else 0.0
        self.extra = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _cpu(pid: int) -> float | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _loop(self) -> None:
        libpq = make_url(self.admin).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(libpq, autocommit=True) as conn:
            while not self._stop.wait(0.25):
                rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.database,))
                for (pid,) in rows.fetchall():
                    cpu = self._cpu(pid)
                    if cpu is not None:
                        self.seen[pid] = max(cpu, self.seen.get(pid, 0.0))
                if self.extra_pid:
                    cpu = self._cpu(self.extra_pid)
                    if cpu is not None:
                        self.extra = cpu - (self.extra_start or 0.0)

    def __enter__(self) -> _PgCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def postgres(self) -> float:
        return sum(self.seen.values())


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_once(target: str, n: int, args: argparse.Namespace, bouncer: tuple[str, int] | None,
             workdir: Path) -> dict[str, Any]:
    with scratch_storage("postgresql", workdir, args.postgres_url, tag="load") as direct_url:
        database = make_url(direct_url).database
        name = f"load-{target}-{n}"
        budget = n * args.trials_per_worker
        config = smoke_config(
            **{"study.n_trials": budget, "study.name": name, "data.root": str(workdir / "data")}
        )
        config = dataclasses.replace(config, space=SearchSpace())  # the seed space: few duplicates
        storage = make_storage(direct_url)
        study = create_study(config, storage)
        storage.engine.dispose()  # no pooled connection may be inherited by the forked workers
        load_splits(config.data, "cpu", for_search=True)  # writes the synthetic npz once, before the fork
        if target == "pgbouncer":
            assert bouncer is not None
            url = make_url(bouncer[0]).set(database=database).render_as_string(hide_password=False)
        elif target == "direct-prepared":
            url = direct_url + "?prepare_threshold=5"
        else:
            url = direct_url
        ctx = mp.get_context("fork")
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(i, url, name, args.sleep, start, results))
                 for i in range(n)]
        for p in procs:
            p.start()
        time.sleep(1.0)  # let the forks settle before timing
        with _PgCpu(args.postgres_url, database, bouncer[1] if target == "pgbouncer" else None) as cpu:
            t0 = time.perf_counter()
            start.set()
            reports = [results.get(timeout=args.timeout) for _ in procs]
            wall = time.perf_counter() - t0
            time.sleep(0.3)  # one more sample of the backends (workers exit after reporting)
        for p in procs:
            p.join(timeout=30)
        trials = study.get_trials(deepcopy=False)
        state = nas3d.budget.budget_state(study)
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        failed = [t for t in trials if t.state == TrialState.FAIL]
        worker_errors = [r["error"] for r in reports if r["error"]]
        samples = {k: [x for r in reports for x in r[k]] for k in ("ask", "tell", "lock_wait", "lock_hold")}
        row = {
            "target": target, "n": n, "budget": budget, "wall": wall, "finished": finished,
            "trials_s": finished / wall, "ideal_s": n / args.sleep,
            "errors": len(worker_errors) + len(failed),
            "error_lines": sorted(set(worker_errors))[:3]
            + sorted({t.user_attrs.get("failure_reason", "?") for t in failed})[:3],
            "exact": state.used == budget and state.waiting == 0,
            "left": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials),
            "pg_cpu_ms": 1000 * cpu.postgres / max(1, finished),
            "pg_conns": len(cpu.seen),
            "bouncer_cpu_ms": 1000 * cpu.extra / max(1, finished) if target == "pgbouncer" else None,
            **{f"{k}_p50": 1000 * _pct(v, 0.5) for k, v in samples.items()},
            **{f"{k}_p99": 1000 * _pct(v, 0.99) for k, v in samples.items()},
        }
        return row


@contextmanager
def _bouncer(args: argparse.Namespace, needed: bool) -> Iterator[tuple[str, int] | None]:
    if not needed:
        yield None
        return
    with pgbouncer(args.postgres_url, pool_size=args.pool_size, query_wait_timeout=120) as url:
        pid = _listening_pid(make_url(url).port)
        yield url, pid


def _listening_pid(port: int | None) -> int:
    """PgBouncer's PID, found by the port it listens on (for its CPU time)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
            inode = fields[9]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]" for fd in fds):
                return int(pid)
        except OSError:
            continue
    raise RuntimeError(f"no process listens on port {port}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="See the module docstring for the method and how to read it.")
    parser.add_argument("--workers", default="8,32,64", help="simulated worker processes, comma-separated")
    parser.add_argument("--targets", default="direct,pgbouncer",
                        help=f"comma-separated: {', '.join(TARGETS)}")
    parser.add_argument("--sleep", type=float, default=0.5, help="seconds each simulated trial 'trains'")
    parser.add_argument("--trials-per-worker", type=int, default=4, help="budget = N × this")
    parser.add_argument("--pool-size", type=int, default=20, help="PgBouncer default_pool_size")
    parser.add_argument("--postgres-url", default=default_pg_admin_url(),
                        help="PostgreSQL server URL of a user that may CREATE DATABASE (default "
                             "$NAS3D_TEST_POSTGRES_URL or the local trust-auth server)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for one run's workers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workers = _common.parse_list(args.workers, int, "--workers")
    targets = _common.parse_list(args.targets, str, "--targets")
    for target in targets:
        if target not in TARGETS:
            raise SystemExit(f"--targets: unknown target {target!r}; valid: {', '.join(TARGETS)}")
    torch.set_num_threads(1)
    logging.getLogger("nas3d").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"server {redact(args.postgres_url)}; sleep {args.sleep:g} s per trial; budget "
          f"{args.trials_per_worker} trials per worker; PgBouncer pool {args.pool_size}; "
          f"{os.cpu_count()} CPUs",
          flush=True)
    rows = []
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nas3d-load-")))
        bouncer = stack.enter_context(_bouncer(args, "pgbouncer" in targets))
        for n in workers:
            for target in targets:
                row = run_once(target, n, args, bouncer, workdir)
                rows.append(row)
                print(f"  {target} N={n}: {row['trials_s']:.1f} trials/s, errors {row['errors']} "
                      f"{row['error_lines'] or ''}, exact {row['exact']}, left {row['left']}", flush=True)
    headers = ["target", "N", "trials", "trials/s", "of ideal", "ask p50/p99 ms", "tell p50/p99 ms",
               "lock wait p50/p99 ms", "lock hold p50 ms", "pg conns", "pg cpu ms/trial", "pgb cpu ms/trial",
               "errors", "exact", "left"]
    table = [
        [r["target"], r["n"], r["finished"], f"{r['trials_s']:.1f}", f"{r['trials_s'] / r['ideal_s']:.0%}",
         f"{r['ask_p50']:.0f}/{r['ask_p99']:.0f}", f"{r['tell_p50']:.0f}/{r['tell_p99']:.0f}",
         f"{r['lock_wait_p50']:.0f}/{r['lock_wait_p99']:.0f}", f"{r['lock_hold_p50']:.0f}", r["pg_conns"],
         f"{r['pg_cpu_ms']:.1f}", "-" if r["bouncer_cpu_ms"] is None else f"{r['bouncer_cpu_ms']:.1f}",
         r["errors"], "yes" if r["exact"] else "NO", r["left"]]
        for r in rows
    ]
    print()
    print(format_table(headers, table))
    bad = [r for r in rows if r["errors"] or not r["exact"] or r["left"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
