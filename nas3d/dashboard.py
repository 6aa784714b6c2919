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
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from nas3d import records
from nas3d.front import StudyFront, collect_retrain_results, front_figure, front_markdown, study_front

__all__ = [
    "FIGURE_ID",
    "NO_AUTH_WARNING",
    "DashboardRefresher",
    "refresh_study",
    "serve_dashboard",
]

logger = logging.getLogger(__name__)

#: The id of the front figure in the study, so a refresh replaces it instead of adding another.
FIGURE_ID = "nas3d-pareto-front"
NO_AUTH_WARNING = ("the dashboard's admin endpoints (rename, delete, upload) have no authentication: "
                   "bind it to 127.0.0.1 (the default) or put it behind an authenticating proxy")


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

    def stop(self, wait: float = 30.0) -> bool:
        """Ask the thread to stop and wait for a refresh in flight to end (a figure takes seconds, more
        on a loaded machine; the next study is not started), at most ``wait`` seconds; returns whether
        it ended, so the interpreter does not shut down under a daemon thread that is writing to the
        storage. A refresh cut short only leaves the previous figure or note, which the next dashboard
        rewrites."""
        self._stop_event.set()
        self.join(timeout=wait)
        return not self.is_alive()

    def refresh_changed(self) -> int:
        """Refresh the studies whose finished trials changed since the last look; returns how many."""
        names = self.study_names or [s.study_name for s in optuna.get_all_study_summaries(self.storage)
                                     if records.CONFIG in s.user_attrs]
        runs = collect_retrain_results(self.retrain_paths)
        done = 0
        for name in names:
            if self._stop_event.is_set():
                break
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


def _listen_for_ctrl_c() -> Any:
    """Make SIGINT raise KeyboardInterrupt in this (main) thread even where the parent left it ignored
    or blocked (a background job of a shell, or the test suite at times: Python keeps an inherited
    SIG_IGN, and the dashboard then served on after SIGINT). Returns the previous handler, or None off
    the main thread, where signals cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        return None
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    return signal.signal(signal.SIGINT, signal.default_int_handler)


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
    previous = _listen_for_ctrl_c()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        server.server_close()
        if not refresher.stop():
            logger.warning("a front refresh is still writing to the storage; exiting without waiting for it")
    say("dashboard stopped")
    return 0
