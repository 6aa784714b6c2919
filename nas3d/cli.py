"""The ``nas3d`` command: create-study, worker, launch, status, search.

Results go to stdout, logs to stderr; a user error is one line on stderr and exit code 2
(the traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence

import optuna

from nas3d.config import StudyConfig, default_study_config, load_study_config
from nas3d.storage import (
    DEFAULT_HEARTBEAT_INTERVAL,
    StorageUnavailable,
    make_storage,
    redact_url,
    resolve_storage_url,
)

logger = logging.getLogger("nas3d")

EXIT_USAGE = 2  # bad input: a worker that exits with it is not restarted


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        default=None,
        help="storage URL (sqlite:///..., postgresql://..., journal:PATH); default $NAS3D_STORAGE, "
        "else SQLite under ./storage",
    )


def _add_study_definition(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--study", metavar="FILE", help="study file (TOML), e.g. studies/smoke.toml")
    source.add_argument(
        "--dataset",
        help="a MedMNIST3D flag (organmnist3d, ...) or 'synthetic', with the seed study's defaults",
    )
    parser.add_argument("--size", type=int, choices=(28, 64), help="volume size (default: the file's, or 28)")
    parser.add_argument("--name", help="study name (overrides the file)")
    parser.add_argument("--n-trials", type=int, help="trial budget across all workers")
    parser.add_argument("--max-epochs", type=int, help="training epochs per trial, at most")
    parser.add_argument("--data-root", help="folder holding the MedMNIST npz files")
    parser.add_argument("--sampler", help="tpe, nsga2 or random")
    parser.add_argument("--warm-start", choices=("none", "seed"), help="enqueue the seed architectures first")
    parser.add_argument(
        "--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
        help="override any study-file value, e.g. --set train.patience=3 (repeatable)",
    )


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heartbeat-interval", type=int, default=DEFAULT_HEARTBEAT_INTERVAL,
                        help="seconds between a running trial's heartbeats (crash detection)")
    parser.add_argument("--grace-period", type=int, default=None,
                        help="seconds without heartbeat before a trial counts as dead (default 4 beats)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per trial")


def _add_launch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", help="comma-separated GPU indices, e.g. 0,1,2,3 (default: all visible)")
    parser.add_argument("--workers-per-gpu", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="worker processes when running on the CPU")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is visible")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nas3d", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create-study", help="create a study (or check an existing one) from a study file")
    _add_storage(p)
    _add_study_definition(p)

    p = sub.add_parser("worker", help="run trials of a study on one device until its budget is spent")
    _add_storage(p)
    p.add_argument("--study-name", required=True)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    _add_worker_options(p)

    p = sub.add_parser("launch", help="start and supervise workers for a study")
    _add_storage(p)
    p.add_argument("--study-name", required=True)
    _add_launch_options(p)
    _add_worker_options(p)

    p = sub.add_parser("status", help="trial counts by state and the Pareto front")
    _add_storage(p)
    p.add_argument("--study-name", help="default: every study in the storage")

    p = sub.add_parser("search", help="create a study, run workers until its budget is spent, summarise")
    _add_storage(p)
    _add_study_definition(p)
    _add_launch_options(p)
    _add_worker_options(p)
    return parser


def resolve_config(args: argparse.Namespace) -> StudyConfig:
    """The study file (or dataset defaults) with the command-line overrides applied."""
    if args.study:
        config = load_study_config(args.study)
    else:
        config = default_study_config(args.dataset or "organmnist3d", args.size or 28)
    overrides: dict[str, object] = {}
    for flag, key in (
        ("size", "data.size"), ("name", "study.name"), ("n_trials", "study.n_trials"),
        ("max_epochs", "train.max_epochs"), ("data_root", "data.root"), ("sampler", "study.sampler"),
        ("warm_start", "study.warm_start"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects TABLE.KEY=VALUE, but got {item!r}")
        overrides[key.strip()] = value.strip()
    return config.with_overrides(overrides, source="command line") if overrides else config


def _create(args: argparse.Namespace) -> tuple[str, StudyConfig]:
    from nas3d.data import ensure_file
    from nas3d.study import create_study

    config = resolve_config(args)
    # Fail on missing data before anything is written, and never fall back to other data.
    ensure_file(config.data)
    storage_url = resolve_storage_url(args.storage)
    study = create_study(config, make_storage(storage_url))
    budget = config.study.n_trials
    print(f"study {study.study_name!r} ready in {redact_url(storage_url)} (budget {budget} trials)")
    return storage_url, config


def _worker_args(args: argparse.Namespace) -> list[str]:
    extra = ["--heartbeat-interval", str(args.heartbeat_interval)]
    if args.grace_period is not None:
        extra += ["--grace-period", str(args.grace_period)]
    if args.progress:
        extra.append("--progress")
    return extra


def _launch(args: argparse.Namespace, study_name: str, storage_url: str) -> int:
    import torch

    from nas3d.launch import launch, plan_slots

    gpus: list[int] | None = None
    if not args.cpu:
        if args.gpus:
            gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
        elif torch.cuda.is_available():
            gpus = list(range(torch.cuda.device_count()))
    slots = plan_slots(gpus=gpus, workers_per_gpu=args.workers_per_gpu, cpu_workers=args.workers)
    return launch(study_name, storage_url, slots, _worker_args(args))


def _status(storage_url: str, study_name: str | None) -> None:
    storage = make_storage(storage_url)
    names = [study_name] if study_name else [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not names:
        print(f"no studies in {redact_url(storage_url)}")
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        print(format_status(study))


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, LookupError, StorageUnavailable, FileNotFoundError) as e:
        if args.debug:
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"nas3d: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "create-study":
        _create(args)
        return 0
    if args.command == "worker":
        from nas3d.worker import run_worker

        ran = run_worker(
            args.study_name, args.storage, device=args.device, worker_index=args.worker_index,
            heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
            progress=args.progress,
        )
        logger.info("worker %d ran %d trials", args.worker_index, ran)
        return 0
    if args.command == "launch":
        return _launch(args, args.study_name, resolve_storage_url(args.storage))
    if args.command == "status":
        _status(resolve_storage_url(args.storage), args.study_name)
        return 0
    if args.command == "search":
        storage_url, config = _create(args)
        code = _launch(args, config.study.name, storage_url)
        _status(storage_url, config.study.name)
        return code
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
