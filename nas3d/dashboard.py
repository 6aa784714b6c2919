"""``nas3d dashboard``: the real optuna-dashboard on a study's storage, with its artifact store, and the
front as people want to see it inside it (a log-FLOPs Plotly figure and a note with the front table).

Who refreshes the figure and note: the dashboard process, in one background thread that looks every
``refresh_seconds`` (default 30) whether a study's finished trials changed and, if so, rewrites both.
Workers do no extra work at all; a refresh costs the storage one read of the study's trials and the
figure's and note's study system-attr writes (``bench/dashboard_refresh.py``: 0.15 s at 100 trials,
0.43 s at 1,000 on a 2-core VM with SQLite; a worker's per-trial storage time beside the default 30 s
refresher was within noise of its time alone).

The dashboard's admin endpoints (rename, delete studies and trials, upload artifacts) have **no
authentication**: it binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from nas3d.report import StudyFront, collect_retrain_results, front_markdown, study_front

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = [
    "FIGURE_ID",
    "NO_AUTH_WARNING",
    "DashboardRefresher",
    "front_figure",
    "refresh_study",
    "serve_dashboard",
    "write_front_png",
]

logger = logging.getLogger(__name__)

#: The id of the front figure in the study, so a refresh replaces it instead of adding another.
FIGURE_ID = "nas3d-pareto-front"
NO_AUTH_WARNING = ("the dashboard's admin endpoints (rename, delete, upload) have no authentication: "
                   "bind it to 127.0.0.1 (the default) or put it behind an authenticating proxy")
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def front_figure(fronts: Sequence[StudyFront]) -> go.Figure:
    """Val AUC against FLOPs on a log axis: every fully trained trial, the Pareto front highlighted and
    joined as a step line, hover with trial number, architecture, params and val ACC; seed
    architectures as dotted vertical lines at their FLOPs, retrained baselines as points with error
    bars."""
    import plotly.graph_objects as go

    fig = go.Figure()
    hover = ("<b>%{customdata[4]} trial %{customdata[0]}</b><br>val AUC %{y:.4f}<br>val ACC %{customdata[1]}"
             "<br>FLOPs %{x:.4s}<br>params %{customdata[2]}<br>%{customdata[3]}<extra></extra>")
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
            fig.add_trace(go.Scatter(
                x=[p.flops for p in points], y=[p.val_auc for p in points], mode="markers", name=label,
                marker=dict(size=size, color=color, opacity=0.45 if not line else 1.0,
                            line=dict(width=line, color="black")),
                customdata=[[p.number, _maybe(p.val_acc), _maybe(p.params, "{:,}"), p.arch, front.study_name]
                            for p in points],
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
    ax.set_title(f"Pareto front: {titles}  ·  dotted: seed study architectures", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def refresh_study(study: optuna.Study, retrain_runs: Sequence[dict[str, Any]] = ()) -> StudyFront:
    """Write the front figure (``save_plotly_graph_object``, id :data:`FIGURE_ID`) and the front
    table as the study note (``save_note``) into ``study``."""
    from optuna_dashboard import save_note, save_plotly_graph_object

    front = study_front(study, retrain_runs)
    save_plotly_graph_object(study, front_figure([front]), graph_object_id=FIGURE_ID)
    save_note(study, front_markdown(front))
    return front


class DashboardRefresher(threading.Thread):
    """Refreshes figure and note of ``study_names`` (None: every nas3d study in the storage) whenever
    their finished trials change, looking every ``interval`` seconds, until :meth:`stop`."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_names: Sequence[str] | None,
                 interval: float, retrain_paths: Sequence[str | Path] = ()) -> None:
        super().__init__(name="nas3d-dashboard-refresh", daemon=True)
        self.storage, self.study_names, self.interval = storage, study_names, interval
        self.retrain_paths = retrain_paths
        self.refreshes = 0
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.refresh_changed()
            except Exception as e:  # a storage hiccup must not end the refreshing: try again next time
                logger.warning("dashboard refresh failed: %s", e)
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def refresh_changed(self) -> int:
        """Refresh the studies whose finished trials changed since the last look; returns how many."""
        from nas3d.study import CONFIG_ATTR

        names = self.study_names or [s.study_name for s in optuna.get_all_study_summaries(self.storage)
                                     if CONFIG_ATTR in s.user_attrs]
        runs = collect_retrain_results(self.retrain_paths)
        done = 0
        for name in names:
            study = optuna.load_study(study_name=name, storage=self.storage)
            finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
            signature = (len(finished), max((t.number for t in finished), default=-1), len(runs))
            if self._seen.get(name) == signature:
                continue
            refresh_study(study, runs)
            self._seen[name] = signature
            self.refreshes += 1
            done += 1
        return done


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow request never holds up Ctrl-C


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.address_string(), format % args)


def serve_dashboard(storage: Any, study_name: str | None = None, *, host: str = "127.0.0.1",
                    port: int = 8080, refresh_seconds: float = 30.0,
                    retrain_paths: Sequence[str | Path] = (), say: Callable[[str], None] = print) -> int:
    """Serve optuna-dashboard on ``storage`` (string or spec) with its artifact store until Ctrl-C,
    keeping the front figure and note of ``study_name`` (or every nas3d study) fresh. Returns 0."""
    from optuna_dashboard import wsgi

    from nas3d.storages import artifact_store_for, make_storage, resolve_storage

    spec = resolve_storage(storage)
    backend = make_storage(spec)
    path = "/dashboard/"
    if study_name is not None:
        try:
            path += f"studies/{backend.get_study_id_from_name(study_name)}"
        except KeyError:
            raise LookupError(f"no study named {study_name!r} in {spec}; `nas3d status` lists them") from None
    if refresh_seconds <= 0:
        raise ValueError(f"--refresh must be a positive number of seconds, but got {refresh_seconds}")
    app = wsgi(backend, artifact_store=artifact_store_for(spec))
    try:
        server = make_server(host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                         "or --host") from None
    refresher = DashboardRefresher(backend, [study_name] if study_name else None, refresh_seconds,
                                   retrain_paths)
    refresher.start()
    shown_host = f"[{host}]" if ":" in host else host
    say(f"optuna-dashboard for {spec} at http://{shown_host}:{server.server_port}{path}  (Ctrl-C stops it)")
    logger.warning(NO_AUTH_WARNING)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        refresher.stop()
    say("dashboard stopped")
    return 0
