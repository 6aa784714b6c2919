"""A reproduce plan's progress and its table: ``nas3d reproduce --status`` and ``table.md`` / ``table.csv``.

A row per dataset: its searched model (the front member with the best val AUC), test AUC and ACC as
mean ± standard deviation over the seeds (sample standard deviation, ddof 1) with the 95 % interval
of the mean over the seeds (Student's t with n - 1 degrees of freedom, ``scipy.stats.t``; none with
one seed), its FLOPs and parameters at the plan's input size, and its FLOPs as a share of ResNet-18's
and ResNet-50's; then the mean over the datasets. Beside them: the other retrained models (the pick
nearest the seed study's FLOPs, the baselines) and the published rows (the seed study's six-dataset
mean, the MedMNIST v2 ResNets). A partial table lists each missing cell and why it is missing.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from nas3d import records
from nas3d.baselines import PUBLISHED, SEED_STUDY_MEAN
from nas3d.plan import SELECTIONS, DatasetState, Plan, dataset_state, load_plan
from nas3d.storages import make_storage, resolve_storage, storage_home
from nas3d.util import atomic_write

__all__ = ["ModelRow", "default_out", "plan_status", "seed_stats", "write_table"]

CSV_COLUMNS = ("section", "dataset", "data", "model", "role", "seeds_done", "seeds_planned",
               "test_auc_mean", "test_auc_std", "test_auc_ci_low", "test_auc_ci_high",
               "test_acc_mean", "test_acc_std", "test_acc_ci_low", "test_acc_ci_high",
               "flops", "params", "flops_vs_resnet18", "flops_vs_resnet50", "missing")
_ROLE_NAMES = {"best_val_auc": "best val AUC", "seed_flops": "nearest the seed's FLOPs",
               "baseline": "baseline"}


def seed_stats(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation and the 95 % Student-t interval of the mean over seeds, clipped to
    [0, 1], the range of the AUC and ACC it is given (with 2 seeds t is 12.7: unclipped, it would
    print an AUC interval past 1)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "ci_low": None, "ci_high": None}
    mean = float(sum(values) / n)
    if n == 1:
        return {"mean": mean, "std": None, "ci_low": None, "ci_high": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half)}


@dataclass(frozen=True)
class ModelRow:
    dataset: str
    data: str  # "real" or "synthetic"
    model: str
    role: str
    seeds_done: int
    seeds_planned: int
    auc: dict[str, float | None]
    acc: dict[str, float | None]
    flops: float | None
    params: int | None
    resnet_flops: dict[str, float]
    missing: str  # why some seeds have no result ("" when none is missing)

    def ratio(self, baseline: str) -> float | None:
        base = self.resnet_flops.get(baseline)
        return self.flops / base if self.flops and base else None

    def csv_row(self, section: str) -> dict[str, Any]:
        return {"section": section, "dataset": self.dataset, "data": self.data, "model": self.model,
                "role": self.role, "seeds_done": self.seeds_done, "seeds_planned": self.seeds_planned,
                **{f"test_auc_{k}": v for k, v in self.auc.items()},
                **{f"test_acc_{k}": v for k, v in self.acc.items()},
                "flops": self.flops, "params": self.params, "flops_vs_resnet18": self.ratio("resnet18"),
                "flops_vs_resnet50": self.ratio("resnet50"), "missing": self.missing}


def _resnet_flops(data: Any) -> dict[str, float]:
    from nas3d.costs import measure_costs

    return {name: float(measure_costs(name, data.in_channels, data.num_classes, data.size,
                                      with_thop=False).flops) for name in ("resnet18", "resnet50")}


def _why(trial: Any) -> str:
    if trial is None:
        return "not queued yet"
    if trial.state == TrialState.FAIL:
        return f"failed: {records.failure_reason(trial, 'no reason recorded')}"
    return trial.state.name.lower()


def _rows(plan: Plan, state: DatasetState, data: Any) -> list[ModelRow]:
    """A row per model of ``state``'s dataset, in order: searched models, then baselines."""
    latest = state.jobs_by_key
    models: list[tuple[str, str]] = [(f"trial{m['trial']}", m["role"]) for m in
                                     (state.queued or {}).get("models", [])]
    if not models:  # a placeholder row: the search has not chosen yet, or had nothing to choose
        models.append(("searched", "best_val_auc"))
    models += [(name, "baseline") for name in plan.baselines]
    resnets = _resnet_flops(data)
    rows = []
    for model, role in models:
        trials = [latest.get((model, seed)) for seed in plan.seeds]
        done = [t for t in trials if t is not None and t.state == TrialState.COMPLETE]
        missing = sorted({_why(t) for t in trials if t not in done}) if len(done) < len(plan.seeds) else []
        if model == "searched":
            missing = [state.queued.get("note", "no model chosen") if state.queued is not None
                       else "its search is done; its models are not chosen yet" if state.search_done
                       else f"its search has {state.trials_done} of {state.budget} trials done"]
        attrs = next((t.user_attrs for t in trials if t is not None and records.FLOPS in t.user_attrs), {})
        rows.append(ModelRow(
            dataset=state.dataset, data="synthetic" if state.dataset in plan.synthetic else "real",
            model=model, role=role, seeds_done=len(done), seeds_planned=len(plan.seeds),
            auc=seed_stats([t.user_attrs[records.TEST_AUC] for t in done]),
            acc=seed_stats([t.user_attrs[records.TEST_ACC] for t in done]),
            flops=attrs.get(records.FLOPS), params=attrs.get(records.PARAMS), resnet_flops=resnets,
            missing="; ".join(missing)))
    return rows


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cells(row: ModelRow) -> list[str]:
    auc, acc = row.auc, row.acc

    def pm(m: dict[str, float | None]) -> str:
        if m["mean"] is None:
            return "missing"
        return _num(m["mean"]) + (f" ± {_num(m['std'])}" if m["std"] is not None else "")

    def ci(m: dict[str, float | None]) -> str:
        return "—" if m["ci_low"] is None else f"[{_num(m['ci_low'])}, {_num(m['ci_high'])}]"

    seeds = f"{row.seeds_done}/{row.seeds_planned}"
    flops = "—" if row.flops is None else f"{row.flops / 1e6:,.1f}"
    ratio = [("—" if (r := row.ratio(b)) is None else f"{r:.3f}") for b in ("resnet18", "resnet50")]
    model = row.model.replace("trial", "trial ") if row.role != "baseline" else row.model
    return [row.dataset, row.data, f"{model} ({_ROLE_NAMES[row.role]})", seeds, pm(auc), ci(auc), pm(acc),
            ci(acc), flops, "—" if row.params is None else f"{row.params:,}", *ratio]


_HEADER = ["Dataset", "Data", "Model", "Seeds", "Test AUC", "AUC 95 % CI", "Test ACC", "ACC 95 % CI",
           "MFLOPs", "Params", "FLOPs / ResNet-18", "FLOPs / ResNet-50"]


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def build_table(plan: Plan, states: Sequence[DatasetState], datas: Sequence[Any]) -> tuple[str, str, bool]:
    """``table.md`` and ``table.csv`` of the plan as it stands, and whether it is complete."""
    per_dataset = [_rows(plan, s, d) for s, d in zip(states, datas, strict=True)]
    primary = [rows[0] for rows in per_dataset]
    others = [r for rows in per_dataset for r in rows[1:]]
    complete = all(not r.missing for rows in per_dataset for r in rows)
    n = len(plan.datasets)
    ours_auc, ours_acc = _mean([r.auc["mean"] for r in primary]), _mean([r.acc["mean"] for r in primary])
    scored = sum(r.auc["mean"] is not None for r in primary)
    real = [d for d in plan.datasets if d not in plan.synthetic]
    stand_ins = [d for d in plan.datasets if d in plan.synthetic]
    lines = [
        f"# The paper's table, reproduced: plan `{plan.name}`", "",
        f"{'Complete' if complete else 'PARTIAL: some cells are missing (see Missing below)'}. "
        f"Input {plan.size}³; retrained for {plan.retrain_epochs} "
        f"epoch{'s' * (plan.retrain_epochs != 1)} with seed{'s' * (len(plan.seeds) != 1)} "
        f"{', '.join(map(str, plan.seeds))}; models chosen from each search's Pareto front: "
        f"{SELECTIONS[plan.selection]}.",
        f"Real data: {', '.join(real) or 'none'}. Synthetic stand-ins"
        + (f" (train split × {plan.synthetic_scale}): {', '.join(stand_ins)}" if stand_ins else ": none")
        + ". Numbers on synthetic stand-ins say nothing about the real datasets.", "",
        "Test AUC and ACC: mean ± sample standard deviation (ddof 1) over the seeds; 95 % CI: the interval "
        "of the mean over the seeds, Student's t with n − 1 degrees of freedom (scipy.stats.t), clipped to "
        "[0, 1]; none with one seed. FLOPs: a forward pass of one volume at the plan's size.", "",
        "## Searched models", "",
        *_markdown_table(_HEADER, [_cells(r) for r in primary]), "",
        "## Six-dataset mean" if n == 6 else f"## Mean over the {n} datasets", "",
        *_markdown_table(["Row", "Test AUC", "Test ACC"], [
            [f"nas3d reproduce, searched models ({scored} of {n} datasets)", _num(ours_auc), _num(ours_acc)],
            ["Seed study (published six-dataset mean)", _num(SEED_STUDY_MEAN[0]), _num(SEED_STUDY_MEAN[1])],
            *([f"{name} (MedMNIST v2, mean over these datasets)",
               _num(_mean([PUBLISHED[name][d][0] for d in plan.datasets])),
               _num(_mean([PUBLISHED[name][d][1] for d in plan.datasets]))]
              for name in ("ResNet-18+3D", "ResNet-50+3D")),
        ]), "",
    ]
    if others:
        lines += ["## Other retrained models", "", *_markdown_table(_HEADER, [_cells(r) for r in others]), ""]
    lines += ["## Published (MedMNIST v2, test at 28³)", "", *_markdown_table(
        ["Dataset", *(f"{m} {k}" for m in ("ResNet-18+3D", "ResNet-50+3D") for k in ("AUC", "ACC")),
         *(f"retrained {b} AUC" for b in plan.baselines)],
        [[d, *(_num(PUBLISHED[m][d][i]) for m in ("ResNet-18+3D", "ResNet-50+3D") for i in (0, 1)),
          *(_num(r.auc["mean"]) for r in others if r.dataset == d and r.role == "baseline")]
         for d in plan.datasets]), ""]
    missing = [f"- {r.dataset} {r.model}: {r.missing}" for rows in per_dataset for r in rows if r.missing]
    if missing:
        lines += ["## Missing", "", *missing, ""]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in primary:
        writer.writerow(row.csv_row("searched"))
    for row in others:
        writer.writerow(row.csv_row("other"))
    writer.writerow({"section": "mean", "dataset": f"{scored} of {n}", "model": "searched",
                     "test_auc_mean": ours_auc, "test_acc_mean": ours_acc})
    writer.writerow({"section": "published", "dataset": "six-dataset mean", "model": "seed study",
                     "test_auc_mean": SEED_STUDY_MEAN[0], "test_acc_mean": SEED_STUDY_MEAN[1]})
    for name in ("ResNet-18+3D", "ResNet-50+3D"):
        for d in plan.datasets:
            writer.writerow({"section": "published", "dataset": d, "model": name,
                             "test_auc_mean": PUBLISHED[name][d][0], "test_acc_mean": PUBLISHED[name][d][1]})
    return "\n".join(lines), out.getvalue(), complete


def default_out(storage: Any, plan_name: str) -> Path:
    """Where the table goes without ``--out``: beside a SQLite storage, else in the nas3d home."""
    spec = resolve_storage(storage)
    return (spec.file.parent if spec.file else storage_home()) / f"reproduce-{plan_name}"


def _states(storage: Any, plan: Plan) -> tuple[list[DatasetState], list[Any]]:
    from nas3d.study import load_study

    backend = make_storage(storage, must_exist=True)
    states = [dataset_state(plan, d, backend) for d in plan.datasets]
    datas = [load_study(plan.search_study(d), backend)[1].data for d in plan.datasets]
    return states, datas


def write_table(storage: Any, plan_name: str, out: str | Path | None = None) -> tuple[Path, bool]:
    """Write ``table.md`` and ``table.csv`` of the plan into ``out``; the folder and whether complete."""
    plan = load_plan(storage, plan_name)
    folder = Path(out) if out else default_out(storage, plan_name)
    folder.mkdir(parents=True, exist_ok=True)
    markdown, table_csv, complete = build_table(plan, *_states(storage, plan))
    atomic_write(folder / "table.md", lambda f: f.write(markdown.encode("utf-8")))
    atomic_write(folder / "table.csv", lambda f: f.write(table_csv.encode("utf-8")))
    return folder, complete


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{max(minutes, 1)}m"


def plan_status(storage: Any, plan_name: str) -> str:
    """One line per dataset: phase, trials done of budget, retrains done of planned, time left."""
    plan = load_plan(storage, plan_name)
    states, _ = _states(storage, plan)
    search_mean = _mean([s for st in states for s in st.search_seconds])
    job_mean = _mean([s for st in states for s in st.job_seconds])
    workers = {(t.system_attrs.get(records.WORKER) or {}).get("pid") for st in states for t in st.jobs
               if t.state == TrialState.RUNNING} | {None}
    running = max(1, len(workers) - 1 + sum(st.trials_running for st in states))
    epochs = f"{plan.retrain_epochs} retrain epoch" + ("s" if plan.retrain_epochs != 1 else "")
    lines = [f"plan {plan.name}: {len(plan.datasets)} datasets at {plan.size}³, seeds "
             f"{','.join(map(str, plan.seeds))}, {epochs}"]
    untimed = False  # some line's time left leaves out retrains that none has finished to time
    for st in states:
        planned = plan.models_planned(st.dataset, st.queued)
        done = st.count(TrialState.COMPLETE)
        least = (len(plan.baselines) + 1) * len(plan.seeds)
        trials_left = max(0, st.budget - st.trials_done)
        jobs_left = (planned if planned is not None else least) - done - st.count(TrialState.FAIL)
        search_left = (trials_left * search_mean / running if search_mean
                       else 0 if trials_left == 0 else None)
        eta = "?"
        if st.phase == "done":
            eta = "0m"
        elif search_left is not None and (jobs_left <= 0 or job_mean):
            eta = f"~{_duration(search_left + max(0, jobs_left) * (job_mean or 0) / running)}"
        elif search_left:  # no retrain has finished yet: its part is unknown, the search's is not
            eta, untimed = f"~{_duration(search_left)}+retrains", True
        failed = st.count(TrialState.FAIL)
        lines.append(
            f"  {st.dataset:<16} {st.phase:<10} trials {st.trials_done}/{st.budget}"
            + (f" ({st.trials_running} running)" if st.trials_running else "")
            + f"  retrains {done}/{planned if planned is not None else f'{least}+'}"
            + (f" ({failed} failed)" if failed else "") + f"  left {eta}")
    lines.append(f"  (time left: mean duration of the finished trials and retrains, over {running} running"
                 + ("; +retrains: none has finished yet to time them)" if untimed else ")"))
    return "\n".join(lines)
