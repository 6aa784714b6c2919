"""Early stopping across trials (MO-ASHA) against full training: epochs, wall time, hypervolume.

Targets (issue 11, on the real AdrenalMNIST3D file): at equal trials, >= 2.5x fewer epochs at >= 95 %
of the hypervolume; at equal epochs, a higher hypervolume.

What runs, in this one invocation and process, each on a fresh SQLite study made by
``nas3d.study.create_study`` and driven by the real ``TrialObjective`` (sampling, deduplication,
FLOPs, training, recording; no checkpoints, in every run alike):

    full      [early_stopping] kind = "none", a budget of --trials architectures
    moasha    kind = "moasha" (--eta, --min-epochs), the same budget and the same sampler seed
    moasha=E  kind = "moasha", as many architectures as fit in the epochs ``full`` trained

The budget counts architectures the way a worker does (``nas3d.budget.budget_state``: duplicates of
an evaluated architecture are free; a stopped trial counts). The hypervolume is
``nas3d.pareto.study_hypervolume`` of each study's fully trained trials (val AUC, log10 FLOPs; box
from the seed space at the study's input size). Wall time is the whole ``study.optimize``.

Data: synthetic by default (``studies/smoke.toml``'s, fast: a smoke test of the script, not a
measurement), or the real file with ``--data-root DIR --dataset adrenalmnist3d`` (the study file
``studies/adrenalmnist3d.toml`` then, with a quarter of train and val as the seed searches). On a
CPU use ``--space narrow`` (k=3 operations, at most two a cell, one stack of one cell, 4 or 8
filters) so that a run fits in minutes; ``--space seed`` is the seed space.

    python bench/early_stopping.py                                                   # synthetic smoke
    python bench/early_stopping.py --data-root ../shared/data --dataset adrenalmnist3d --trials 40
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts this checkout first on sys.path)
import optuna
from _common import REPO, format_table, smoke_config

from nas3d.budget import budget_state
from nas3d.config import StudyConfig, load_study_config
from nas3d.data import load_splits
from nas3d.early_stopping import decide, learning_curve, rung_entry, rung_epochs
from nas3d.objective import TrialObjective
from nas3d.pareto import fully_trained, hypervolume, hypervolume_box, study_hypervolume
from nas3d.storages import make_storage
from nas3d.study import create_study, load_study
from nas3d.train import TrainingFailure

# Small enough for a 2-core CPU shared with other jobs: k=3 operations, at most two per cell, one
# stack of one cell, 4 or 8 filters (AdrenalMNIST3D 28³: about 10 to 30 s per epoch there, batch 32).
NARROW_SPACE = {
    "space.ops": ["conv3_in_relu", "relu_conv3", "mish_conv3"],
    "space.stacks": [1],
    "space.cells_per_stack": [1],
    "space.initial_filters": [4, 8],
    "space.max_op_vertices": 2,
}


def base_config(args: argparse.Namespace) -> StudyConfig:
    overrides: dict[str, object] = {
        "study.sampler_seed": args.sampler_seed,
        "train.max_epochs": args.max_epochs,
        "train.patience": args.patience,
        "train.batch_size": args.batch_size,
        "early_stopping.eta": args.eta,
        "early_stopping.min_epochs": args.min_epochs,
    }
    if args.space == "narrow":
        overrides.update(NARROW_SPACE)
    if args.dataset == "synthetic":
        overrides["data.root"] = str(args.workdir / "data")
        return smoke_config(**overrides)
    config = load_study_config(REPO / "studies" / f"{args.dataset}.toml")
    overrides.update({"data.root": args.data_root, "data.download": False})
    return config.with_overrides(overrides, source="benchmark")


def run_study(config: StudyConfig, label: str, workdir: Path, *, budget: int | None,
              epoch_budget: int | None, data, device: str) -> dict:
    """One study until ``budget`` architectures (or ``epoch_budget`` epochs) are spent."""
    storage = make_storage(f"sqlite:///{workdir / f'{label}.db'}")
    config = config.with_overrides({"study.name": label}, source="benchmark")
    create_study(config, storage)
    study, config = load_study(label, storage)
    objective = TrialObjective(config, data, device, artifact_store=None)
    limit = budget if budget is not None else 100_000

    def enough(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        state = budget_state(study)
        if state.spent(limit) or (epoch_budget is not None and objective.epochs_trained >= epoch_budget):
            study.stop()

    start = time.perf_counter()
    study.optimize(objective, callbacks=[enough], catch=(TrainingFailure,))
    wall = time.perf_counter() - start
    trials = study.get_trials(deepcopy=False)
    state = budget_state(study)
    return {
        "run": label,
        "architectures": state.used,
        "trained": objective.trainings,
        "stopped": state.stopped,
        "complete": len(fully_trained(trials)),
        "epochs": objective.epochs_trained,
        "wall_s": wall,
        "hypervolume": study_hypervolume(trials, config.data),
        "front": len(study.best_trials),
    }


def replay(trials: list, config: StudyConfig, eta: int, min_epochs: int) -> dict:
    """What MO-ASHA (``eta``, ``min_epochs``) would have decided on the full run's stored curves.

    Exact for a sequential run while the sampler's proposals do not depend on results (TPE's random
    start-up trials: the first 10) and training is deterministic (float32 on the CPU): each trial, in
    order, is ranked at each rung against the earlier trials that reached it, as a live run ranks it.
    """
    rungs = rung_epochs(min_epochs, eta, config.train.max_epochs)
    trained = [t for t in trials if learning_curve(t)["epoch"]]
    epochs, reached, kept = 0, {r: [] for r in rungs}, []
    for t in trained:
        length = len(learning_curve(t)["epoch"])
        stop = None
        for r in rungs:
            if r > length:
                break
            mine = rung_entry(t, r)
            # a run that patience ends at the rung's epoch is not judged there, but counts for later ones
            proceed = r == length or decide(mine, reached[r], eta)[0]
            reached[r].append(mine)
            if not proceed:
                stop = r
                break
        epochs += stop or length
        if stop is None:
            kept.append(t)
    box = hypervolume_box(config.data.size, config.data.in_channels, config.data.num_classes)
    return {"run": f"replay eta={eta} min={min_epochs}", "epochs": epochs,
            "stopped": len(trained) - len(kept),
            "hypervolume": hypervolume(((t.values[0], t.values[1]) for t in kept), box)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic",
                        help="'synthetic' or a MedMNIST3D flag with a study file")
    parser.add_argument("--data-root", help="folder with {flag}.npz (required for a real dataset)")
    parser.add_argument("--trials", type=int, default=12, help="architectures per run (default 12)")
    parser.add_argument("--max-epochs", type=int, default=9)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="default 32: a quarter of AdrenalMNIST3D's train split is 297 samples, "
                        "3 steps an epoch at the seed's 128")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared CPU, more threads wait on "
                        "each other)")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--min-epochs", type=int, default=1)
    parser.add_argument("--sampler-seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device of the in-process worker (cpu, cuda)")
    parser.add_argument("--space", choices=("narrow", "seed"), default="narrow")
    parser.add_argument("--skip-equal-epochs", action="store_true", help="leave out the moasha=E run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.dataset != "synthetic" and not args.data_root:
        parser.error(f"--dataset {args.dataset} needs --data-root DIR (the folder holding "
                     f"{args.dataset}.npz)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="nas3d-bench-es-") as tmp:
        args.workdir = Path(tmp)
        base = base_config(args)
        data = load_splits(base.data, args.device, for_search=True)
        stopper = base.with_overrides({"early_stopping.kind": "moasha"})
        print(f"data: {data.name} {base.data.size}³, {len(data.train)} train / {len(data.val)} val; "
              f"space {args.space}; max_epochs {args.max_epochs}, patience {args.patience}, batch "
              f"{args.batch_size}; moasha eta {args.eta}, min_epochs {args.min_epochs} (rungs "
              f"{stopper.early_stopping.rungs(args.max_epochs)}); sampler {base.study.sampler} seed "
              f"{args.sampler_seed}", flush=True)
        results = []

        def done(result: dict) -> dict:
            results.append(result)
            print(f"  {result['run']}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in result.items() if k != "run"), flush=True)
            return result

        full = done(run_study(base.with_overrides({"early_stopping.kind": "none"}), "full", args.workdir,
                              budget=args.trials, epoch_budget=None, data=data, device=args.device))
        full_trials = optuna.load_study(study_name="full", storage=make_storage(
            f"sqlite:///{args.workdir / 'full.db'}")).get_trials()
        replays = [replay(full_trials, base, eta, m) for eta in (2, 3) for m in (1, 2, 3)
                   if rung_epochs(m, eta, args.max_epochs)]
        done(run_study(stopper, "moasha", args.workdir, budget=args.trials, epoch_budget=None, data=data,
                       device=args.device))
        if not args.skip_equal_epochs:
            done(run_study(stopper, "moasha=E", args.workdir, budget=None, epoch_budget=full["epochs"],
                           data=data, device=args.device))

    headers = ("run", "archs", "trained", "stopped", "complete", "epochs", "wall s", "hypervolume", "front")
    rows = [(r["run"], r["architectures"], r["trained"], r["stopped"], r["complete"], r["epochs"],
             f"{r['wall_s']:.1f}", f"{r['hypervolume']:.4f}", r["front"]) for r in results]
    print(format_table(headers, rows))
    ms = results[1]
    if full["hypervolume"] > 0 and ms["epochs"] > 0:
        print(f"equal trials: moasha trains {full['epochs'] / ms['epochs']:.2f}x fewer epochs, "
              f"{full['wall_s'] / ms['wall_s']:.2f}x less wall time, at "
              f"{100 * ms['hypervolume'] / full['hypervolume']:.1f} % of the full run's hypervolume")
    else:
        print("equal trials: no ratio (an empty front or no epochs)")
    print("replayed on the full run's curves (valid while proposals do not depend on results):")
    print(format_table(("replay", "epochs", "stopped", "hypervolume", "epochs ratio", "hv ratio"), [
        (r["run"], r["epochs"], r["stopped"], f"{r['hypervolume']:.4f}",
         f"{full['epochs'] / r['epochs']:.2f}x",
         f"{100 * r['hypervolume'] / full['hypervolume']:.1f} %" if full["hypervolume"] > 0 else "-")
        for r in replays]))
    if len(results) > 2:
        eq = results[2]
        print(f"equal epochs ({eq['epochs']} vs {full['epochs']}): moasha evaluates {eq['architectures']} "
              f"architectures, hypervolume {eq['hypervolume']:.4f} vs {full['hypervolume']:.4f} "
              f"({eq['hypervolume'] - full['hypervolume']:+.4f})")
    if args.json:
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
