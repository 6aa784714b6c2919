"""Samplers compared at the same budget by the hypervolume of their fronts: random, tpe, nsga2, ode.

Each sampler is the one a study file names (``nas3d.samplers.make_sampler``: nas3d's TPE, Optuna's
NSGA-II and random samplers, and ``ode`` with the seed's settings unless ``--population`` etc. say
otherwise), run once per seed over the seed study's search space, each run until ``--budget``
architectures are evaluated. Duplicates are handled as ``nas3d.objective.TrialObjective`` handles them:
a trial that proposes an architecture evaluated before is PRUNED with ``duplicate_of`` and
``duplicate_values``, costs nothing and does not count against the budget; a run also stops once its
duplicates reach the budget (as a nas3d worker does).

Per sampler it prints: the hypervolume of the validation front (``nas3d.pareto``, docs/metrics.md#hypervolume)
mean ± std over the seeds; the distinct architectures evaluated; the duplicate proposals; the
infeasible proposals (trials that reached the objective with an infeasible cell: none can, since
nas3d's define-by-run sampling is feasible by construction and ODE redraws infeasible decodes before
proposing); for ODE, the decodes it redrew internally (infeasible / duplicate), which cost no trial.

**Cheap objective** (the default; CPU only: ~15 minutes for 4 samplers x 5 seeds x 200 trials on 2
shared cores). The real search space, real FLOPs (``nas3d.costs.measure_costs`` on the meta device
at 28³, one channel, two classes, as AdrenalMNIST3D; cached by architecture hash), and a
deterministic stand-in for validation AUC.
The proxy was written before any sampler was run on it and has not been changed after; it only has
to make AUC depend on the architecture in a plausible, non-trivial way:

    auc = 0.55                                            # a weak architecture beats chance a little
        + 0.30 * tanh(log10(flops / min_flops) / 1.5)     # capacity helps, with diminishing returns
        + 0.06 * (share of the cell's ops that normalise) # *_in_* ops (InstanceNorm) train better
        - 0.03 * max(0, longest_path - 3)                 # very deep cells train worse in a short budget
        + 0.02 * (input feeds the output vertex directly) # a skip inside the cell
        + u(arch) in [-0.03, 0.03]                        # a fixed per-architecture "training noise"

clipped to [0.5, 0.99]; ``min_flops`` is the box's ideal (the seed space's smallest architecture) and
``u`` is read off the architecture's hash, so every sampler sees the same landscape.

**Real data** (``--data-root DIR``, optional): full nas3d studies on ``DIR/adrenalmnist3d.npz``
(28³), one worker each, trained on ``--device`` with a FLOPs cap (``--max-flops``, a
``[constraints]`` cap: larger architectures are pruned untrained) and ``--max-epochs``. Minutes per
trial on a CPU: meant for a GPU.

Usage:
    python bench/compare_samplers.py                                   # 200 trials, seeds 0-4
    python bench/compare_samplers.py --budget 100 --seeds 0,1,2 --samplers random,ode
    python bench/compare_samplers.py --data-root ../shared/data --budget 40 --seeds 0,1 --device cuda
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import _common  # noqa: F401  (puts this checkout first on sys.path)
import optuna
from optuna.trial import TrialState

from nas3d.architecture import Architecture
from nas3d.config import StudySettings
from nas3d.costs import measure_costs
from nas3d.pareto import hypervolume, hypervolume_box
from nas3d.samplers import SAMPLERS, ODESettings, make_sampler
from nas3d.samplers.ode import REDRAWS
from nas3d.space import SearchSpace, sample_architecture
from nas3d.study import DIRECTIONS
from nas3d.util import one_line

SIZE, IN_CHANNELS, NUM_CLASSES = 28, 1, 2  # AdrenalMNIST3D at the paper's size


# --- the cheap objective ---------------------------------------------------------------------------


def longest_path(arch: Architecture) -> int:
    """Operation vertices on the longest input -> output path of the cell."""
    depth = {0: 0}
    for a, b in arch.edges:  # sorted by source; sources precede targets
        depth[b] = max(depth.get(b, 0), depth[a] + (1 if b != arch.output_vertex else 0))
    return depth[arch.output_vertex]


def proxy_auc(arch: Architecture, flops: float, min_flops: float) -> float:
    """The documented AUC stand-in (module docstring); deterministic in the architecture."""
    capacity = 0.30 * math.tanh(math.log10(flops / min_flops) / 1.5)
    normalised = 0.06 * sum("_in_" in op or op.startswith("in_") for op in arch.ops) / len(arch.ops)
    depth = -0.03 * max(0, longest_path(arch) - 3)
    skip = 0.02 * (0 in arch.inputs_of(arch.output_vertex))
    noise = (int(arch.arch_hash()[:8], 16) / 0xFFFFFFFF - 0.5) * 0.06
    return min(0.99, max(0.5, 0.55 + capacity + normalised + depth + skip + noise))


_FLOPS: dict[str, int] = {}  # arch hash -> FLOPs, shared by every run in this process


def arch_flops(arch: Architecture) -> int:
    key = arch.arch_hash()
    if key not in _FLOPS:
        _FLOPS[key] = measure_costs(arch, IN_CHANNELS, NUM_CLASSES, SIZE, with_thop=False).flops
    return _FLOPS[key]


class CheapObjective:
    """Sample, deduplicate as ``nas3d.objective.TrialObjective`` does, and score with the proxy."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.min_flops = hypervolume_box(SIZE, IN_CHANNELS, NUM_CLASSES).min_flops
        self.evaluated: dict[str, tuple[int, list[float]]] = {}  # hash -> (trial number, values)

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        arch = sample_architecture(trial, self.space)
        key = arch.arch_hash()
        trial.set_user_attr("arch_hash", key)
        if key in self.evaluated:
            number, values = self.evaluated[key]
            trial.set_user_attr("duplicate_of", number)
            trial.set_user_attr("duplicate_values", values)
            raise optuna.TrialPruned(f"duplicate of trial {number}")
        flops = arch_flops(arch)
        values = [proxy_auc(arch, flops, self.min_flops), float(flops)]
        self.evaluated[key] = (trial.number, values)
        return values[0], values[1]


# --- runs -----------------------------------------------------------------------------------------


@dataclass
class RunResult:
    sampler: str
    seed: int
    hypervolume: float
    distinct: int  # architectures evaluated (trained, in a real study)
    duplicates: int  # proposals of an architecture evaluated before
    infeasible: int  # proposals that reached the objective with an infeasible cell
    redrawn: tuple[int, int] = (0, 0)  # ODE: decodes redrawn before proposing (infeasible, duplicate)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _counts(trials: Sequence[optuna.trial.FrozenTrial]) -> tuple[int, int, tuple[int, int]]:
    duplicates = sum("duplicate_of" in t.user_attrs for t in trials)
    infeasible = sum(str(t.user_attrs.get("failure_reason", "")).startswith("infeasible") for t in trials)
    redraws = [t.system_attrs.get(REDRAWS, {}) for t in trials]
    redrawn = (sum(r.get("infeasible", 0) for r in redraws), sum(r.get("duplicate", 0) for r in redraws))
    return duplicates, infeasible, redrawn


def cheap_run(
    sampler: str, seed: int, budget: int, ode: ODESettings, space: SearchSpace | None = None
) -> RunResult:
    """One search of ``budget`` evaluated architectures on the cheap objective."""
    start = time.perf_counter()
    space = space or SearchSpace()
    settings = StudySettings(name="compare", n_trials=budget, sampler=sampler, sampler_seed=seed)
    study = optuna.create_study(
        directions=list(DIRECTIONS), sampler=make_sampler(settings, space=space, ode=ode)
    )
    objective = CheapObjective(space)
    while len(objective.evaluated) < budget:
        study.optimize(objective, n_trials=1)
        duplicates = sum("duplicate_of" in t.user_attrs for t in study.get_trials(deepcopy=False))
        if duplicates >= budget:
            break  # a nas3d worker stops here too
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    box = hypervolume_box(SIZE, IN_CHANNELS, NUM_CLASSES)
    hv = hypervolume(((t.values[0], t.values[1]) for t in complete), box)
    duplicates, infeasible, redrawn = _counts(trials)
    return RunResult(sampler, seed, hv, len(objective.evaluated), duplicates, infeasible, redrawn,
                     time.perf_counter() - start)


def real_run(sampler: str, seed: int, budget: int, ode: ODESettings, args: argparse.Namespace) -> RunResult:
    """One full nas3d study on AdrenalMNIST3D (``--data-root``), one worker, in a scratch storage."""
    from nas3d.config import default_study_config
    from nas3d.pareto import study_hypervolume
    from nas3d.storages import make_storage
    from nas3d.study import create_study
    from nas3d.worker import run_worker

    start = time.perf_counter()
    config = default_study_config("adrenalmnist3d", SIZE).with_overrides({
        "study.name": f"compare-{sampler}-{seed}", "study.n_trials": budget, "study.sampler": sampler,
        "study.sampler_seed": seed, "data.root": str(Path(args.data_root).resolve()),
        "data.download": False, "train.max_epochs": args.max_epochs, "train.amp": args.device != "cpu",
        "constraints.max_flops": args.max_flops, "ode.population": ode.population, "ode.F": ode.F,
        "ode.CR": ode.CR, "ode.jumping_rate": ode.jumping_rate, "ode.mode": ode.mode,
    }, source="compare_samplers")
    with tempfile.TemporaryDirectory(prefix="nas3d-compare-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'compare.db'}"
        create_study(config, make_storage(url))
        run_worker(config.study.name, url, device=args.device)
        study = optuna.load_study(study_name=config.study.name, storage=make_storage(url))
        trials = study.get_trials(deepcopy=False)
    duplicates, infeasible, redrawn = _counts(trials)
    distinct = sum(t.state == TrialState.COMPLETE for t in trials)
    over = sum(str(t.user_attrs.get("failure_reason", "")).startswith("over budget") for t in trials)
    return RunResult(sampler, seed, study_hypervolume(trials, config.data), distinct, duplicates, infeasible,
                     redrawn, time.perf_counter() - start, extra={"over_cap": over})


# --- report ---------------------------------------------------------------------------------------


def summarise(results: Sequence[RunResult], samplers: Sequence[str]) -> list[dict]:
    rows = []
    for name in samplers:
        runs = [r for r in results if r.sampler == name]
        hvs = [r.hypervolume for r in runs]

        def mean(values: Sequence[float]) -> float:
            return statistics.fmean(values)

        rows.append({
            "sampler": name,
            "runs": len(runs),
            "hv_mean": mean(hvs),
            "hv_std": statistics.stdev(hvs) if len(hvs) > 1 else 0.0,
            "distinct": mean([r.distinct for r in runs]),
            "duplicates": mean([r.duplicates for r in runs]),
            "infeasible": mean([r.infeasible for r in runs]),
            "redrawn_infeasible": mean([r.redrawn[0] for r in runs]),
            "redrawn_duplicate": mean([r.redrawn[1] for r in runs]),
            "over_cap": mean([r.extra.get("over_cap", 0) for r in runs]),
            "seconds": mean([r.seconds for r in runs]),
        })
    return rows


def table(rows: Sequence[dict], real: bool) -> str:
    head = ["sampler", "hypervolume (mean ± std)", "distinct archs", "duplicate proposals",
            "infeasible proposals", "ODE redraws (infeasible / duplicate)"]
    if real:
        head.insert(5, "over FLOPs cap")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        redraws = (f"{r['redrawn_infeasible']:.0f} / {r['redrawn_duplicate']:.0f}"
                   if r["sampler"] == "ode" else "–")
        cells = [r["sampler"], f"{r['hv_mean']:.4f} ± {r['hv_std']:.4f}", f"{r['distinct']:.1f}",
                 f"{r['duplicates']:.1f}", f"{r['infeasible']:.1f}", redraws]
        if real:
            cells.insert(5, f"{r['over_cap']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samplers", default=",".join(("random", "tpe", "nsga2", "ode")),
                        help="comma-separated, from: " + ", ".join(SAMPLERS))
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated sampler seeds")
    parser.add_argument("--budget", type=int, default=200, help="architectures evaluated per run")
    parser.add_argument("--population", type=int, default=20)
    parser.add_argument("--F", type=float, default=0.5)
    parser.add_argument("--CR", type=float, default=0.5)
    parser.add_argument("--jumping-rate", type=float, default=0.3)
    parser.add_argument("--mode", default="multi", help="ODE selection: multi or single")
    parser.add_argument("--data-root", help="folder with adrenalmnist3d.npz: real training, not the proxy")
    parser.add_argument("--max-flops", type=float, default=1e9, help="real mode: FLOPs cap per architecture")
    parser.add_argument("--max-epochs", type=int, default=10, help="real mode: epochs per trial")
    parser.add_argument("--device", default="cpu", help="real mode: training device")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        samplers = _common.parse_list(args.samplers, str, "--samplers")
        for name in samplers:
            if name not in SAMPLERS:
                raise ValueError(f"--samplers: unknown sampler {name!r} (valid: {', '.join(SAMPLERS)})")
        seeds = _common.parse_list(args.seeds, int, "--seeds")
        if args.budget < 1:
            raise ValueError(f"--budget must be >= 1, got {args.budget}")
        ode = ODESettings(population=args.population, F=args.F, CR=args.CR,
                          jumping_rate=args.jumping_rate, mode=args.mode)
    except ValueError as e:
        print(f"compare_samplers: {one_line(e)}", file=sys.stderr)
        return 2
    results = []
    for seed in seeds:
        for name in samplers:
            if args.data_root:
                result = real_run(name, seed, args.budget, ode, args)
            else:
                result = cheap_run(name, seed, args.budget, ode)
            print(f"{name:>6} seed {seed}: hypervolume {result.hypervolume:.4f}, {result.distinct} distinct, "
                  f"{result.duplicates} duplicates, {result.seconds:.1f} s", file=sys.stderr)
            results.append(result)
    mode = "cheap objective (measured FLOPs, proxy AUC), 28³ / 1 channel / 2 classes"
    if args.data_root:
        mode = (f"real AdrenalMNIST3D 28³, {args.max_epochs} epochs, "
                f"max_flops {args.max_flops:.3g} on {args.device}")
    print(f"budget {args.budget} architectures per run, seeds {', '.join(map(str, seeds))}; {mode}; "
          f"ODE population {ode.population}, F {ode.F}, CR {ode.CR}, jumping rate {ode.jumping_rate}, "
          f"mode {ode.mode}")
    print(table(summarise(results, samplers), real=bool(args.data_root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
