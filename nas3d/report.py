"""What nas3d shows people: status tables, retrain rows and the comparison with published numbers.

Every function here returns text; only the CLI prints it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import optuna

__all__ = [
    "SEED_HEADER",
    "exported_line",
    "format_comparison",
    "format_status",
    "mean_line",
    "retrain_failures",
    "retrain_header",
    "retrain_summary",
    "seed_row",
    "status_report",
]


def status_report(storage: Any, study_name: str | None = None) -> str:
    """:func:`format_status` of ``study_name``, or of every study in ``storage`` (a string or spec)."""
    from nas3d.storages import make_storage
    from nas3d.study import study_id_of

    backend = make_storage(storage, must_exist=True)  # reading never creates a storage
    if study_name:
        study_id_of(backend, study_name)  # a one-line StudyNotFound naming the studies there
    names = [study_name] if study_name else optuna.get_all_study_names(backend)
    if not names:
        return f"no studies in {storage}"
    return "\n".join(format_status(optuna.load_study(study_name=name, storage=backend)) for name in names)


def exported_line(study_name: str, number: int, out: Any, checkpoint: Any) -> str:
    """What ``nas3d export`` says about the checkpoint it wrote."""
    metrics = checkpoint.metadata.get("metrics", {})
    return (f"exported trial {number} of study {study_name!r} to {out}: {checkpoint.recipe.describe()}, "
            f"val_auc {metrics.get('val_auc', float('nan')):.4f}, {metrics.get('flops', 0) / 1e6:.1f} MFLOPs")


def retrain_header(plan: Any) -> str:
    """What ``nas3d retrain`` is about to do, and the header of its per-seed rows."""
    config, data = plan.config, plan.data
    epochs = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}"
    return (f"retraining {plan.source.name} ({plan.source.recipe.describe()}) on {data.dataset} "
            f"{data.size}^3, {epochs}, seeds {','.join(map(str, config.seeds))}, on {plan.device}, "
            f"into {plan.out}\n{SEED_HEADER}")


def retrain_summary(report: Any) -> str:
    return f"{mean_line(report.results['summary'], len(report.seeds))}\nresults: {report.results_path}"


def retrain_failures(report: Any) -> str:
    failed = "; ".join(f"seed {s.seed}: {s.reason}" for s in report.failed)
    return f"nas3d: {len(report.failed)} of {len(report.seeds)} seeds failed ({failed})"


def format_status(study: optuna.Study) -> str:
    """Counts by state, the budget, and the Pareto front as a table."""
    from nas3d.study import CONFIG_ATTR

    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    budget = study.user_attrs.get(CONFIG_ATTR, {}).get("study", {}).get("n_trials", "?")
    lines = [
        f"study {study.study_name}: {len(trials)} trials (budget {budget}); "
        + ", ".join(f"{state.lower()} {n}" for state, n in sorted(counts.items())),
    ]
    duplicates = sum("duplicate_of" in t.user_attrs for t in trials)
    if duplicates:
        lines[0] += f"; {duplicates} duplicates not retrained"
    front = sorted(study.best_trials, key=lambda t: -t.values[0])
    if front:
        header = ("trial", "val_auc", "val_acc", "MFLOPs", "params")
        lines.append("  " + "  ".join(f"{h:>9}" for h in header) + "  architecture")
        for t in front:
            attrs = t.user_attrs
            cells = (t.number, f"{t.values[0]:.4f}", f"{attrs.get('val_acc', float('nan')):.4f}",
                     f"{t.values[1] / 1e6:.1f}", attrs.get("params", "-"))
            lines.append("  " + "  ".join(f"{c:>9}" for c in cells) + f"  {attrs.get('arch', '')}")
    failed = [
        t for t in trials
        if t.state.name in ("FAIL", "PRUNED") and "duplicate_of" not in t.user_attrs
        and "failure_reason" in t.user_attrs
    ]
    for t in failed[-5:]:
        lines.append(f"  trial {t.number} {t.state.name.lower()}: {t.user_attrs['failure_reason']}")
    return "\n".join(lines)


_SEED_COLUMNS = ("seed", "val_auc", "val_acc", "test_auc", "test_acc", "best_ep", "seconds")
SEED_HEADER = "  " + "  ".join(f"{c:>8}" for c in _SEED_COLUMNS)


def seed_row(seed: Any) -> str:
    if not seed.completed:
        return f"  {seed.seed:>8}  failed: {seed.reason}"
    cells = (seed.seed, f"{seed.val_auc:.4f}", f"{seed.val_acc:.4f}", f"{seed.test_auc:.4f}",
             f"{seed.test_acc:.4f}", seed.best_epoch, f"{seed.seconds:.1f}")
    return "  " + "  ".join(f"{c:>8}" for c in cells)


def _mean_std(entry: dict[str, float] | None) -> str:
    return "-" if entry is None else f"{entry['mean']:.4f}±{entry['std']:.4f}"


def mean_line(summary: dict[str, Any], seeds: int) -> str:
    done = summary["completed"]
    if not done:
        return f"no seed completed (of {seeds})"
    return (f"mean±std over {done} of {seeds} seeds: test AUC {_mean_std(summary['test_auc'])}, "
            f"test ACC {_mean_std(summary['test_acc'])} (val AUC {_mean_std(summary['val_auc'])})")


def format_comparison(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One table of retrain results (label, results.json) beside the published MedMNIST numbers.

    Each run's row carries the published ResNet-18/50+3D test AUC/ACC for its dataset; when a retrained
    ResNet on the same data (dataset and size: costs depend on the input shape and the classes) is
    among the runs, its FLOPs and params divided by the run's are shown too.
    """
    from nas3d.baselines import PUBLISHED, PUBLISHED_MODELS, SEED_STUDY_MEAN

    references: dict[tuple[str, int], dict[str, dict[str, int]]] = {}
    for _, r in runs:
        if r["model"]["kind"] == "baseline":
            references.setdefault((r["dataset"], r["size"]), {})[r["model"]["baseline"]] = r["costs"]
    reference_names = sorted({name for refs in references.values() for name in refs})
    resnets = PUBLISHED_MODELS[:2]
    header = ["run", "dataset", "size", "seeds", "test AUC", "test ACC", "MFLOPs", "params",
              *(f"{name} FLOPs,params / run" for name in reference_names),
              *(f"{model} (published)" for model in resnets)]
    rows = []
    for label, r in runs:
        summary, costs = r["summary"], r["costs"]
        refs = references.get((r["dataset"], r["size"]), {})
        ratios = [
            f"{refs[name]['flops'] / costs['flops']:.1f}x, {refs[name]['params'] / costs['params']:.1f}x"
            if name in refs else "-"
            for name in reference_names
        ]
        published = [_published(PUBLISHED[model].get(r["dataset"])) for model in resnets]
        rows.append([
            label, r["dataset"], str(r["size"]), f"{summary['completed']}/{len(r['retrain']['seeds'])}",
            _mean_std(summary.get("test_auc")), _mean_std(summary.get("test_acc")),
            f"{costs['flops'] / 1e6:,.1f}", f"{costs['params']:,}", *ratios, *published,
        ])
    lines = _table(header, rows)

    datasets = sorted({r["dataset"] for _, r in runs if r["dataset"] in PUBLISHED[PUBLISHED_MODELS[0]]})
    lines.append("")
    if datasets:
        lines.append("published test AUC/ACC at 28^3 (MedMNIST v2 benchmark):")
        table = [[d, *(_published(PUBLISHED[m][d]) for m in PUBLISHED_MODELS)] for d in datasets]
        lines += _table(["dataset", *PUBLISHED_MODELS], table)
        if any(r["size"] != 28 for _, r in runs if r["dataset"] in datasets):
            lines.append("  (MedMNIST v2 published 3D numbers at 28^3 only: other sizes are set beside them)")
    else:
        lines.append("no published numbers for these datasets (MedMNIST v2 covers the six 3D flags)")
    lines.append(f"seed study (PBC-NAS extension), six-dataset mean of its best models: test AUC "
                 f"{SEED_STUDY_MEAN[0]:.3f}, ACC {SEED_STUDY_MEAN[1]:.3f}")
    lines += _dataset_means(runs)
    return "\n".join(lines)


def _dataset_means(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """The headline comparison: nas3d's best run per MedMNIST3D dataset (by mean test AUC), averaged
    over the datasets present, beside the published models' means over the same datasets."""
    from nas3d.baselines import PUBLISHED, PUBLISHED_MODELS

    best: dict[str, dict[str, Any]] = {}
    for _, r in runs:
        summary = r["summary"]
        if r["model"]["kind"] != "nas3d" or r["dataset"] not in PUBLISHED[PUBLISHED_MODELS[0]]:
            continue
        if summary.get("test_auc") is None:
            continue
        if r["dataset"] not in best or summary["test_auc"]["mean"] > best[r["dataset"]]["test_auc"]["mean"]:
            best[r["dataset"]] = summary
    if not best:
        return []
    datasets = sorted(best)
    all_six = list(PUBLISHED[PUBLISHED_MODELS[0]])
    covered = "all six datasets" if len(datasets) == len(all_six) else (
        f"{len(datasets)} of {len(all_six)} datasets ({', '.join(datasets)}; missing "
        f"{', '.join(d for d in all_six if d not in best)})"
    )
    auc = sum(best[d]["test_auc"]["mean"] for d in datasets) / len(datasets)
    acc = sum(best[d]["test_acc"]["mean"] for d in datasets) / len(datasets)
    published = ", ".join(
        f"{model} {sum(PUBLISHED[model][d][0] for d in datasets) / len(datasets):.3f}/"
        f"{sum(PUBLISHED[model][d][1] for d in datasets) / len(datasets):.3f}"
        for model in PUBLISHED_MODELS
    )
    return [
        f"nas3d, best run per dataset over {covered}: mean test AUC {auc:.3f}, ACC {acc:.3f}",
        f"  published means over the same datasets (AUC/ACC): {published}",
    ]


def _published(numbers: tuple[float, float] | None) -> str:
    return "-" if numbers is None else f"{numbers[0]:.3f}/{numbers[1]:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    return [
        ("  " + "  ".join(f"{x:<{w}}" for x, w in zip(r, widths, strict=True))).rstrip()
        for r in (header, *rows)
    ]
