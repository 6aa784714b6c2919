# Long module: every text nas3d shows people about studies and retrained models, and the report's
# files, kept together so that they read alike.
"""What nas3d shows people: status tables, one trial, retrain rows, the comparison with published numbers
and ``nas3d report`` (its Pareto fronts come from :mod:`nas3d.front`, as the dashboard's do).

Every function here returns text (:func:`run_retrain` hands each seed's row to its caller as it ends),
so that only the CLI prints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from nas3d import records
from nas3d.budget import budget_state
from nas3d.config import StudyConfig
from nas3d.early_stopping import format_learning_curve
from nas3d.front import FrontPoint, StudyFront, collect_retrain_results, interval_note, study_front
from nas3d.front import fmt_or_dash as _fmt
from nas3d.front import int_or_dash as _int

__all__ = [
    "CALIBRATION_FILE",
    "REPORT_FILES",
    "SEED_HEADER",
    "compare_runs",
    "format_comparison",
    "format_status",
    "report_markdown",
    "trial_report",
    "write_calibration_png",
    "write_report",
    "mean_line",
    "not_learned_note",
    "paired_comparisons",
    "retrain_failures",
    "retrain_header",
    "retrain_summary",
    "run_retrain",
    "seed_row",
    "single_class_warnings",
    "status_report",
]


def status_report(storage: Any, study_name: str | None = None, trial: int | None = None) -> str:
    """:func:`format_status` of ``study_name``, or of every study in ``storage`` (a string or spec);
    with ``trial``, :func:`trial_report` of that trial of ``study_name`` (default: the only study)."""
    from nas3d.storages import make_storage
    from nas3d.study import only_study_name, study_id_of

    backend = make_storage(storage, must_exist=True)  # reading never creates a storage
    if trial is not None and not study_name:
        study_name = only_study_name(backend)
    if study_name:
        study_id_of(backend, study_name)  # a one-line StudyNotFound naming the studies there
    if trial is not None:
        return trial_report(backend, study_name, trial)
    names = [study_name] if study_name else optuna.get_all_study_names(backend)
    if not names:
        return f"no studies in {storage}"
    return "\n".join(format_status(optuna.load_study(study_name=name, storage=backend)) for name in names)


def run_retrain(options: dict[str, Any], storage: Any, *, say: Callable[[str], object],
                warn: Callable[[str], object]) -> int:
    """``nas3d retrain`` by its flags (``options``): :func:`nas3d.retrain.plan_retrain`, then
    :func:`nas3d.retrain.retrain`, handing ``say`` the header, each seed's row as soon as it is known and
    the summary, and ``warn`` the failed seeds; the exit code (1 when a seed failed)."""
    from nas3d.retrain import plan_retrain, retrain

    plan = plan_retrain(options, storage)
    note = plan.size_note()
    if note:
        warn(note)
    say(retrain_header(plan))
    report = retrain(plan.source, plan.data, plan.config, plan.device, plan.out,
                     overwrite=options.get("force", False), progress=options.get("progress", False),
                     on_seed=lambda seed: say(seed_row(seed)), say=say)
    if report.failed:
        warn(retrain_failures(report))
    for line in single_class_warnings(report.results["name"], report.results):
        warn(line)
    say(retrain_summary(report))
    return 1 if report.failed else 0


def compare_runs(paths: Sequence[str | Path]) -> str:
    """``nas3d compare``: :func:`format_comparison` of the results.json in each of ``paths``."""
    from nas3d.retrain import load_results

    return format_comparison([(str(path), load_results(path)) for path in paths])


def retrain_header(plan: Any) -> str:
    """What ``nas3d retrain`` is about to do, and the header of its per-seed rows."""
    config, data = plan.config, plan.data
    epochs = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}"
    return (f"retraining {plan.source.name} ({plan.source.recipe.describe()}) on {data.dataset} "
            f"{data.size}^3, {epochs}, recipe {config.train.describe_recipe()}, seeds "
            f"{','.join(map(str, config.seeds))}, on {plan.device}, "
            f"into {plan.out}\n{SEED_HEADER}")


def retrain_summary(report: Any) -> str:
    return f"{mean_line(report.results['summary'], len(report.seeds))}\nresults: {report.results_path}"


def retrain_failures(report: Any) -> str:
    failed = "; ".join(f"seed {s.seed}: {s.reason}" for s in report.failed)
    return f"nas3d: {len(report.failed)} of {len(report.seeds)} seeds failed ({failed})"


def format_status(study: optuna.Study) -> str:
    """Counts by state, the budget, and the Pareto front as a table."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    budget = study.user_attrs.get(records.CONFIG, {}).get("study", {}).get("n_trials", "?")
    counted = budget_state(study)  # counted as the budget counts them (nas3d.budget)
    # Free trials (duplicates, retried attempts, ...) do not count: more trials than the budget is no overrun.
    free = len(trials) - counted.used
    lines = [
        f"study {study.study_name}: {len(trials)} trials for a budget of {budget}"
        + (f" ({free} free)" if free else "")
        + "".join(f"{'; ' if i == 0 else ', '}{state.lower()} {n}"
                  for i, (state, n) in enumerate(sorted(counts.items()))),
    ]
    duplicates = counted.duplicates
    if duplicates:
        lines[0] += f"; {duplicates} duplicates not retrained"
    try:
        config = StudyConfig.from_dict(study.user_attrs[records.CONFIG], source="")
    except (KeyError, ValueError):
        config = None
    positive = positive_class(config.data) if config else None
    if positive:
        lines.append(f"  positive class {positive!r} (binary AUC scores it; predict's {positive!r} column)")
    # The front and hypervolume of fully trained trials (nas3d.pareto), as the dashboard note shows it.
    front = study_front(study, seed_references="none")
    lines += not_learned_note(front, config)
    # A search scores val AUC; a plan's retrain study (nas3d.plan) records each job's test AUC instead.
    score = (study.metric_names or ["val_auc"])[0] or "val_auc"
    if front.hypervolume is not None:
        lines.append(f"  hypervolume {front.hypervolume:.4f} ({score.replace('_auc', ' AUC')} x log10 FLOPs, "
                     f"docs/metrics.md#hypervolume) over {len(front.points)} fully trained trials; "
                     "Pareto front:")
    if front.front:
        header = ("trial", score, "val_acc", "MFLOPs", "params")
        lines.append("  " + "  ".join(f"{h:>9}" for h in header) + f"  {'interval ~tied':<22}  architecture")
        for p in front.front:
            cells = (p.number, f"{p.val_auc:.4f}", _fmt(p.val_acc), f"{p.flops / 1e6:.1f}", p.params or "-")
            lines.append("  " + "  ".join(f"{c:>9}" for c in cells) + f"  {p.interval_text:<22}  {p.arch}")
        note = interval_note([front])
        if note:
            lines.append(f"  {note}")
    failed = [
        t for t in trials
        if t.state.name in ("FAIL", "PRUNED") and records.DUPLICATE_OF not in t.user_attrs
        and records.FAILURE_REASON in t.user_attrs
    ]
    for t in failed[-5:]:
        lines.append(f"  trial {t.number} {t.state.name.lower()}: {records.failure_reason(t)}")
    return "\n".join(lines)


#: A best val AUC at or below this: the study's models have not learned yet (0.5 is chance).
NOT_LEARNED_AUC = 0.55


def not_learned_note(front: StudyFront, config: StudyConfig | None) -> list[str]:
    """A short paragraph where the study has fully trained trials and none reached a val AUC above
    :data:`NOT_LEARNED_AUC`: its models have not learned yet, and what usually helps (what the study
    does not do already)."""
    if not front.points or max(p.val_auc for p in front.points) > NOT_LEARNED_AUC:
        return []
    best = max(p.val_auc for p in front.points)
    epochs = f" (--max-epochs {max(20, 2 * config.train.max_epochs)})" if config else ""
    helps = [f"more epochs{epochs}"]
    if config is None or config.data.fraction("val") < 1.0:
        helps.append("scoring on the whole val split (--set data.search_val_fraction=1)")
    if config is None or config.train.recipe != "small3d":
        helps.append("the recipe for small volume sets (--set train.recipe=small3d)")
    return [f"  not learned yet: the best val AUC is {best:.3f} (0.5 is chance), so these models do not "
            "yet tell the classes apart and the front ranks noise.",
            f"  What usually helps: {', '.join(helps)}; then search again under another --name."]


# test_acc is MedMNIST's ACC at 0.5; thresh (chosen on val), bal_acc, sens and spec: binary tasks only.
_SEED_COLUMNS = ("seed", "val_auc", "val_acc", "test_auc", "test_acc", "thresh", "bal_acc", "sens", "spec",
                 "best_ep", "seconds")
SEED_HEADER = "  " + "  ".join(f"{c:>8}" for c in _SEED_COLUMNS)


def seed_row(seed: Any) -> str:
    if not seed.completed:
        return f"  {seed.seed:>8}  failed: {seed.reason}"
    cells = (seed.seed, f"{seed.val_auc:.4f}", f"{seed.val_acc:.4f}", f"{seed.test_auc:.4f}",
             f"{seed.test_acc:.4f}", *(_fmt(getattr(seed, k, None)) for k in (
                 "threshold", "test_balanced_accuracy", "test_sensitivity", "test_specificity")),
             seed.best_epoch, f"{seed.seconds:.1f}")
    return "  " + "  ".join(f"{c:>8}" for c in cells)


def _val_auc_cell(point: FrontPoint) -> str:
    """A front member's val AUC with its interval and the members it is tied with (nas3d.front)."""
    return f"{point.val_auc:.4f}" + ("" if point.interval is None else f" {point.interval_text}")


def _mean_std(entry: dict[str, float] | None) -> str:
    return "-" if entry is None else f"{entry['mean']:.4f}±{entry['std']:.4f}"


def _interval(summary: dict[str, Any], metric: str) -> str:
    """`` [low, high]``: the 95 % bootstrap interval over the test samples, or nothing where none is
    recorded (results.json written before intervals, or an undefined one)."""
    low, high = (summary.get("intervals") or {}).get(metric) or (None, None)
    if low is None or high is None or low != low or high != high:  # nan: undefined
        return ""
    return f" [{low:.3f}, {high:.3f}]"


def _with_interval(summary: dict[str, Any], metric: str) -> str:
    return _mean_std(summary.get(metric)) + _interval(summary, metric)


def mean_line(summary: dict[str, Any], seeds: int) -> str:
    """The retrain summary: mean±std over seeds with the 95 % bootstrap interval over the test samples,
    and for a binary task the rates at the chosen threshold."""
    done = summary["completed"]
    if not done:
        return f"no seed completed (of {seeds})"
    line = (f"mean±std over {done} of {seeds} seeds: test AUC {_with_interval(summary, 'test_auc')}, "
            f"test ACC {_with_interval(summary, 'test_acc')} (val AUC {_mean_std(summary['val_auc'])})")
    if summary.get("intervals"):
        line += "; [95 % BCa bootstrap interval over the test samples, seeds averaged]"
    if summary.get("test_balanced_accuracy"):
        line += (f"\nat the threshold chosen on val: balanced accuracy "
                 f"{_mean_std(summary['test_balanced_accuracy'])}, sensitivity "
                 f"{_mean_std(summary['test_sensitivity'])}, specificity "
                 f"{_mean_std(summary['test_specificity'])}"
                 " (test ACC above is MedMNIST's, at 0.5)")
    return line


def single_class_warnings(label: str, results: dict[str, Any]) -> list[str]:
    """One warning per seed of ``results`` whose model predicts a single class on val or test."""
    found = (results.get("summary") or {}).get("single_class") or {}
    return [f"warning: {label} seed {seed} predicts a single class on {', '.join(where)}"
            for seed, where in found.items()]


def paired_comparisons(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """For each two runs scored on the same test samples: their difference in mean test AUC with its
    paired 95 % BCa bootstrap interval, and whether the difference is within it (the interval holds 0)."""
    from nas3d.metrics import bootstrap_interval

    def scores(results: dict[str, Any]) -> list[Any]:
        return [s["test_scores"] for s in results["seeds"] if s.get("test_scores") is not None]

    lines = []
    scored = [(label, r) for label, r in runs if r.get("test_labels") and scores(r)]
    for i, (label_a, a) in enumerate(scored):
        for label_b, b in scored[i + 1:]:
            if (a["dataset"], a["size"], a["test_labels"]) != (b["dataset"], b["size"], b["test_labels"]):
                continue
            difference = a["summary"]["test_auc"]["mean"] - b["summary"]["test_auc"]["mean"]
            low, high = bootstrap_interval(a["test_labels"], scores(a), a["task"], "auc", other=scores(b))
            if low != low:  # nan: undefined on these samples
                verdict = "no interval (undefined on these samples)"
            elif low <= 0 <= high:
                verdict = ("they differ by less than their paired interval: not distinguishable on this "
                           "test set")
            else:
                verdict = f"{label_a if difference > 0 else label_b} is better beyond the paired interval"
            interval = "" if low != low else f", paired 95 % interval [{low:+.3f}, {high:+.3f}]"
            lines.append(f"  {label_a} - {label_b}: test AUC {difference:+.4f}{interval}; {verdict}")
    return lines


def format_comparison(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One table of retrain results (label, results.json) beside the published MedMNIST numbers.

    Each run's row carries the published ResNet-18/50+3D test AUC/ACC for its dataset, and the FLOPs and
    params of a ResNet on the same data (dataset and size: costs depend on the input shape and the
    classes) divided by the run's: a retrained ResNet's among the runs, else, for a dataset with
    published numbers, the ResNets' costs counted on the meta device (no training needed to count).
    """
    from nas3d.baselines import PUBLISHED, PUBLISHED_MODELS, PUBLISHED_NAME_OF_BASELINE, SEED_STUDY_MEAN
    from nas3d.costs import measure_costs

    references: dict[tuple[str, int], dict[str, dict[str, int]]] = {}
    for _, r in runs:
        if r["model"]["kind"] == "baseline":
            references.setdefault((r["dataset"], r["size"]), {})[r["model"]["baseline"]] = r["costs"]
    for _, r in runs:
        if r["dataset"] in PUBLISHED[PUBLISHED_MODELS[0]]:
            refs = references.setdefault((r["dataset"], r["size"]), {})
            for name in PUBLISHED_NAME_OF_BASELINE:
                if name not in refs:
                    counted = measure_costs(name, r["in_channels"], r["num_classes"], r["size"],
                                            with_thop=False)
                    refs[name] = {"flops": counted.flops, "params": counted.params}
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
            _with_interval(summary, "test_auc"), _with_interval(summary, "test_acc"),
            f"{costs['flops'] / 1e6:,.1f}", f"{costs['params']:,}", *ratios, *published,
        ])
    lines = _table(header, rows)
    if any(r["summary"].get("intervals") for _, r in runs):
        lines.append("  test AUC/ACC: mean±std over seeds [95 % BCa bootstrap interval over the test "
                     "samples]")
    paired = paired_comparisons(runs)
    if paired:
        lines += ["", "paired comparisons (the same test samples, seeds averaged):", *paired]
    warnings = [w for label, r in runs for w in single_class_warnings(label, r)]
    if warnings:
        lines += ["", *warnings]

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


def retrained(runs: Sequence[dict[str, Any]], study_name: str, number: int) -> dict[str, Any] | None:
    """The retrain result of trial ``number`` of ``study_name`` among ``runs`` (the latest, if several)."""
    matches = [r for r in runs if r["model"]["kind"] == "nas3d"
               and r["model"].get("source", {}).get("study") == study_name
               and r["model"].get("source", {}).get("trial") == number]
    return matches[-1] if matches else None


# -- nas3d report ------------------------------------------------------------------------------------

REPORT_FILES = ("pareto.png", "pareto.html", "report.md")
_RESNETS = ("ResNet-18+3D", "ResNet-50+3D")


def write_report(storage: Any, study_names: Sequence[str], out: str | Path,
                 retrain_paths: Sequence[str | Path] = ()) -> str:
    """``nas3d report``: write pareto.png, pareto.html (the dashboard's front figure) and report.md
    (the paper-style table) for ``study_names`` (none: the only study in ``storage``) into ``out``;
    returns what to tell the user."""
    from nas3d.front import front_figure, write_front_png
    from nas3d.storages import make_storage
    from nas3d.study import load_study, only_study_name
    from nas3d.util import atomic_write

    backend = make_storage(storage)
    study_names = study_names or [only_study_name(backend)]
    if len(set(study_names)) != len(study_names):
        raise ValueError(f"--study-name given twice: {list(study_names)}; name each study once")
    studies = [load_study(name, backend)[0] for name in study_names]
    runs = collect_retrain_results(retrain_paths)
    seeds = "all" if len(studies) == 1 else "same-dataset"
    fronts = [study_front(study, runs, seed_references=seeds) for study in studies]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_front_png(fronts, out / "pareto.png")
    html = front_figure(fronts).to_html(include_plotlyjs=True, full_html=True)  # offline: plotly.js inside
    atomic_write(out / "pareto.html", lambda f: f.write(html.encode("utf-8")))
    calibration = write_calibration_png(_shown_runs(fronts, runs), out / CALIBRATION_FILE)
    text = report_markdown(fronts, runs, calibration=calibration is not None)
    atomic_write(out / "report.md", lambda f: f.write(text.encode("utf-8")))
    pareto = sum(len(f.front) for f in fronts)
    files = [*REPORT_FILES, *([CALIBRATION_FILE] if calibration else [])]
    return f"report on {len(fronts)} stud{'y' if len(fronts) == 1 else 'ies'} ({pareto} Pareto trials) " \
           f"written to {out}: {', '.join(files)}"


CALIBRATION_FILE = "calibration.png"


def _shown_runs(fronts: Sequence[StudyFront],
                runs: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The retrain results the report's table shows (one per retrained Pareto trial), labelled."""
    shown = []
    for front in fronts:
        for p in front.front:
            run = retrained(runs, front.study_name, p.number)
            if run is not None:
                shown.append((f"{front.study_name} trial {p.number}", run))
    return shown


def write_calibration_png(runs: Sequence[tuple[str, dict[str, Any]]], path: str | Path) -> Path | None:
    """A reliability diagram of the binary runs' test predictions (each run's seeds pooled; 10 equal-width
    bins of the positive score, marker area by count) against the diagonal of perfect calibration;
    None, and nothing written, where no run is binary with recorded test scores."""
    from nas3d.metrics import reliability_bins
    from nas3d.util import atomic_write

    curves = []
    for label, r in runs:
        scores = [s["test_scores"] for s in r["seeds"] if s.get("test_scores") is not None]
        if r.get("task") == "binary-class" and scores and r.get("test_labels"):
            labels = [y for _ in scores for y in r["test_labels"]]
            curves.append((label, reliability_bins(labels, [v for s in scores for v in s])))
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display; only files
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=120)
    ax.plot([0, 1], [0, 1], color="#888", ls=":", lw=1, label="perfectly calibrated")
    for label, points in curves:
        mean_score, observed, counts = zip(*points, strict=True)
        line, = ax.plot(mean_score, observed, marker="o", ms=0, lw=1.2, label=label)
        sizes = [12 + 60 * c / max(counts) for c in counts]
        ax.scatter(mean_score, observed, s=sizes, color=line.get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability of the positive class",
           ylabel="share of positives", title="Reliability of test predictions")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write(Path(path), lambda f: f.write(buffer.getvalue()))


def report_markdown(fronts: Sequence[StudyFront], runs: Sequence[dict[str, Any]] = (), *,
                    calibration: bool = False) -> str:
    """The paper-style table: per Pareto trial val AUC/ACC, FLOPs, params, architecture, and where
    retrained, test AUC/ACC mean±std with their bootstrap intervals beside the published ResNet-18/50+3D
    numbers; a mean row over the studies (each study's best-val-AUC Pareto trial) when there are several;
    single-class warnings; the calibration figure (``calibration``: it was written); the hypervolumes."""
    from nas3d.baselines import PUBLISHED

    lines = ["# nas3d report", "",
             "Validation Pareto fronts (val AUC maximised, FLOPs minimised; FLOPs = 2 × MACs, batch of "
             "one). Test AUC/ACC: mean ± std over the seeds of `nas3d retrain`; published: MedMNIST v2, "
             "test AUC/ACC at 28³.", "", "![Pareto fronts](pareto.png)", "",
             "| dataset | study | trial | val AUC | val ACC | MFLOPs | params | test AUC | test ACC | "
             + " | ".join(f"{m} (published)" for m in _RESNETS) + " | architecture |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(_RESNETS) + "---|"]
    best: list[tuple[FrontPoint, dict[str, Any], str]] = []
    for front in fronts:
        published = [_published(PUBLISHED[m].get(front.dataset)) for m in _RESNETS]
        for i, p in enumerate(front.front):
            run = retrained(runs, front.study_name, p.number)
            summary = run["summary"] if run else {}
            if i == 0:
                best.append((p, summary, front.dataset))
            lines.append(f"| {front.dataset} | {front.study_name} | {p.number} | {_val_auc_cell(p)} | "
                         f"{_fmt(p.val_acc)} | {p.flops / 1e6:,.2f} | {_int(p.params)} | "
                         f"{_with_interval(summary, 'test_auc')} | {_with_interval(summary, 'test_acc')} | "
                         + " | ".join(published) + f" | `{p.arch}` |")
        if not front.front:
            lines.append(f"| {front.dataset} | {front.study_name} | - | no fully trained trial yet |"
                         + " |" * (8 + len(_RESNETS)))
    if len(best) > 1:
        lines.append(_mean_row(best))
    note = interval_note(fronts)
    if note:  # the val AUC intervals of the front members (nas3d.front)
        lines += ["", note[0].upper() + note[1:] + " (docs/studies.md#uncertainty-on-the-front)."]
    shown = _shown_runs(fronts, runs)
    warnings = [w for label, r in shown for w in single_class_warnings(label, r)]
    if any(r["summary"].get("intervals") for _, r in shown):
        lines += ["", "Test AUC/ACC intervals: 95 % BCa bootstrap over the test samples (seeds averaged), "
                  "beside the mean ± std over seeds (docs/metrics.md#intervals)."]
    if warnings:
        lines += ["", *(f"- **{w}**" for w in warnings)]
    if calibration:
        lines += ["", "Reliability of the retrained binary models' test predictions (seeds pooled; "
                  "docs/metrics.md#calibration):", "", f"![Calibration]({CALIBRATION_FILE})"]
    lines += ["", "| study | dataset | size | fully trained | Pareto trials | hypervolume |",
              "|---|---|---:|---:|---:|---:|"]
    for f in fronts:
        size = f.data.size if f.data is not None else "?"
        lines.append(f"| {f.study_name} | {f.dataset} | {size} | {len(f.points)} | {len(f.front)} | "
                     f"{_fmt(f.hypervolume)} |")
    volumes = [f.hypervolume for f in fronts if f.hypervolume is not None]
    if len(volumes) > 1:
        lines.append(f"| mean | | | | | {sum(volumes) / len(volumes):.4f} |")
    lines += ["", "Hypervolume: docs/metrics.md#hypervolume (val AUC from 0.5 to 1, log10 FLOPs between "
              "the smallest and largest architecture of the seed space at the study's input size), "
              "in [0, 1]."]
    positive = [f"{f.study_name}: {name!r}" for f in fronts if (name := positive_class(f.data))]
    if positive:
        lines += ["", "Positive class (the one binary AUC scores, and `nas3d predict`'s positive "
                  "probability): " + "; ".join(positive) + "."]
    return "\n".join(lines) + "\n"


def positive_class(data: Any) -> str | None:
    """The positive class of a binary study's data (a :class:`nas3d.data.DataConfig`): its second class
    name (docs/own-data.md#1-the-manifest says how it is chosen); None for multi-class or unknown data."""
    try:
        names = data.class_names if data is not None else ()  # a manifest's: () until it is resolved
    except (ValueError, LookupError, OSError):  # data this host cannot describe
        return None
    return names[1] if len(names) == 2 else None


def _mean_row(best: Sequence[tuple[FrontPoint, dict[str, Any], str]]) -> str:
    """Means over the studies of each one's best-val-AUC Pareto trial (test scores only when every
    one was retrained) and of the published numbers on the same datasets."""
    from nas3d.baselines import PUBLISHED

    def mean(values: Sequence[float | None], digits: int = 4) -> str:
        known = [v for v in values if v is not None]
        return f"{sum(known) / len(known):,.{digits}f}" if known and len(known) == len(values) else "-"

    points = [p for p, _, _ in best]
    cells = [mean([p.val_auc for p in points]), mean([p.val_acc for p in points]),
             mean([p.flops / 1e6 for p in points], 2), mean([p.params for p in points], 0)]
    for key in ("test_auc", "test_acc"):
        cells.append(mean([(s.get(key) or {}).get("mean") for _, s, _ in best]))
    for model in _RESNETS:
        numbers = [PUBLISHED[model].get(d) for _, _, d in best]
        known = [n for n in numbers if n is not None]
        cells.append(f"{mean([n[0] for n in known], 3)}/{mean([n[1] for n in known], 3)}"
                     if len(known) == len(numbers) else "-")
    return f"| **mean** | {len(best)} studies, best val AUC each | | " + " | ".join(cells) + " | |"


# -- nas3d status --trial N -----------------------------------------------------------------------------

#: User attrs shown elsewhere in the trial report, or too long for a terminal line.
_TRIAL_ATTRS_SHOWN_APART = (records.FAILURE_REASON, records.ARCH_JSON, records.CHECKPOINT_MISSING)


def trial_report(storage: Any, study_name: str, number: int) -> str:
    """One trial: state, values, params, user attrs, learning curve (if recorded), failure reason,
    and its artifacts."""
    from optuna.artifacts import get_all_artifact_meta

    from nas3d.storages import make_storage
    from nas3d.study import load_trial

    backend = storage if isinstance(storage, BaseStorage) else make_storage(storage, must_exist=True)
    trial = load_trial(backend, study_name, number)
    lines = [f"trial {trial.number} of study {study_name!r}: {trial.state.name.lower()}"]
    if trial.values is not None:
        lines.append(f"  val_auc {trial.values[0]:.4f}, flops {trial.values[1]:,.0f}")
    start, end = trial.datetime_start, trial.datetime_complete
    if start is not None:
        took = f", finished {end:%Y-%m-%d %H:%M:%S} ({(end - start).total_seconds():.1f} s)" if end else ""
        lines.append(f"  started {start:%Y-%m-%d %H:%M:%S}{took}")
    if records.FAILURE_REASON in trial.user_attrs:
        lines.append(f"  reason: {records.failure_reason(trial)}")
    if records.retry_of(trial):  # each earlier attempt of these parameters, with why it ended
        lines.append("  retry history:")
        for earlier in (load_trial(backend, study_name, n) for n in records.retry_of(trial)):
            reason = records.failure_reason(earlier, "no reason recorded")
            lines.append(f"    trial {earlier.number} {earlier.state.name.lower()}: {reason}")
    if trial.params:
        lines.append("  params: " + ", ".join(f"{k}={v}" for k, v in sorted(trial.params.items())))
    shown_apart = (*_TRIAL_ATTRS_SHOWN_APART, records.CURVE, records.DECISIONS)
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in shown_apart}
    if attrs:
        lines.append("  user attrs:")
        lines += [f"    {k}: {v}" for k, v in sorted(attrs.items())]
    if trial.user_attrs.get(records.CURVE):
        # the curve with the best epoch and the stopper's decisions (its first line names the trial)
        curve = format_learning_curve(trial).splitlines()[1:]
        # Only the table: the lines above it repeat the reason and the values, shown apart above.
        header = next((i for i, line in enumerate(curve) if line.split()[:1] == ["epoch"]), len(curve))
        table = curve[header:]
    else:
        table = []
    if table:
        lines += ["  learning curve:", *("  " + line for line in table)]
    else:
        lines.append("  learning curve: not recorded")
    missing = trial.user_attrs.get(records.CHECKPOINT_MISSING)
    if missing:
        lines.append(f"  checkpoint missing: {missing}; its weights come back by retraining it "
                     f"(nas3d retrain --study-name {study_name} --trial {trial.number})")
    artifacts = get_all_artifact_meta(trial, storage=backend)
    if artifacts:
        # Optuna records an upload before writing it: a checkpoint the store refused is listed too.
        kept = {trial.user_attrs.get(k) for k in (records.CHECKPOINT_ARTIFACT, records.PICTURE_ARTIFACT)}
        refused = "" if missing is None else "  (not stored: the store refused it)"
        lines.append("  artifacts:")
        lines += [f"    {a.filename}  {a.mimetype}  id {a.artifact_id}"
                  + ("" if a.artifact_id in kept else refused) for a in artifacts]
    else:
        lines.append("  artifacts: none")
    return "\n".join(lines)
