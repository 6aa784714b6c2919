"""A study's Pareto front as people see it: its fully trained trials, the front among them, its
hypervolume and the points to compare with (seed architectures, retrained baselines), and the ways it
is shown: the dashboard's Plotly figure, the report's PNG, the Markdown table of the study note.

``nas3d dashboard`` (figure and note, kept fresh in the study), ``nas3d report`` (PNG, HTML, Markdown)
and ``nas3d status`` (its hypervolume and table) all take the front from here.

Each point carries its val AUC's interval (docs/studies.md#uncertainty-on-the-front): mean ± 2
standard errors of its fold scores where it was cross-validated (``data.cv_folds`` > 1), else the 95 %
BCa bootstrap interval over the val samples recorded when it was trained (``val_auc_ci``). Front members whose
intervals overlap are "statistically tied": the data cannot tell their val AUCs apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas3d import records

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go

__all__ = [
    "SEED_STUDY_SIZE",
    "FrontPoint",
    "Reference",
    "StudyFront",
    "collect_retrain_results",
    "fmt_or_dash",
    "front_figure",
    "interval_note",
    "front_markdown",
    "int_or_dash",
    "pareto_points",
    "study_data_config",
    "study_front",
    "write_front_png",
]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


@dataclass(frozen=True)
class FrontPoint:
    """One fully trained trial as the front shows it."""

    number: int
    val_auc: float
    flops: float
    val_acc: float | None
    params: int | None
    arch: str
    pareto: bool
    # The val AUC's interval: "folds" (mean ± 2 SE over the folds) or "bootstrap" (95 % BCa over the val
    # samples); None where the trial recorded neither (trained before intervals were recorded).
    interval: tuple[float, float] | None = None
    interval_kind: str | None = None
    tied_with: tuple[int, ...] = ()  # the other front members whose intervals overlap this one's

    @property
    def interval_text(self) -> str:
        """``[low, high]`` with ``~`` and the members it is tied with, or ``-``."""
        if self.interval is None:
            return "-"
        text = f"[{self.interval[0]:.3f}, {self.interval[1]:.3f}]"
        return text + (" ~" + ",".join(map(str, self.tied_with)) if self.tied_with else "")


@dataclass(frozen=True)
class Reference:
    """A point to compare against: a seed architecture (``val_auc`` None: the seed published no
    validation AUC, so it marks FLOPs only) or a retrained baseline (its mean val AUC)."""

    label: str
    flops: float
    val_auc: float | None = None
    val_auc_std: float | None = None


@dataclass(frozen=True)
class StudyFront:
    """A study's fully trained trials, its Pareto front among them, its hypervolume and references."""

    study_name: str
    study_id: int
    data: Any  # nas3d.data.DataConfig, or None for a study nas3d did not create
    points: tuple[FrontPoint, ...]
    hypervolume: float | None
    references: tuple[Reference, ...] = ()

    @property
    def front(self) -> list[FrontPoint]:
        """The Pareto trials, by descending val AUC."""
        return sorted((p for p in self.points if p.pareto), key=lambda p: (-p.val_auc, p.flops))

    @property
    def dataset(self) -> str:
        return self.data.dataset if self.data is not None else "?"


def study_data_config(study: optuna.Study) -> Any:
    """The DataConfig of a nas3d study (from its stored configuration), or None for another study."""
    from nas3d.config import StudyConfig

    stored = study.user_attrs.get(records.CONFIG)
    if stored is None:
        return None
    return StudyConfig.from_dict(stored, source=f"study {study.study_name!r}").data


def pareto_points(trials: Sequence[Any]) -> list[FrontPoint]:
    """The fully trained trials (``nas3d.pareto.fully_trained``, as the hypervolume counts them), each
    marked whether it is on their Pareto front (max val AUC, min FLOPs; ties both kept)."""
    import moocore
    import numpy as np

    from nas3d.pareto import fully_trained

    done = fully_trained(trials)
    if not done:
        return []
    values = np.array([[t.values[0], t.values[1]] for t in done], dtype=float)
    on_front = moocore.is_nondominated(values, maximise=[True, False], keep_weakly=True)
    points = [
        FrontPoint(number=t.number, val_auc=float(t.values[0]), flops=float(t.values[1]),
                   val_acc=t.user_attrs.get(records.VAL_ACC), params=t.user_attrs.get(records.PARAMS),
                   arch=t.user_attrs.get(records.ARCH, ""), pareto=bool(keep), **_interval(t))
        for t, keep in zip(done, on_front, strict=True)
    ]
    return _mark_ties(points)


def _interval(trial: Any) -> dict[str, Any]:
    """A trial's val AUC interval and its kind: its folds' (nas3d.cv.fold_interval), else its recorded
    bootstrap interval, else none."""
    from nas3d.cv import fold_interval

    folds = trial.user_attrs.get(records.FOLD_VAL_AUC) or []
    if len(folds) > 1:
        return {"interval": fold_interval(folds), "interval_kind": "folds"}
    ci = trial.user_attrs.get(records.VAL_AUC_CI)
    if ci:
        return {"interval": (float(ci[0]), float(ci[1])), "interval_kind": "bootstrap"}
    return {}


def _mark_ties(points: list[FrontPoint]) -> list[FrontPoint]:
    """Each front member with the other members whose intervals overlap its own."""
    import dataclasses

    members = [p for p in points if p.pareto and p.interval is not None]

    def ties(p: FrontPoint) -> tuple[int, ...]:
        return tuple(sorted(q.number for q in members if q.number != p.number
                            and q.interval[0] <= p.interval[1] and p.interval[0] <= q.interval[1]))

    return [dataclasses.replace(p, tied_with=ties(p)) if p in members else p for p in points]


def interval_note(fronts: Sequence[StudyFront]) -> str | None:
    """One line saying what the front's intervals are, or None where no member has one."""
    kinds = {p.interval_kind for f in fronts for p in f.front if p.interval_kind}
    if not kinds:
        return None
    texts = (("folds", "mean ± 2 standard errors over the folds"),
             ("bootstrap", "95 % BCa bootstrap over the val samples"))
    parts = [text for kind, text in texts if kind in kinds]
    return ("val AUC intervals: " + " or ".join(parts) + "; ~N: statistically tied with trial N (the "
            "intervals overlap)")


def study_front(study: optuna.Study, retrain_runs: Sequence[dict[str, Any]] = (),
                seed_references: str = "all") -> StudyFront:
    """:class:`StudyFront` of ``study``. References, each only where it was measured at the study's input
    size: the seed study's architectures (``seed_references`` "all", "same-dataset" or "none"; chosen at
    :data:`SEED_STUDY_SIZE`, counted at this study's input shape) and the retrained baselines among
    ``retrain_runs`` (results.json documents) on the same dataset and size."""
    from nas3d.pareto import study_hypervolume

    data = study_data_config(study)
    trials = study.get_trials(deepcopy=False)
    hypervolume = study_hypervolume(trials, data) if data is not None else None
    references: list[Reference] = []
    if data is not None and seed_references != "none":
        references += _seed_references(data, same_dataset_only=seed_references == "same-dataset")
    if data is not None:
        for run in retrain_runs:
            summary = run.get("summary", {})
            if (run["model"]["kind"] == "baseline" and run["dataset"] == data.dataset
                    and run["size"] == data.size and summary.get("val_auc")):
                references.append(Reference(label=f"{run['model']['baseline']} (retrained)",
                                            flops=float(run["costs"]["flops"]),
                                            val_auc=summary["val_auc"]["mean"],
                                            val_auc_std=summary["val_auc"]["std"]))
    return StudyFront(study_name=study.study_name, study_id=study._study_id, data=data,
                      points=tuple(pareto_points(trials)), hypervolume=hypervolume,
                      references=tuple(references))


#: The input size the seed study searched and scored its published architectures at (MedMNIST3D 28³).
SEED_STUDY_SIZE = 28


def _seed_references(data: Any, same_dataset_only: bool) -> list[Reference]:
    """The seed study's architectures as FLOPs marks, for a study at the size they were chosen at only:
    at another size they mean nothing, and large ones squeeze a small study's points into a corner."""
    if data.size != SEED_STUDY_SIZE:
        return []
    return [
        Reference(label=f"seed study: {dataset}", flops=float(flops))
        for dataset, flops in _seed_flops(data.size, data.in_channels, data.num_classes)
        if not same_dataset_only or dataset == data.dataset
    ]


@cache
def _seed_flops(size: int, in_channels: int, num_classes: int) -> tuple[tuple[str, int], ...]:
    """FLOPs of each published seed architecture at this input shape (meta device, once per shape)."""
    from nas3d.costs import measure_costs
    from nas3d.seeds import seed_architectures

    return tuple((dataset, measure_costs(arch, in_channels, num_classes, size, with_thop=False).flops)
                 for dataset, arch in seed_architectures().items())


def collect_retrain_results(paths: Sequence[str | Path] = ()) -> list[dict[str, Any]]:
    """The results.json documents under ``paths`` (each a folder written by ``nas3d retrain`` or a
    folder of them); without paths, those under ``<storage home>/retrain`` if it exists."""
    from nas3d.retrain import RESULTS_FILE, load_results
    from nas3d.storages import storage_home

    folders = [Path(p) for p in paths]
    if not paths:
        default = storage_home() / "retrain"
        folders = [default] if default.is_dir() else []
    found: list[dict[str, Any]] = []
    for folder in folders:
        if not folder.exists():
            raise FileNotFoundError(f"{folder} not found; give folders written by `nas3d retrain`")
        files = [folder] if folder.is_file() or (folder / RESULTS_FILE).is_file() else sorted(
            folder.glob(f"*/{RESULTS_FILE}"))
        found += [load_results(f) for f in files]
    return found


def front_markdown(front: StudyFront) -> str:
    """The study note: its front as a Markdown table, with the hypervolume."""
    lines = [f"## Pareto front of {front.study_name}", ""]
    if front.hypervolume is not None:
        lines.append(f"Hypervolume (val AUC × log10 FLOPs, docs/metrics.md#hypervolume): "
                     f"**{front.hypervolume:.4f}** over {len(front.points)} fully trained trials.")
        lines.append("")
    if not front.front:
        return "\n".join([*lines, "No fully trained trial yet."])
    lines += ["| trial | val AUC | interval | val ACC | MFLOPs | params | architecture |",
              "|---:|---:|---|---:|---:|---:|---|"]
    for p in front.front:
        lines.append(f"| {p.number} | {p.val_auc:.4f} | {p.interval_text} | {fmt_or_dash(p.val_acc)} | "
                     f"{p.flops / 1e6:,.2f} | {int_or_dash(p.params)} | `{p.arch}` |")
    note = interval_note([front])
    return "\n".join([*lines, "", note] if note else lines)


def fmt_or_dash(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def int_or_dash(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def front_figure(fronts: Sequence[StudyFront]) -> go.Figure:
    """Val AUC against FLOPs on a log axis: every fully trained trial, the Pareto front highlighted and
    joined as a step line, hover with trial number, architecture, params and val ACC; seed
    architectures as dotted vertical lines at their FLOPs, retrained baselines as points with error
    bars."""
    import plotly.graph_objects as go

    fig = go.Figure()
    hover = ("<b>%{customdata[4]} trial %{customdata[0]}</b><br>val AUC %{y:.4f} %{customdata[5]}"
             "<br>val ACC %{customdata[1]}<br>FLOPs %{x:.4s}<br>params %{customdata[2]}<br>%{customdata[3]}"
             "<extra></extra>")
    auc_low = min([0.5, *(p.val_auc for f in fronts for p in f.points),
                   *(r.val_auc for f in fronts for r in f.references if r.val_auc is not None)])
    seen_refs: set[str] = set()
    for i, front in enumerate(fronts):
        color = _COLORS[i % len(_COLORS)]
        name = front.study_name if len(fronts) > 1 else "trials"
        rest = [p for p in front.points if not p.pareto]
        best = front.front
        series = ((rest, name, 7, 0), (best, f"{front.study_name}: Pareto front", 12, 2))
        for points, label, size, line in series:
            # The front's members with their val AUC intervals as error bars (none: a bar of zero).
            bars = dict(type="data", symmetric=False, visible=True, color=color, thickness=1.2,
                        array=[p.interval[1] - p.val_auc if p.interval else 0.0 for p in points],
                        arrayminus=[p.val_auc - p.interval[0] if p.interval else 0.0 for p in points]) \
                if line else None
            fig.add_trace(go.Scatter(
                x=[p.flops for p in points], y=[p.val_auc for p in points], mode="markers", name=label,
                marker=dict(size=size, color=color, opacity=0.45 if not line else 1.0,
                            line=dict(width=line, color="black")),
                error_y=bars,
                customdata=[[p.number, _maybe(p.val_acc), _maybe(p.params, "{:,}"), p.arch, front.study_name,
                             _interval_hover(p)] for p in points],
                hovertemplate=hover,
            ))
        if best:
            by_flops = sorted(best, key=lambda p: p.flops)
            fig.add_trace(go.Scatter(x=[p.flops for p in by_flops], y=[p.val_auc for p in by_flops],
                                     mode="lines", line=dict(shape="hv", color=color, width=1.5),
                                     hoverinfo="skip", showlegend=False))
        for ref in front.references:
            key = f"{ref.label}@{ref.flops}"
            if key in seen_refs:
                continue
            seen_refs.add(key)
            if ref.val_auc is None:  # FLOPs only: a dotted vertical line, labelled on hover and at its top
                top = 1.0 - 0.03 * (len(seen_refs) % 2)  # alternate label heights: neighbours do not overlap
                fig.add_trace(go.Scatter(
                    x=[ref.flops, ref.flops], y=[auc_low, top], mode="lines+text",
                    text=["", ref.label.removeprefix("seed study: ")], textposition="top center",
                    textfont=dict(size=9, color="#555"), name=ref.label,
                    line=dict(dash="dot", color="#888", width=1), showlegend=False,
                    hovertemplate=f"{ref.label}<br>FLOPs {ref.flops:,.0f}<extra></extra>",
                ))
            else:
                fig.add_trace(go.Scatter(
                    x=[ref.flops], y=[ref.val_auc], mode="markers+text", text=[ref.label], name=ref.label,
                    textposition="bottom center", marker=dict(symbol="diamond", size=12, color="#444"),
                    error_y=dict(type="data", array=[ref.val_auc_std or 0.0], visible=True),
                    hovertemplate=f"{ref.label}<br>val AUC %{{y:.4f}}<br>FLOPs {ref.flops:,.0f}"
                                  "<extra></extra>",
                ))
    titles = ", ".join(f"{f.study_name} (HV {f.hypervolume:.3f})" if f.hypervolume is not None
                       else f.study_name for f in fronts)
    if any(r.val_auc is None for f in fronts for r in f.references):
        titles += " · dotted: seed study architectures"
    fig.update_layout(title=f"Pareto front: {titles}", template="plotly_white", hovermode="closest",
                      legend=dict(orientation="h", yanchor="top", y=-0.15), margin=dict(t=60))
    fig.update_xaxes(type="log", title="FLOPs (log scale, batch of one)")
    fig.update_yaxes(title="validation AUC", range=[auc_low - 0.02, 1.04])
    return fig


def _interval_hover(point: FrontPoint) -> str:
    """The interval as the figure's hover shows it: its kind, and the members it is tied with."""
    if point.interval is None:
        return ""
    text = f"[{point.interval[0]:.3f}, {point.interval[1]:.3f}] ({point.interval_kind})"
    if point.tied_with:
        text += "<br>statistically tied with " + ", ".join(f"trial {n}" for n in point.tied_with)
    return text


def _maybe(value: Any, pattern: str = "{:.4f}") -> str:
    return "-" if value is None else pattern.format(value)


def write_front_png(fronts: Sequence[StudyFront], path: str | Path) -> Path:
    """The same figure as :func:`front_figure` as a PNG, drawn by matplotlib (Plotly's own PNG export
    needs a Chrome at hand; a report must not)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; only files
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    auc_low = min([0.5, *(p.val_auc for f in fronts for p in f.points)])
    drawn: set[str] = set()
    for i, front in enumerate(fronts):
        color = _COLORS[i % len(_COLORS)]
        rest = [p for p in front.points if not p.pareto]
        ax.scatter([p.flops for p in rest], [p.val_auc for p in rest], s=20, color=color, alpha=0.45,
                   label=front.study_name if len(fronts) > 1 else "trials")
        best = sorted(front.front, key=lambda p: p.flops)
        if best:
            ax.step([p.flops for p in best], [p.val_auc for p in best], where="post", color=color, lw=1.2)
            ax.scatter([p.flops for p in best], [p.val_auc for p in best], s=60, color=color,
                       edgecolors="black", linewidths=1.5, zorder=3,
                       label=f"{front.study_name}: Pareto front")
            shown = [p for p in best if p.interval is not None]
            if shown:  # the members' val AUC intervals
                ax.errorbar([p.flops for p in shown], [p.val_auc for p in shown], fmt="none", ecolor=color,
                            elinewidth=1, capsize=3, zorder=2,
                            yerr=[[p.val_auc - p.interval[0] for p in shown],
                                  [p.interval[1] - p.val_auc for p in shown]])
            for p in best:
                ax.annotate(str(p.number), (p.flops, p.val_auc), textcoords="offset points", xytext=(5, 4),
                            fontsize=8)
        for ref in front.references:
            if ref.label in drawn:
                continue
            drawn.add(ref.label)
            if ref.val_auc is None:
                ax.axvline(ref.flops, color="#888", ls=":", lw=1)
                ax.annotate(ref.label.removeprefix("seed study: "), (ref.flops, 1.0), rotation=90, fontsize=7,
                            color="#555", ha="right", va="top")
            else:
                ax.errorbar([ref.flops], [ref.val_auc], yerr=[ref.val_auc_std or 0.0], fmt="D", color="#444",
                            label=ref.label)
    ax.set_xscale("log")
    ax.set_ylim(auc_low - 0.02, 1.01)
    ax.set_xlabel("FLOPs (log scale, batch of one)")
    ax.set_ylabel("validation AUC")
    titles = ", ".join(f"{f.study_name} (HV {f.hypervolume:.3f})" if f.hypervolume is not None
                       else f.study_name for f in fronts)
    dotted = "  ·  dotted: seed study architectures" if any(r.val_auc is None for f in fronts
                                                            for r in f.references) else ""
    ax.set_title(f"Pareto front: {titles}{dotted}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
