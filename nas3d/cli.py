"""The ``nas3d`` command: create-study, worker, launch, status, search, export, retrain, compare.

Results go to stdout, logs to stderr; a user error is one line on stderr and exit code 2
(the traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from nas3d.config import StudyConfig, default_study_config, load_study_config
from nas3d.storages import (
    DEFAULT_HEARTBEAT_INTERVAL,
    StorageUnavailable,
    make_storage,
    redact_url,
    resolve_storage_url,
    storage_home,
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

    p = sub.add_parser("export", help="copy a trial's checkpoint out of the study's artifact store")
    _add_storage(p)
    p.add_argument("--study-name", required=True)
    p.add_argument("--trial", type=int, required=True, help="trial number, as `nas3d status` shows it")
    p.add_argument("--out", required=True, metavar="FILE.pt", help="where to write the checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")

    p = sub.add_parser("retrain", help="final training by the paper's protocol (full train split, 200 "
                       "epochs, five seeds), then test AUC/ACC")
    _add_storage(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="FILE",
                      help="a checkpoint from `nas3d export` (only its architecture is used)")
    what.add_argument("--study-name", help="a study; with --trial")
    what.add_argument("--baseline", help=f"a ResNet baseline: {', '.join(_baseline_names())}")
    p.add_argument("--trial", type=int, help="trial number (with --study-name)")
    p.add_argument("--dataset", help="MedMNIST3D flag or 'synthetic' (default: the one the checkpoint or "
                   "study recorded; required with --baseline)")
    p.add_argument("--size", type=int, help="volume size, 28 or 64 (default: the recorded one, else 28)")
    p.add_argument("--data-root", help="folder holding the MedMNIST npz files")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seeds", default="0,42,143,1234,3074", help="comma-separated seeds")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=None,
                   help="stop after this many epochs without a lower val loss (default: never)")
    p.add_argument("--no-amp", action="store_true", help="train in float32 on CUDA too (default: "
                   "mixed precision on CUDA; the CPU trains in float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <storage home>/retrain/<name>)")
    p.add_argument("--force", action="store_true", help="retrain over an existing results.json in DIR")
    p.add_argument("--progress", action="store_true", help="show a progress bar per seed")
    p.add_argument(
        "--set", action="append", default=[], metavar="data.KEY=VALUE",
        help="override a data setting, e.g. --set data.download=false (repeatable)",
    )

    p = sub.add_parser("compare", help="retrain results side by side with the published MedMNIST numbers")
    p.add_argument("runs", nargs="+", metavar="DIR", help="folders written by `nas3d retrain`")
    return parser


def _baseline_names() -> list[str]:
    from nas3d.baselines import BASELINES

    return list(BASELINES)


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


def _load_trial(
    storage: optuna.storages.BaseStorage, study_name: str, number: int
) -> optuna.trial.FrozenTrial:
    from nas3d.study import StudyNotFound

    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        raise StudyNotFound(f"no study named {study_name!r} in this storage; `nas3d status` lists them "
                            "(is --storage / $NAS3D_STORAGE the one the workers used?)") from None
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    except KeyError:
        count = len(storage.get_all_trials(study_id, deepcopy=False))
        numbers = f"numbered 0 to {count - 1}" if count else "none yet"
        raise LookupError(f"study {study_name!r} has no trial {number} (its trials: {numbers})") from None
    return storage.get_trial(trial_id)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _no_checkpoint_reason(trial: optuna.trial.FrozenTrial) -> str:
    state = trial.state.name.lower()
    attrs = trial.user_attrs
    if trial.state.name in ("RUNNING", "WAITING"):
        return f"it is {state}; export it once it completes"
    if trial.state.name == "COMPLETE":
        return "it completed without one (its worker had no artifact store)"
    reason = f"it {'was ' if trial.state.name == 'PRUNED' else ''}{state}"
    reason += f" ({_one_line(attrs.get('failure_reason', 'no reason recorded'))})"
    if "duplicate_of" in attrs:
        reason += f"; export trial {attrs['duplicate_of']}, which trained this architecture"
    return reason


def _export(args: argparse.Namespace) -> None:
    from optuna.artifacts import download_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound

    from nas3d.checkpoint import load_checkpoint
    from nas3d.storages import artifact_store_for

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to overwrite it, or choose another --out")
    storage_url = resolve_storage_url(args.storage)
    trial = _load_trial(make_storage(storage_url), args.study_name, args.trial)
    artifact_id = trial.user_attrs.get("checkpoint_artifact")
    if artifact_id is None:
        raise LookupError(
            f"trial {trial.number} of study {args.study_name!r} has no checkpoint: "
            + _no_checkpoint_reason(trial)
        )
    store = artifact_store_for(storage_url)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and move it in whole: an interrupted export never leaves half a file
    # under the real name, and --force replaces the old file only with one that loads.
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        download_artifact(artifact_store=store, file_path=str(partial), artifact_id=artifact_id)
        checkpoint = load_checkpoint(partial)
        os.replace(partial, out)
    except ArtifactNotFound:
        raise LookupError(
            f"trial {trial.number}'s checkpoint (artifact {artifact_id}) is not in the artifact store "
            f"{getattr(store, '_base_path', '?')}; point $NAS3D_ARTIFACTS at the folder the workers wrote to"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    metrics = checkpoint.metadata.get("metrics", {})
    print(
        f"exported trial {trial.number} of study {args.study_name!r} to {out}: "
        f"{checkpoint.architecture.short_str()}, val_auc {metrics.get('val_auc', float('nan')):.4f}, "
        f"{metrics.get('flops', 0) / 1e6:.1f} MFLOPs"
    )


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"--seeds expects comma-separated integers such as 0,42,143, but got {text!r}"
        ) from None


def _torch_device(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, but got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, but got {name!r}")
    return device


def _recorded_data(args: argparse.Namespace, factory: Any, storage: Any) -> Any:
    """The data the source was trained on: the study's stored config, or the checkpoint's metadata."""
    from nas3d.data import SYNTHETIC, DataConfig

    if args.study_name:
        from nas3d.study import load_study

        _, config = load_study(args.study_name, storage)
        return config.data
    source = factory.source
    if "data" in source:
        return DataConfig(**source["data"])
    if "dataset" in source:
        classes = {"synthetic_classes": source["num_classes"]} if source["dataset"] == SYNTHETIC else {}
        return DataConfig(dataset=source["dataset"], size=source["input_size"], **classes)
    return None


def _retrain_data(args: argparse.Namespace, recorded: Any) -> Any:
    from nas3d.config import StudyConfig, StudySettings
    from nas3d.data import DATASETS, SYNTHETIC, DataConfig

    if args.dataset is None and recorded is None:
        what = "--baseline" if args.baseline else "this checkpoint records no dataset, so it"
        raise ValueError(f"{what} needs --dataset: one of {', '.join((*DATASETS, SYNTHETIC))}")
    if args.dataset is not None and (recorded is None or recorded.dataset != args.dataset):
        keep_size = recorded is not None and args.dataset != SYNTHETIC and recorded.dataset != SYNTHETIC
        recorded = DataConfig(dataset=args.dataset, size=recorded.size if keep_size else 28)
    overrides: dict[str, object] = {}
    if args.size is not None:
        overrides["data.size"] = args.size
    if args.data_root is not None:
        overrides["data.root"] = args.data_root
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().startswith("data."):
            raise ValueError(f"--set expects data.KEY=VALUE (training has its own flags: --epochs, --lr, "
                             f"--batch-size, ...), but got {item!r}")
        overrides[key.strip()] = value.strip()
    if not overrides:
        return recorded
    holder = StudyConfig(study=StudySettings(name="retrain"), data=recorded)
    return holder.with_overrides(overrides, source="command line").data


def _retrain(args: argparse.Namespace) -> int:
    from nas3d.retrain import ModelFactory, RetrainConfig, retrain

    if args.trial is not None and not args.study_name:
        raise ValueError("--trial goes with --study-name; a checkpoint or baseline needs no trial number")
    if args.study_name and args.trial is None:
        raise ValueError("--study-name needs --trial N (the trial number `nas3d status` shows)")
    config = RetrainConfig(
        epochs=args.epochs, seeds=_parse_seeds(args.seeds), batch_size=args.batch_size, lr=args.lr,
        patience=args.patience, amp=not args.no_amp,
    )
    device = _torch_device(args.device)
    storage = None
    if args.checkpoint:
        factory = ModelFactory.from_checkpoint(args.checkpoint)
    elif args.study_name:
        storage = make_storage(resolve_storage_url(args.storage))
        factory = ModelFactory.from_trial(args.study_name, _load_trial(storage, args.study_name, args.trial))
    else:
        factory = ModelFactory.from_baseline(args.baseline)
    recorded = None if args.baseline else _recorded_data(args, factory, storage)
    data = _retrain_data(args, recorded)
    default_out = storage_home() / "retrain" / f"{factory.name}-{data.dataset}-{data.size}"
    out = Path(args.out) if args.out else default_out
    model = factory.architecture.short_str() if factory.architecture is not None else factory.baseline
    epochs = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}"
    print(f"retraining {factory.name} ({model}) on {data.dataset} {data.size}^3, {epochs}, "
          f"seeds {','.join(map(str, config.seeds))}, on {device}, into {out}")
    print(_SEED_HEADER)
    report = retrain(factory, data, config, device, out, overwrite=args.force, progress=args.progress,
                     on_seed=lambda seed: print(_seed_row(seed), flush=True))
    print(_mean_line(report.results["summary"], len(config.seeds)))
    print(f"results: {report.results_path}")
    if report.failed:
        print(f"nas3d: {len(report.failed)} of {len(report.seeds)} seeds failed "
              f"({'; '.join(f'seed {s.seed}: {s.reason}' for s in report.failed)})", file=sys.stderr)
        return 1
    return 0


_SEED_COLUMNS = ("seed", "val_auc", "val_acc", "test_auc", "test_acc", "best_ep", "seconds")
_SEED_HEADER = "  " + "  ".join(f"{c:>8}" for c in _SEED_COLUMNS)


def _seed_row(seed: Any) -> str:
    if not seed.completed:
        return f"  {seed.seed:>8}  failed: {seed.reason}"
    cells = (seed.seed, f"{seed.val_auc:.4f}", f"{seed.val_acc:.4f}", f"{seed.test_auc:.4f}",
             f"{seed.test_acc:.4f}", seed.best_epoch, f"{seed.seconds:.1f}")
    return "  " + "  ".join(f"{c:>8}" for c in cells)


def _mean_std(entry: dict[str, float] | None) -> str:
    return "-" if entry is None else f"{entry['mean']:.4f}±{entry['std']:.4f}"


def _mean_line(summary: dict[str, Any], seeds: int) -> str:
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


def _compare(paths: Sequence[str]) -> None:
    from nas3d.retrain import load_results

    print(format_comparison([(path, load_results(path)) for path in paths]))


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
    if args.command == "export":
        _export(args)
        return 0
    if args.command == "retrain":
        return _retrain(args)
    if args.command == "compare":
        _compare(args.runs)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
