"""What keeping the dashboard's front figure and note fresh costs, and whether it slows workers.

``nas3d dashboard`` refreshes them (``nas3d.dashboard.DashboardRefresher``); workers do nothing extra.
This measures, for a SQLite study filled with N fully trained trials (``study.add_trials`` with the
user attrs the objective writes; values are plausible fakes, nothing is trained):

    read      study.get_trials(): what every dashboard page poll or `nas3d status` already does (baseline)
    refresh   nas3d.dashboard.refresh_study: that read, the front, the hypervolume, the Plotly figure
              and the note, and their writes into the study's system attrs (mean of warm runs)
    worker    a worker's storage traffic per trial (ask, 8 user attrs, tell; no training) alone, then
              beside a process running the dashboard's refresher (``DashboardRefresher``: it redraws
              when trials finished since its last look) looking every ``--intervals`` seconds: 30 is
              the default of ``nas3d dashboard --refresh``; 1 is a worst case (a redraw every second)

Ratios are against the baseline run in the same invocation. Run: ``python bench/dashboard_refresh.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts this checkout first on sys.path)
import optuna
from optuna.trial import TrialState, create_trial

from nas3d.dashboard import DashboardRefresher, refresh_study
from nas3d.storages import make_storage
from nas3d.study import create_study


def fill(url: str, n: int) -> None:
    study = create_study(_common.smoke_config(), make_storage(url))
    rng = random.Random(0)
    trials = []
    for i in range(n):
        flops = 10 ** rng.uniform(6.5, 9.5)
        auc = min(0.99, 0.55 + 0.04 * (flops / 1e6) ** 0.2 + rng.gauss(0, 0.03))
        trials.append(create_trial(
            state=TrialState.COMPLETE, values=[auc, flops],
            user_attrs={"arch": f"S1C1F8 1=relu_conv3(0) 2=mish_conv5(0,1) out(2) #{i}", "params": 5000 + i,
                        "val_acc": 0.7, "arch_hash": f"{i:016x}", "train_seconds": 30.0, "epochs": 10,
                        "best_epoch": 7, "device": "cpu"}))
    study.add_trials(trials)


def refresher(url: str, interval: float, stop: multiprocessing.synchronize.Event) -> None:
    thread = DashboardRefresher(make_storage(url), ["smoke"], interval)
    thread.start()
    stop.wait()
    thread.stop()


def worker_loop(url: str, trials: int) -> float:
    """Seconds per trial of a worker's storage traffic (no training)."""
    study = optuna.load_study(study_name="smoke", storage=make_storage(url))
    start = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        for key in ("arch", "arch_json", "arch_hash", "params", "thop_macs", "device", "val_acc", "epochs"):
            trial.set_user_attr(key, 1)
        study.tell(trial, [0.7, 1e7])
    return (time.perf_counter() - start) / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="finished trials in the study, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker-trials", type=int, default=100)
    parser.add_argument("--intervals", default="30,1", help="refresher look intervals (seconds) to try")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    intervals = _common.parse_list(args.intervals, float, "--intervals")
    print(f"{'trials':>6} {'read ms':>8} {'refresh ms':>10} {'x read':>7} {'worker ms/trial':>15} "
          + " ".join(f"{f'+refresh/{i:g}s':>13} {'ratio':>6}" for i in intervals))
    for n in _common.parse_list(args.sizes, int, "--sizes"):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'db.sqlite'}"
            fill(url, n)
            study = optuna.load_study(study_name="smoke", storage=make_storage(url))
            refresh_study(study)  # warm: imports, the seed architectures' FLOPs, the hypervolume box
            reads, refreshes = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                study.get_trials(deepcopy=False)
                reads.append(time.perf_counter() - t)
                t = time.perf_counter()
                refresh_study(study)
                refreshes.append(time.perf_counter() - t)
            read, refresh = statistics.median(reads), statistics.median(refreshes)
            alone = worker_loop(url, args.worker_trials)
            cells = []
            for interval in intervals:
                stop = multiprocessing.Event()
                process = multiprocessing.Process(target=refresher, args=(url, interval, stop))
                process.start()
                time.sleep(3)  # let it import and draw once
                busy = worker_loop(url, args.worker_trials)
                stop.set()
                process.join()
                cells.append(f"{busy * 1e3:>13.1f} {busy / alone:>6.2f}")
            print(f"{n:>6} {read * 1e3:>8.1f} {refresh * 1e3:>10.1f} {refresh / read:>7.1f} "
                  f"{alone * 1e3:>15.1f} " + " ".join(cells))


if __name__ == "__main__":
    main()
