"""``nas3d reproduce``: the paper's table as one resumable plan (docs/reproduce.md).

Its flags and its run live here; the command line (:mod:`nas3d.cli`) only names the command. One run:

* makes the plan (:func:`nas3d.plan.make_plan`; made before: checked, and its recorded settings are the
  defaults of every flag not given), then, unless every search and job has ended, starts plan workers
  (``--gpus 0,1 --workers-per-gpu K``, or ``--workers N`` on the CPU) through :func:`nas3d.launch.launch`,
  each ``nas3d reproduce --worker``, and waits for them;
* writes ``table.md`` and ``table.csv`` (:mod:`nas3d.table`) once no work is left, and says where.

A plan finished before only gets its table written again. ``--create`` makes the plan and exits;
``--worker`` is one plan worker on one
device (a Slurm array task, a Kubernetes pod, a second host); ``--status`` one line per dataset;
``--report`` the table as it stands, missing cells named.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from nas3d.storages import DEFAULT_HEARTBEAT_INTERVAL

__all__ = ["FLAGS", "REPRODUCE", "add_arguments", "plan_from_flags", "reproduce_command"]

logger = logging.getLogger(__name__)

#: The command's flags (argparse keywords); defaults None: a plan made before supplies them.
FLAGS: dict[str, dict[str, Any]] = {
    "--storage": dict(help="sqlite:///FILE or postgresql://... (default $NAS3D_STORAGE)"),
    "--name": dict(default="paper", help="the plan's name; its studies: NAME-DATASET-SIZE (default paper)"),
    "--datasets": dict(help="all (default) or comma-separated MedMNIST3D flags"),
    "--size": dict(type=int, help="28 (default) or 64; synthetic stand-ins take 4..256"),
    "--seeds": dict(help="comma-separated retrain seeds (default the paper's 0,42,143,1234,3074)"),
    "--retrain-epochs": dict(type=int, help="epochs per retrain job (default 200)"),
    "--n-trials": dict(type=int, help="search budget per dataset (default: each study file's)"),
    "--max-epochs": dict(type=int, help="search epochs per trial (default: each study file's)"),
    "--select": dict(choices=("best", "best+seed"), help="models to retrain from each front: the best val "
                     "AUC, plus (best+seed, the default) the member nearest the seed study's FLOPs"),
    "--baselines": dict(action=argparse.BooleanOptionalAction, default=None,
                        help="also retrain ResNet-18/50 3D per dataset (default on)"),
    "--save-every": dict(type=int, help="epochs between a retrain job's saved progress (default 10)"),
    "--synthetic": dict(action="store_true", default=None, help="synthetic stand-ins of each dataset's "
                        "shape, except those whose npz file is in --data-root"),
    "--synthetic-scale": dict(type=float, help="a stand-in's train split as a share of the real one's "
                              "(default 0.1)"),
    "--data-root": dict(help="folder holding the MedMNIST npz files"),
    "--artifacts": dict(metavar="LOCATION", help="the plan's artifact store: a folder or s3://bucket/prefix"),
    "--create": dict(action="store_true", help="make (or check) the plan and exit, for workers started "
                     "elsewhere (`--worker` in a Slurm array, a Kubernetes Job, another host)"),
    "--status": dict(action="store_true", help="one line per dataset: phase, trials, retrains, time left"),
    "--report": dict(action="store_true", help="write table.md and table.csv as the plan stands"),
    "--worker": dict(action="store_true", help="be one plan worker on --device until no work is left"),
    "--out": dict(metavar="DIR", help="where the table goes (default: reproduce-NAME beside the storage)"),
    "--gpus": dict(help="comma-separated GPU indices, e.g. 0,1,2,3 (default: all visible)"),
    "--workers-per-gpu": dict(type=int, default=1),
    "--workers": dict(type=int, default=1, help="worker processes when running on the CPU"),
    "--cpu": dict(action="store_true", help="run on the CPU even where a GPU is visible"),
    "--device": dict(default="cpu", help="--worker's device: cpu, cuda or cuda:N"),
    "--worker-index": dict(type=int, default=0, help=argparse.SUPPRESS),
    "--heartbeat-interval": dict(type=int, default=DEFAULT_HEARTBEAT_INTERVAL, help="seconds between beats"),
    "--grace-period": dict(type=int, help="seconds without a beat before a trial or job is dead"),
    "--progress": dict(action="store_true", help="show a progress bar per trial"),
    "--no-claim-ahead": dict(action="store_false", dest="claim_ahead", help="sample only between trials"),
}
_MODES = ("--create", "--status", "--report", "--worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_mutually_exclusive_group()
    for flag, keywords in FLAGS.items():
        (modes if flag in _MODES else parser).add_argument(flag, **keywords)


def plan_from_flags(flags: dict[str, Any], recorded: Any) -> Any:
    """The plan the flags ask for; a flag not given keeps the recorded plan's value (else the default)."""
    from nas3d.baselines import BASELINES
    from nas3d.plan import DEFAULT_SCALE, Plan, parse_datasets, synthetic_shape
    from nas3d.retrain import parse_seeds

    base = recorded or Plan(name=flags["name"])

    def given(key: str, default: Any) -> Any:
        return default if flags.get(key) is None else flags[key]

    for key in ("size", "retrain_epochs", "n_trials", "max_epochs", "save_every"):
        if flags.get(key) is not None and flags[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, but got {flags[key]}")
    datasets = parse_datasets(flags["datasets"]) if flags.get("datasets") else base.datasets
    size = given("size", base.size)
    root = given("data_root", base.data_root)
    scale = given("synthetic_scale", base.synthetic_scale)
    if flags.get("synthetic"):
        scale = scale or DEFAULT_SCALE
        if not 0 < scale <= 1:
            raise ValueError(f"--synthetic-scale must be in (0, 1], but got {scale}")
        present = Path(root).expanduser() if root else None
        synthetic = {d: synthetic_shape(d, scale) for d in datasets if present is None
                     or not (present / f"{d}{'' if size == 28 else f'_{size}'}.npz").is_file()}
    else:
        synthetic = {d: s for d, s in base.synthetic.items() if d in datasets}
        scale = scale if synthetic else None
    baselines = base.baselines if flags.get("baselines") is None else (tuple(BASELINES) if flags["baselines"]
                                                                       else ())
    seeds = parse_seeds(flags["seeds"]) if flags.get("seeds") else base.seeds
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds) or not seeds:
        raise ValueError(f"--seeds must be distinct integers >= 0, e.g. 0,42,143, but got {flags['seeds']!r}")
    return Plan(name=base.name, datasets=datasets, size=size, seeds=seeds,
                retrain_epochs=given("retrain_epochs", base.retrain_epochs), batch_size=base.batch_size,
                save_every=given("save_every", base.save_every), selection=given("select", base.selection),
                baselines=baselines, n_trials=given("n_trials", base.n_trials),
                max_epochs=given("max_epochs", base.max_epochs), data_root=root, synthetic=synthetic,
                synthetic_scale=scale)


def reproduce_command(flags: dict[str, Any], storage: Any) -> int | str:
    """``nas3d reproduce`` by its flags (see the module docstring); text to print, or an exit code."""
    from nas3d.table import plan_status, write_table

    name = flags["name"]
    if flags.get("status"):
        return plan_status(storage, name)
    if flags.get("report"):
        return _table_line(*write_table(storage, name, flags.get("out")))
    if flags.get("worker"):
        from nas3d.plan_worker import run_plan_worker

        run_plan_worker(name, storage, device=flags["device"], worker_index=flags["worker_index"],
                        heartbeat_interval=flags["heartbeat_interval"],
                        grace_period=flags.get("grace_period"),
                        progress=bool(flags.get("progress")), claim_ahead=flags.get("claim_ahead", True))
        return 0
    return _run_plan(flags, storage)  # --create too: the plan's settings come from the same flags


def _table_line(folder: Path, complete: bool) -> str:
    return (f"table written to {folder / 'table.md'} and {folder / 'table.csv'}"
            + ("" if complete else " (partial: its Missing section names the cells not there yet)"))


def _run_plan(flags: dict[str, Any], storage: Any) -> int | str:
    from nas3d.launch import discover_gpus, launch, plan_slots, worker_arguments
    from nas3d.plan import load_plan, make_plan
    from nas3d.plan_worker import all_done
    from nas3d.storages import StorageMissing, make_storage, resolve_storage_url
    from nas3d.table import plan_status, write_table

    try:
        recorded = load_plan(storage, flags["name"])
    except (LookupError, StorageMissing):  # none there yet (a new storage holds none)
        recorded = None
    plan = plan_from_flags(flags, recorded)
    gpus = discover_gpus(flags.get("gpus"), cpu=bool(flags.get("cpu")))  # devices first: nothing made yet
    slots = plan_slots(gpus=gpus, workers_per_gpu=flags["workers_per_gpu"], cpu_workers=flags["workers"])
    make_plan(storage, plan, artifacts=flags.get("artifacts"))
    url = resolve_storage_url(storage)
    code = 0
    if flags.get("create"):
        return plan_status(storage, plan.name) + f"\nplan {plan.name!r} ready: start its workers with " \
            f"`nas3d reproduce --worker --name {plan.name} --device ...`"
    if all_done(plan, make_storage(storage)):
        logger.info("plan %r has no work left: writing its table only", plan.name)
    else:
        extra = worker_arguments(flags["heartbeat_interval"], flags.get("grace_period"),
                                 bool(flags.get("progress")), flags.get("claim_ahead", True))
        studies = [n for d in plan.datasets for n in (plan.search_study(d), plan.retrain_study(d))]
        code = launch(plan.name, url, slots, extra, command=["reproduce", "--worker", "--name", plan.name],
                      studies=studies)
    table = _table_line(*write_table(storage, plan.name, flags.get("out")))
    text = plan_status(storage, plan.name) + "\n" + table
    if code != 0:
        logger.error("%s\na plan worker exited with an error (its log is above); run the command again "
                     "to go on", text)
        return 1
    return text


class _Command:
    """``reproduce`` in the command line's table (nas3d.cli): its flags are :data:`FLAGS`."""

    name, help = "reproduce", "the paper's table as one resumable plan: searches, retrains and baselines"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def run(self, args: argparse.Namespace) -> int | str:
        return reproduce_command(vars(args), args.storage)


REPRODUCE = _Command()
