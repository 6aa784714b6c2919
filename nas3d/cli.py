"""The ``nas3d`` command: a table of subcommands, each parsing its arguments and calling one library function.

Results on stdout, logs on stderr; a user error is one line on stderr and exit 2 (traceback with --debug)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

import optuna

from nas3d.baselines import BASELINES
from nas3d.reproduce import REPRODUCE  # its flags and run live there
from nas3d.storages import DEFAULT_HEARTBEAT_INTERVAL, StorageUnavailable, resolve_storage
from nas3d.util import EXIT_USAGE

#: Every flag, declared once; a command lists the ones it takes. (flag, argparse keywords)
_FLAGS: dict[str, dict[str, Any]] = {
    "--storage": dict(help="sqlite:///FILE, postgresql://..., journal:FILE (default $NAS3D_STORAGE)"),
    "--study": dict(metavar="FILE", help="study file (TOML), e.g. studies/smoke.toml"),
    "--dataset": dict(help="a MedMNIST3D flag, 'synthetic', or your labels CSV (docs/own-data.md); with "
                      "--study: the file's settings on it; retrain: default the recorded one"),
    "--profile": dict(help="cpu: space and budget for a CPU (--cpu on a CSV: the default); full: the seed's"),
    "--size": dict(type=int, help="MedMNIST 28 or 64, a manifest 4..256 (default: the file's, else 28)"),
    "--name": dict(help="study name (overrides the file)"),
    "--n-trials": dict(type=int, help="trial budget across all workers"),
    "--max-epochs": dict(type=int, help="training epochs per trial, at most"),
    "--data-root": dict(help="folder holding the MedMNIST npz files"),
    "--sampler": dict(help="tpe, nsga2, random or ode (its settings: --set ode.population=N, ode.F, ...)"),
    "--warm-start": dict(choices=("none", "seed"), help="enqueue the seed architectures first"),
    "--set": dict(action="append", default=[], metavar="TABLE.KEY=VALUE", help="override a study-file value"),
    "--heartbeat-interval": dict(type=int, default=DEFAULT_HEARTBEAT_INTERVAL, help="seconds between beats"),
    "--grace-period": dict(type=int, help="seconds without a beat before a trial is dead (default 4 beats)"),
    "--progress": dict(action="store_true", help="show a progress bar per trial or seed"),
    "--no-claim-ahead": dict(action="store_false", dest="claim_ahead", help="sample only between trials"),
    "--gpus": dict(help="comma-separated GPU indices, e.g. 0,1,2,3 (default: all visible)"),
    "--workers-per-gpu": dict(type=int, default=1),
    "--workers": dict(type=int, default=1, help="worker processes when running on the CPU"),
    "--cpu": dict(action="store_true", help="run on the CPU even where a GPU is visible"),
    "--study-name": dict(required=True),
    "--device": dict(default="cpu", help="cpu, cuda or cuda:N"),
    "--worker-index": dict(type=int, default=0, help=argparse.SUPPRESS),
    "--trial": dict(type=int, required=True, help="trial number, as `nas3d status` shows it"),
    "--out": dict(required=True, metavar="PATH", help="where to write the result"),
    "--force": dict(action="store_true", help="overwrite an existing result"),
    "--epochs": dict(type=int, default=200),
    "--seeds": dict(default="0,42,143,1234,3074", help="comma-separated seeds"),
    "--batch-size": dict(type=int, default=128),
    "--lr": dict(type=float, default=1e-3),
    "--patience": dict(type=int, help="stop after this many epochs without a lower val loss (default never)"),
    "--no-amp": dict(action="store_true", help="float32 on CUDA too (default: mixed precision on CUDA)"),
    "--keep": dict(default="val_auc", help="test the epoch of best val_auc, or of best val_acc (the seed's)"),
    "--host": dict(default="127.0.0.1", help="address to bind (default loopback: admin endpoints lack auth)"),
    "--port": dict(type=int, default=8080),
    "--refresh": dict(type=float, default=30.0, metavar="S", help="look for finished trials every S seconds"),
    "--retrain-results": dict(action="append", default=[], metavar="DIR", help="`nas3d retrain` folders"),
    "runs": dict(nargs="+", metavar="DIR", help="folders written by `nas3d retrain`"),
    "--picture": dict(action="store_true", help="also write the architecture picture (.svg) beside it"),
    "--checkpoint": dict(metavar="FILE", help="a checkpoint from `nas3d export` or `nas3d retrain`"),
    "--manifest": dict(metavar="CSV", help="a labels CSV as for search (label and split columns optional)"),
    "volumes": dict(nargs="*", metavar="VOLUME", help="volume files (.nii, .nii.gz, .npy, .npz)"),
    "--format": dict(choices=("checkpoint", "onnx"), help="what --out gets (default: checkpoint; with "
                                                          "--checkpoint FILE: onnx)"),
    "--onnx": dict(metavar="FILE", help="also write the model as ONNX (dynamic batch axis) to FILE"),
    "--baseline": dict(help="ResNet baseline: " + ", ".join(BASELINES)),
    "--artifacts": dict(metavar="LOCATION", help="the study's artifact store: a folder or s3://bucket/prefix"),
}
_DEFINITION = ("--study", "--dataset", "--profile", "--size", "--name", "--n-trials", "--max-epochs",
               "--data-root", "--sampler", "--warm-start", "--set", "--artifacts")
_WORKER = ("--heartbeat-interval", "--grace-period", "--progress", "--no-claim-ahead")
_LAUNCH = ("--gpus", "--workers-per-gpu", "--workers", "--cpu", *_WORKER)


class Command:
    """A subcommand: ``_FLAGS`` it takes, ``run`` (its one job) returns an exit code or text to print."""

    name: str
    help: str
    flags: tuple[str, ...] = ()
    exclusive: tuple[tuple[str, ...], ...] = ()
    required_choice = False  # one of each exclusive group must be given
    overrides: dict[str, dict[str, Any]] = {}
    target = ""  # "module:function" that runs the command given (flags, storage)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for group in self.exclusive:
            add = parser.add_mutually_exclusive_group(required=self.required_choice).add_argument
            for flag in group:
                add(flag, **{**_FLAGS.get(flag, {}), **self.overrides.get(flag, {})})
        for flag in self.flags:
            parser.add_argument(flag, **{**_FLAGS[flag], **self.overrides.get(flag, {})})

    def run(self, args: argparse.Namespace) -> int | str:
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)(vars(args), getattr(args, "storage", None))


def _create(args: argparse.Namespace) -> str:
    from nas3d.study import prepare_study_from_flags
    config = prepare_study_from_flags(vars(args), args.storage)
    print(f"study {config.study.name!r} ready in {args.storage} (budget {config.study.n_trials} trials)")
    return config.study.name


class CreateStudy(Command):
    name, help = "create-study", "create a study (or check an existing one) from a study file"
    flags = ("--storage", *_DEFINITION)
    def run(self, args: argparse.Namespace) -> int | str:
        return _create(args) and 0

class Worker(Command):
    name, help = "worker", "run trials of a study on one device until its budget is spent"
    flags = ("--storage", "--study-name", "--device", "--worker-index", *_WORKER)
    def run(self, args: argparse.Namespace) -> int | str:
        from nas3d.worker import run_worker
        ran = run_worker(args.study_name, args.storage, device=args.device, worker_index=args.worker_index,
                         heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
                         progress=args.progress, claim_ahead=args.claim_ahead)
        return logging.getLogger("nas3d").info("worker %d ran %d trials", args.worker_index, ran) or 0

class Launch(Command):
    name, help = "launch", "start and supervise workers for a study"
    flags = ("--storage", "--study-name", *_LAUNCH)
    def run(self, args: argparse.Namespace) -> int | str:
        from nas3d.launch import launch_from_flags
        study = getattr(args, "study_name", None) or (lambda: _create(args))  # once the devices check out
        args.study_name, code = launch_from_flags(vars(args), args.storage.url, study)
        return code

class Search(Launch):
    name, help = "search", "create a study, run workers until its budget is spent, summarise"
    flags = ("--storage", *_DEFINITION, *_LAUNCH)
    def run(self, args: argparse.Namespace) -> int | str:
        from nas3d import report, study
        code = super().run(args)  # creates the study once the devices check out
        print(report.status_report(args.storage, args.study_name))
        return code or study.require_trained(args.storage, args.study_name)  # nothing trained: exit 2

class Status(Command):
    name, help = "status", "trial counts by state, the hypervolume and the Pareto front; or one trial"
    flags = ("--storage", "--study-name", "--trial")
    overrides = {"--study-name": dict(required=False, help="default: every study (--trial: the only one)"),
                 "--trial": dict(required=False, help="show this trial: attrs, learning curve, artifacts")}
    def run(self, args: argparse.Namespace) -> int | str:
        from nas3d.report import status_report
        return status_report(args.storage, args.study_name, args.trial)

class Dashboard(Command):
    name = "dashboard"
    help = "optuna-dashboard with artifacts and a log-FLOPs front; its admin endpoints have NO authentication"
    flags = ("--storage", "--study-name", "--host", "--port", "--refresh", "--retrain-results")
    overrides = {"--study-name": dict(required=False, help="the study to open (default: all, refresh each)")}
    def run(self, args: argparse.Namespace) -> int | str:
        from nas3d.dashboard import serve_dashboard
        return serve_dashboard(args.storage, args.study_name, host=args.host, port=args.port,
                               refresh_seconds=args.refresh, retrain_paths=args.retrain_results)

class Report(Command):
    name, help = "report", "pareto.png, pareto.html and a paper-style report.md for one or more studies"
    flags = ("--storage", "--study-name", "--out", "--retrain-results")
    overrides = {"--study-name": dict(action="append", required=False, help="repeat; default: the only one"),
                 "--out": dict(required=True, metavar="DIR", help="folder to write into")}
    def run(self, args: argparse.Namespace) -> int | str:
        from nas3d.report import write_report
        return write_report(args.storage, args.study_name, args.out, args.retrain_results)

class Export(Command):
    name, help = "export", "copy a trial's checkpoint out of the study's artifact store, or a model to ONNX"
    exclusive, required_choice = (("--study-name", "--checkpoint"),), True
    flags = ("--storage", "--trial", "--out", "--force", "--picture", "--format", "--onnx")
    overrides = {"--study-name": dict(required=False, help="with --trial"), "--trial": dict(required=False),
                 "--checkpoint": dict(metavar="FILE", help="a checkpoint file to export to ONNX"),
                 "--out": dict(required=False, metavar="PATH", help="checkpoint (--format onnx: ONNX) file")}
    target = "nas3d.export:export_command"

class Prepare(Command):
    name, help = "prepare", "write a manifest's samples as the network sees them: a .npy and a .nii.gz each"
    flags = ("--manifest", "--study", "--size", "--set", "--storage", "--study-name", "--out", "--force")
    overrides = {"--study-name": dict(required=False, help="the study's recorded preprocessing"),
                 "--out": dict(required=True, metavar="DIR", help="folder to write into")}
    target = "nas3d.prepare:prepare_command"

class Predict(Command):
    name, help = "predict", "class probabilities for your volumes (a manifest or files) from a checkpoint"
    flags = ("--checkpoint", "--manifest", "volumes", "--out", "--device", "--batch-size", "--force")
    overrides = {"--checkpoint": dict(required=True, metavar="FILE", help="a checkpoint (`nas3d export`)"),
                 "--out": dict(required=True, metavar="CSV", help="the predictions: a row per volume"),
                 "--batch-size": dict(type=int, default=16)}
    def run(self, args: argparse.Namespace) -> int | str:
        from nas3d.predict import predict_command
        return predict_command(vars(args))

class Retrain(Command):
    name, help = "retrain", "the paper's protocol (200 epochs, 5 seeds), augmented recipe; then test"
    exclusive, required_choice = (("--checkpoint", "--study-name", "--baseline"),), True
    flags = ("--storage", "--trial", "--dataset", "--size", "--data-root", "--epochs", "--seeds",
             "--batch-size", "--lr", "--patience", "--no-amp", "--keep", "--device", "--out", "--force",
             "--progress", "--set")
    overrides = {"--checkpoint": dict(metavar="FILE", help="a checkpoint from `nas3d export` (model only)"),
                 "--study-name": dict(required=False, help="with --trial"), "--trial": dict(required=False),
                 "--out": dict(required=False, help="output folder (default: <storage home>/retrain/<name>)")}
    def run(self, args: argparse.Namespace) -> int | str:
        from nas3d.report import run_retrain
        return run_retrain(vars(args), args.storage, say=lambda line: print(line, flush=True),
                           warn=lambda line: print(line, file=sys.stderr))

class Compare(Command):
    name, help = "compare", "retrain results side by side with the published MedMNIST numbers"
    flags = ("runs",)
    def run(self, args: argparse.Namespace) -> int | str:
        from nas3d.report import compare_runs
        return compare_runs(args.runs)

_COMMANDS: tuple[Command, ...] = (CreateStudy(), Worker(), Launch(), Status(), Search(), Export(), Predict(),
                                  Prepare(), Retrain(), Compare(), Dashboard(), Report(), REPRODUCE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nas3d", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    try:
        if "storage" in vars(args):  # every command that takes --storage gets its spec
            args.storage = resolve_storage(args.storage)
        result = args.handler(args)
        return (print(result) or 0) if isinstance(result, str) else result
    except KeyboardInterrupt:
        return 130
    except (ValueError, LookupError, StorageUnavailable, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"nas3d: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
