"""A real-data architecture table: a small NAS-Bench that the replays, the proxies and the defaults read.

A fixed, seeded sample of architectures from the default (seed) space, spread evenly over log FLOPs
up to ``--max-flops``, each trained for ``--epochs`` epochs by the search protocol (a quarter of train,
validated on a quarter of val every epoch) and scored on the **whole** validation split every epoch as
well (``data.record_full_val``). Patience is set to the epoch count, so every architecture runs all
its epochs and the curve is complete; the zero-cost proxies are recorded by every trained trial.

It is an nas3d study on SQLite: the architectures are enqueued, ``nas3d launch --cpu`` workers fill
it, and running the same command again resumes an interrupted build (finished trials stay, a killed
worker's trial is retried). At the end, or with ``--export-only``, the study is written as one JSON
file (one row per architecture: costs, proxies, per-epoch curves, seconds), the file the replays read.

    python bench/arch_table.py --data-root ../shared/data                     # build, then export
    python bench/arch_table.py --data-root ../shared/data --export-only       # export what is done

A second table at another train fraction, on architectures of the first (spread over its FLOPs), is
what lets the replays judge a smaller train share as a fidelity (the first table cannot):

    python bench/arch_table.py --data-root ../shared/data --search-fraction 0.125 --archs 16 \
        --from-table bench/data/arch_table_adrenalmnist3d_28.json

The study lives in ``storage/arch-table/`` (git-ignored); only the JSON is committed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (puts this checkout first on sys.path)
import numpy as np
import optuna
from _common import REPO, spread

from nas3d.architecture import Architecture
from nas3d.config import StudyConfig, load_study_config
from nas3d.costs import measure_costs
from nas3d.early_stopping import learning_curve
from nas3d.space import SearchSpace, params_and_choices_for, params_for, sample_architecture
from nas3d.storages import make_storage
from nas3d.study import create_study, load_study

FORMAT = "nas3d-arch-table/1"
DEFAULT_OUT = REPO / "bench" / "data" / "arch_table_adrenalmnist3d_28.json"
DEFAULT_WORKDIR = REPO / "storage" / "arch-table"


SEED_SPACE = SearchSpace()
#: The seed protocol's share of train (and val): the committed table's, and its names' default.
SEED_FRACTION = 0.25


def select_architectures(count: int, max_flops: float, *, seed: int, candidates: int,
                         space: SearchSpace = SEED_SPACE, size: int = 28) -> list[tuple[Architecture, int]]:
    """``count`` distinct architectures of ``space`` at or under ``max_flops``, spread over log FLOPs.

    ``candidates`` samples are drawn by Optuna's RandomSampler (seeded) through the one sampling
    function; the ones under the cap are split into ``count`` equal-width bins of log10 FLOPs and one
    is drawn from each bin (seeded), the rest from the fullest bins when some are empty.
    """
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    pool: dict[str, tuple[Architecture, int]] = {}
    for _ in range(candidates):
        arch = sample_architecture(study.ask(), space)
        flops = measure_costs(arch, 1, 2, size, with_thop=False).flops
        if flops <= max_flops:
            pool.setdefault(arch.arch_hash(), (arch, flops))
    if len(pool) < count:
        raise ValueError(f"only {len(pool)} distinct architectures of {candidates} candidates are at or "
                         f"under {max_flops:.3g} FLOPs; raise --candidates or --max-flops")
    items = sorted(pool.values(), key=lambda item: (item[1], item[0].arch_hash()))
    logs = np.log10([flops for _, flops in items])
    edges = np.linspace(logs.min(), logs.max(), count + 1)
    bins = [list(np.flatnonzero((logs >= lo) & ((logs < hi) if i < count - 1 else (logs <= hi))))
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))]
    rng = np.random.default_rng(seed)
    chosen = [int(rng.choice(b)) for b in bins if b]
    while len(chosen) < count:  # empty bins: take more from the fullest bins
        left = [[i for i in b if i not in chosen] for b in bins]
        fullest = max(left, key=len)
        chosen.append(int(rng.choice(fullest)))
    return [items[i] for i in sorted(chosen)]


def from_table(path: Path, count: int) -> list[tuple[Architecture, int]]:
    """``count`` architectures of an exported table, evenly over its rows sorted by FLOPs (the cheapest
    and the dearest included), so that two tables can be compared on the same architectures."""
    rows = json.loads(path.read_text())["rows"]
    if count > len(rows):
        raise ValueError(f"--archs {count}: {path} holds only {len(rows)} architectures")
    return [(Architecture.from_json(r["arch_json"]), int(r["flops"])) for r in spread(rows, count)]


def table_config(args: argparse.Namespace) -> StudyConfig:
    config = load_study_config(REPO / "studies" / "adrenalmnist3d.toml")
    # Every table scores on the same quarter of val, whatever share of train it trains on.
    val = {} if args.search_fraction == SEED_FRACTION else {"data.search_val_fraction": SEED_FRACTION}
    return config.with_overrides({
        **val,
        "study.name": args.name,
        "study.n_trials": args.archs,
        "study.sampler": "random",  # every trial is enqueued: the sampler never proposes one
        "study.sampler_seed": args.seed,
        "study.proxies": True,  # the table's rows carry the zero-cost proxies (replay_table reads them)
        "data.search_fraction": args.search_fraction,
        "data.root": str(Path(args.data_root).resolve()),
        "data.download": False,
        "data.record_full_val": True,
        "train.max_epochs": args.epochs,
        "train.patience": args.epochs,  # every architecture runs every epoch: whole curves
        "train.batch_size": args.batch_size,
        "early_stopping.kind": "none",
    }, source="bench/arch_table.py")


def build(args: argparse.Namespace, storage_url: str) -> None:
    storage = make_storage(storage_url)
    config = table_config(args)
    study = create_study(config, storage, artifacts=str(args.workdir / "artifacts"))
    if not study.trials:
        start = time.perf_counter()
        if args.from_table:
            chosen = from_table(args.from_table, args.archs)
            source = f"of {args.from_table}"
        else:
            chosen = select_architectures(args.archs, args.max_flops, seed=args.seed,
                                          candidates=args.candidates)
            source = f"from {args.candidates} candidates"
        print(f"selected {len(chosen)} architectures {source} in "
              f"{time.perf_counter() - start:.0f} s: {chosen[0][1] / 1e6:.0f} to "
              f"{chosen[-1][1] / 1e6:.0f} MFLOPs", flush=True)
        # In a seeded random order, so that a table still being built is spread over FLOPs too.
        order = np.random.default_rng(args.seed).permutation(len(chosen))
        done = committed_rows(args.out, config)
        for arch, _ in (chosen[i] for i in order):
            row = done.get(arch.arch_hash())
            if row is not None:
                study.add_trial(finished_trial(row, arch, config))
            else:
                study.enqueue_trial(params_for(arch, config.space), skip_if_exists=True)
        if done:
            print(f"{len(done)} architectures taken from {args.out} (a build made elsewhere goes on here)",
                  flush=True)
    else:
        again = requeue_failed(study)
        if again:
            print(f"queued again {again} architecture(s) whose training failed", flush=True)
    command = [sys.executable, "-m", "nas3d", "launch", "--storage", storage_url,
               "--study-name", args.name, "--cpu", "--workers", str(args.workers)]
    print("running", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def requeue_failed(study: optuna.Study) -> int:
    """Queue again each architecture whose trial FAILED (its reason stays on that trial) and that no
    other trial has finished or holds: a table row is only ever missing because it is still to come."""
    def key(trial: optuna.trial.FrozenTrial) -> tuple:  # a queued trial has its params as fixed_params
        return tuple(sorted((trial.params or trial.system_attrs.get("fixed_params", {})).items()))

    trials = study.get_trials(deepcopy=False)
    states = optuna.trial.TrialState
    live = (states.COMPLETE, states.WAITING, states.RUNNING)
    covered = {key(t) for t in trials if t.state in live}
    queued = 0
    for trial in trials:
        if trial.state == states.FAIL and key(trial) not in covered:
            study.enqueue_trial(trial.params)
            covered.add(key(trial))
            queued += 1
    return queued


def committed_rows(path: Path, config: StudyConfig) -> dict[str, dict]:
    """Rows of an exported table made with the same protocol, by architecture hash; none if absent.

    A fresh machine has no study database, but the committed table holds every finished row: a build
    resumes from it instead of training those architectures again.
    """
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    if table.get("format") != FORMAT or table.get("protocol") != protocol(config):
        print(f"{path} was made with another protocol; not resuming from it", flush=True)
        return {}
    return {row["arch_hash"]: row for row in table["rows"]}


def finished_trial(row: dict, arch: Architecture, config: StudyConfig) -> optuna.trial.FrozenTrial:
    """A COMPLETE trial holding an exported row, as the worker would have recorded it."""
    params, choices = params_and_choices_for(arch, config.space)
    distributions = {name: optuna.distributions.CategoricalDistribution(choices[name]) for name in params}
    attrs = {key: row[key] for key in ("arch", "arch_json", "arch_hash", "params", "thop_macs",
                                       "train_seconds", "proxies", "proxy_seconds")}
    attrs["learning_curve"] = row["curve"]
    attrs["imported_from"] = "committed table"
    return optuna.trial.create_trial(params=params, distributions=distributions,
                                     values=[row["val_auc"], row["flops"]], user_attrs=attrs)


def protocol(config: StudyConfig) -> dict:
    return {
        "dataset": config.data.dataset, "size": config.data.size,
        "search_fraction": config.data.search_fraction, "search_val_fraction": config.data.fraction("val"),
        "subset_seed": config.data.subset_seed,
        "epochs": config.train.max_epochs, "batch_size": config.train.batch_size, "lr": config.train.lr,
        "seed": config.train.seed,
        "curves": "val_* on the search quarter of val, full_val_* on all of it",
    }


def export(storage_url: str, name: str, command: str) -> dict:
    """The study as a table: one row per fully trained architecture, in trial order."""
    study, config = load_study(name, make_storage(storage_url, must_exist=True))
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        curve = learning_curve(trial)
        rows.append({
            "trial": trial.number,
            "arch": attrs["arch"],
            "arch_json": attrs["arch_json"],
            "arch_hash": attrs["arch_hash"],
            "val_auc": trial.values[0],
            "flops": int(trial.values[1]),
            "params": attrs["params"],
            "thop_macs": attrs.get("thop_macs"),
            "train_seconds": attrs["train_seconds"],
            "proxies": attrs.get("proxies", {}),
            "proxy_seconds": attrs.get("proxy_seconds"),
            "curve": curve,
        })
    pending = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    waiting = len(study.get_trials(deepcopy=False, states=pending))
    return {
        "format": FORMAT,
        "command": command,
        "machine": machine(),
        "protocol": protocol(config),
        "complete": len(rows),
        "not_complete": waiting,
        "rows": rows,
    }


def machine() -> dict:
    import torch

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder holding adrenalmnist3d.npz")
    parser.add_argument("--archs", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--max-flops", type=float, default=5e8,
                        help="FLOPs cap (default 0.5 GFLOP, so the table builds in about an hour on 2 cores)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="default 32: a quarter of the train split is 297 samples, 3 steps at 128")
    parser.add_argument("--candidates", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--search-fraction", type=float, default=SEED_FRACTION,
                        help="share of train each architecture trains on (val: always its quarter)")
    parser.add_argument("--from-table", type=Path,
                        help="take --archs architectures of this exported table instead of sampling")
    parser.add_argument("--name", help="study name (default: by the train fraction)")
    parser.add_argument("--workdir", type=Path, help="the study's folder (default: by the train fraction)")
    parser.add_argument("--out", type=Path, help="the JSON (default: by the train fraction)")
    parser.add_argument("--export-only", action="store_true")
    args = parser.parse_args(argv)
    # The seed protocol's quarter keeps the names the committed table has; another fraction is its own table.
    suffix = "" if args.search_fraction == SEED_FRACTION else f"-f{args.search_fraction:g}"
    args.name = args.name or f"arch-table-adrenalmnist3d-28{suffix}"
    args.workdir = args.workdir or Path(f"{DEFAULT_WORKDIR}{suffix}")
    args.out = args.out or DEFAULT_OUT.with_name(f"{DEFAULT_OUT.stem}{suffix.replace('-', '_')}.json")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    storage_url = f"sqlite:///{(args.workdir / 'table.db').resolve()}"
    if not args.export_only:
        build(args, storage_url)
    table = export(storage_url, args.name, "python bench/arch_table.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--export-only"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1, allow_nan=False) + "\n")
    print(f"{table['complete']} architectures complete ({table['not_complete']} not yet) -> {args.out}")
    finite = [r["flops"] for r in table["rows"]]
    if finite:
        print(f"FLOPs {min(finite) / 1e6:.0f} to {max(finite) / 1e6:.0f} M, "
              f"{sum(r['train_seconds'] for r in table['rows']) / 3600:.2f} h of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
