# Long module: the final-training protocol (plan, per-seed runs, metrics, results.json) is one
# procedure, best read top to bottom.
"""Final training by the seed study's protocol, for a searched architecture or a ResNet baseline.

The protocol (docs/studies.md#the-seed-studys-recipe): the full train split (no search subset), Adam
lr 1e-3, batch 128, 200 epochs, five seeds (0, 42, 143, 1234, 3074), the checkpoint of the epoch with
the highest validation AUC (``keep="val_acc"``: the highest validation ACC, the seed code's choice), then test
AUC/ACC in float32 with ``medmnist.Evaluator`` on the real test split (synthetic data: the same
metrics by :mod:`nas3d.metrics`). Training is :func:`nas3d.train.train_trial`
with a patience equal to the epoch budget, so nothing stops early unless a patience is asked for.
``nas3d retrain`` trains with :data:`RETRAIN_RECIPE` (the paper's with augmentation, the recipe
table's best); ``--set train.recipe=paper`` is the seed study's exactly, as ``nas3d reproduce`` uses. The
recipe's options (``--set train.recipe=...``, ``train.schedule``, ...: docs/studies.md) are
recorded with the results. A binary model's decision threshold is chosen on the validation split
(``train.threshold``) and stored in its checkpoint; test ACC stays MedMNIST's (at 0.5), beside the
balanced accuracy, sensitivity and specificity at the chosen threshold. The per-sample test scores
are kept, and the summary carries a BCa bootstrap interval over the test samples
(:func:`nas3d.metrics.bootstrap_interval`) beside the mean and standard deviation over seeds.
Every run starts from a fresh initialisation seeded by its seed; a checkpoint given as the source
contributes only its architecture, as in the paper.

The output folder holds one checkpoint per seed (``seed-{seed}.pt``, loadable with
``weights_only=True``) and ``results.json``, rewritten after every seed so a long run that dies
keeps what it finished. A seed whose training fails (out of memory, non-finite loss) is recorded
with its reason and left out of the mean; it is never scored.

Resuming: a seed in training saves its progress every ``save_every`` epochs (``seed-{seed}.progress.pt``
in the output folder; :func:`run_seed_job` takes any :class:`ProgressStore`), and a run that is
killed goes on where it stopped when started again with the same arguments into the same folder: the
seeds ``results.json`` records are kept, the interrupted one resumes from its last saved epoch, and on
the CPU the results are those of a run never interrupted. A finished ``results.json`` is still refused
without ``--force``; ``--force`` starts over (its progress files are discarded).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from nas3d import records
from nas3d.architecture import Architecture
from nas3d.baselines import BASELINES
from nas3d.checkpoint import checkpoint_data, load_checkpoint, save_checkpoint
from nas3d.costs import measure_costs
from nas3d.data import DATASETS, SYNTHETIC, DataConfig, DeviceData, load_splits, resolve_manifest
from nas3d.export import check_out
from nas3d.metrics import (
    accuracy,
    auc,
    binary_rates,
    bootstrap_interval,
    choose_threshold,
    evaluator_metrics,
    single_class,
)
from nas3d.registry import ModelRecipe
from nas3d.train import (
    KEEP_CHOICES,
    NonFiniteLoss,
    TrainConfig,
    TrainingFailure,
    TrainProgress,
    autocast_dtype,
    device_name,
    predict,
    torch_device,
    train_trial,
)
from nas3d.util import atomic_write, check_choice, one_line, unknown_option_message

if TYPE_CHECKING:  # the training path itself needs no optuna
    from optuna.trial import FrozenTrial

__all__ = [
    "PAPER_SEEDS",
    "PROGRESS_FORMAT",
    "RESULTS_FILE",
    "RESULTS_FORMAT",
    "FolderProgressStore",
    "ProgressStore",
    "RETRAIN_RECIPE",
    "RetrainConfig",
    "RetrainReport",
    "RetrainSource",
    "SeedResult",
    "load_results",
    "progress_file_name",
    "resolve_data",
    "retrain",
    "run_seed_job",
]

logger = logging.getLogger(__name__)

PAPER_SEEDS = (0, 42, 143, 1234, 3074)
RESULTS_FILE = "results.json"
RESULTS_FORMAT = "nas3d-retrain/1"
#: A seed job's saved progress: its identity (model, data, training recipe) and a TrainProgress.
PROGRESS_FORMAT = "nas3d-retrain-progress/1"
SUMMARY_METRICS = ("val_auc", "val_acc", "test_auc", "test_acc", "test_balanced_accuracy", "test_sensitivity",
                   "test_specificity")
#: Test metrics with a bootstrap interval in the summary (over the test samples, seeds averaged).
INTERVAL_METRICS = {"test_auc": "auc", "test_acc": "acc"}
FLOPS_CONVENTION = (
    "torch FlopCounterMode on a batch of one: FLOPs = 2 x MACs of convolutions and the classifier; "
    "norms, activations, pooling and additions not counted"
)


#: The protocol's training: 200 epochs with a patience equal to the budget (nothing stops early).
PAPER_TRAINING = TrainConfig(max_epochs=200, patience=200, batch_size=128, lr=1e-3)
#: The recipe ``nas3d retrain`` trains with unless ``--set train.recipe=...`` names another: the best of
#: the recipe table (docs/studies.md#training-recipes). RetrainConfig's own default, and so ``nas3d
#: reproduce``, stays the paper's, so the paper's table is reproduced as published.
RETRAIN_RECIPE = "augmented"


@dataclass(frozen=True)
class RetrainConfig:
    """The final-training recipe: one :class:`TrainConfig` (its ``seed`` replaced by each of ``seeds``);
    the defaults are the seed study's protocol. :meth:`of` builds one from ``nas3d retrain``'s flags."""

    train: TrainConfig = PAPER_TRAINING
    seeds: tuple[int, ...] = PAPER_SEEDS

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.seeds:
            raise ValueError("retrain seeds must not be empty; the paper uses 0,42,143,1234,3074")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            raise ValueError(f"retrain seeds must be integers >= 0, but got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(
                f"retrain seeds must be distinct (a repeat is the same run), but got {self.seeds!r}"
            )

    @classmethod
    def of(cls, *, epochs: int = 200, seeds: Sequence[int] = PAPER_SEEDS, batch_size: int = 128,
           lr: float = 1e-3, patience: int | None = None, amp: bool = True, keep: str = "val_auc",
           **train: Any) -> RetrainConfig:
        """The recipe by ``nas3d retrain``'s flags: ``patience`` None trains every epoch (the paper keeps
        the best-val checkpoint); ``train`` holds further :class:`TrainConfig` fields."""
        for name, value in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"retrain {name} must be an integer >= 1, but got {value!r}")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)
                                     or patience < 1):
            raise ValueError(f"retrain patience must be an integer >= 1 or None (no early stop), "
                             f"but got {patience!r}")
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"retrain lr must be a finite number > 0, but got {lr!r}")
        check_choice("--keep", keep, KEEP_CHOICES)
        recipe = TrainConfig(max_epochs=epochs, patience=epochs if patience is None else patience,
                             batch_size=batch_size, lr=lr, amp=amp, keep=keep, **train)
        return cls(train=recipe, seeds=tuple(seeds))

    @property
    def epochs(self) -> int:
        return self.train.max_epochs

    @property
    def batch_size(self) -> int:
        return self.train.batch_size

    @property
    def patience(self) -> int | None:
        """None where no run stops early (the patience is the whole budget)."""
        return None if self.train.patience >= self.train.max_epochs else self.train.patience

    def train_config(self, seed: int) -> TrainConfig:
        """The :class:`TrainConfig` of one seed's run."""
        return dataclasses.replace(self.train, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as results.json and the checkpoints record it (the same keys since the first
        format: a flat table of the flags, ``seeds`` included)."""
        t = self.train
        return {"epochs": t.max_epochs, "seeds": list(self.seeds), "batch_size": t.batch_size, "lr": t.lr,
                "patience": self.patience, "amp": t.amp, "channels_last": t.channels_last, "keep": t.keep,
                "cudnn_benchmark": t.cudnn_benchmark, "recipe": t.recipe,
                **dataclasses.asdict(t.options), "threshold": t.threshold}


@dataclass(frozen=True)
class RetrainSource:
    """What to retrain — a registered model's recipe — and where it came from.

    ``source`` (provenance: checkpoint path, study and trial, recorded dataset or data config) goes
    into results.json and helps :func:`resolve_data` find the data the model was searched on.
    """

    name: str
    recipe: ModelRecipe
    source: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        architecture = self.recipe.architecture
        return {
            # "kind" and "baseline" keep results.json readable by `nas3d compare` across versions.
            "kind": "nas3d" if architecture is not None else "baseline",
            "name": self.name,
            "recipe": self.recipe.to_dict(),
            "baseline": None if architecture is not None else self.recipe.name,
            "architecture": architecture.to_dict() if architecture is not None else None,
            "arch": self.recipe.describe(),
            "source": self.source,
        }

    @classmethod
    def from_baseline(cls, name: str) -> RetrainSource:
        if name not in BASELINES:
            raise ValueError(unknown_option_message("baseline", name, list(BASELINES)))
        return cls(name=name, recipe=ModelRecipe(name), source={"baseline": name})

    @classmethod
    def from_architecture(cls, name: str, architecture: Architecture, **source: Any) -> RetrainSource:
        return cls(name=name, recipe=ModelRecipe.of(architecture), source=dict(source))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> RetrainSource:
        """The recipe of a checkpoint; its weights are not used (training starts fresh)."""
        path = Path(path)
        checkpoint = load_checkpoint(path)
        metadata = checkpoint.metadata
        source: dict[str, Any] = {
            "checkpoint": str(path.resolve()),
            "input_size": checkpoint.input_size,
            "num_classes": checkpoint.num_classes,
            "in_channels": checkpoint.in_channels,
        }
        for key in ("dataset", "study", "trial"):
            if key in metadata:
                source[key] = metadata[key]
        if isinstance(metadata.get("data"), dict):  # the whole data config the model was trained on
            source["data"] = metadata["data"]
        if "study" in metadata and "trial" in metadata:
            name = f"{metadata['study']}-trial{metadata['trial']}"
        elif checkpoint.architecture is None:
            name = checkpoint.recipe.name
        else:
            name = path.stem
        return cls(name=name, recipe=checkpoint.recipe, source=source)

    @classmethod
    def from_trial(cls, study_name: str, trial: FrozenTrial) -> RetrainSource:
        """The architecture a trial sampled (its ``arch_json`` user attr)."""
        text = trial.user_attrs.get(records.ARCH_JSON)
        if text is None:
            reason = records.failure_reason(trial, "no reason recorded")
            raise ValueError(f"trial {trial.number} of study {study_name!r} has no architecture "
                             f"({trial.state.name.lower()}: {reason}); pick a trial with one, e.g. from "
                             "`nas3d status`")
        return cls.from_architecture(f"{study_name}-trial{trial.number}", Architecture.from_json(text),
                                     study=study_name, trial=trial.number, trial_state=trial.state.name)


def resolve_data(
    recorded: DataConfig | None,
    source: RetrainSource,
    *,
    dataset: str | None = None,
    size: int | None = None,
    root: str | None = None,
    overrides: dict[str, str] | None = None,
) -> DataConfig:
    """The data to retrain on: what the study (``recorded``) or the source's checkpoint recorded,
    with the command line's dataset, size, root and ``data.*`` overrides applied."""
    from nas3d.config import StudyConfig, StudySettings

    if recorded is None:
        recorded = _recorded_by_checkpoint(source.source)
    if dataset is None and recorded is None:
        what = ("--baseline" if source.recipe.architecture is None
                else "this checkpoint records no dataset, so it")
        raise ValueError(f"{what} needs --dataset: one of {', '.join((*DATASETS, SYNTHETIC))}, or a "
                         "manifest .csv")
    if dataset is not None and (recorded is None or recorded.dataset != dataset):
        keep_size = recorded is not None and SYNTHETIC not in (dataset, recorded.dataset)
        recorded = DataConfig(dataset=dataset, size=recorded.size if keep_size else 28)
    assert recorded is not None
    changes: dict[str, object] = dict(overrides or {})
    if size is not None:
        changes["data.size"] = size
    if root is not None:
        changes["data.root"] = root
    if not changes:
        return recorded
    holder = StudyConfig(study=StudySettings(name="retrain"), data=recorded)
    return holder.with_overrides(changes, source="command line").data


def _recorded_by_checkpoint(source: dict[str, Any]) -> DataConfig | None:
    if "data" in source:
        return DataConfig(**source["data"])
    if "dataset" in source and "input_size" in source:
        classes = {"synthetic_classes": source["num_classes"]} if source["dataset"] == SYNTHETIC else {}
        return DataConfig(dataset=source["dataset"], size=source["input_size"], **classes)
    return None


@dataclass(frozen=True)
class RetrainPlan:
    """Everything one ``nas3d retrain`` run needs, resolved and validated before anything is written."""

    source: RetrainSource
    data: DataConfig
    config: RetrainConfig
    device: torch.device
    out: Path
    searched_size: int | None = None  # the input size the model was searched (or trained) at, if known

    def size_note(self) -> str | None:
        """One line when the data's size differs from the size the model was searched at, with its
        FLOPs at both (more voxels, more FLOPs: the front it was picked from no longer holds)."""
        searched, size = self.searched_size, self.data.size
        if searched is None or searched == size:
            return None
        recipe, data = self.source.recipe, self.data
        before, after = (measure_costs(recipe, data.in_channels, data.num_classes, s, with_thop=False).flops
                         for s in (searched, size))
        return (f"the data is {size}³ but the model was searched at {searched}³: its FLOPs go from "
                f"{before / 1e6:,.0f} M to {after / 1e6:,.0f} M a volume")


def plan_retrain(options: dict[str, Any], storage: Any) -> RetrainPlan:
    """Resolve ``nas3d retrain``'s options (its flags, by name) into a :class:`RetrainPlan`.

    The source is a checkpoint, a study's trial or a baseline; the data defaults to what the study or
    checkpoint recorded; ``storage`` (a storage string or spec) is opened only for a trial.
    """
    from nas3d.config import parse_overrides
    from nas3d.storages import make_storage, storage_home
    from nas3d.study import load_study, load_trial

    study_name, trial = options.get("study_name"), options.get("trial")
    if trial is not None and not study_name:
        raise ValueError("--trial goes with --study-name; a checkpoint or baseline needs no trial number")
    if study_name and trial is None:
        raise ValueError("--study-name needs --trial N (the trial number `nas3d status` shows)")
    sets = parse_overrides(options.get("set") or ())
    unknown = [key for key in sets if key.partition(".")[0] not in ("data", "train")]
    if unknown:
        raise ValueError(f"retrain --set takes data.KEY=VALUE or train.KEY=VALUE, but got {unknown[0]!r}")
    config = RetrainConfig.of(
        epochs=options["epochs"], seeds=parse_seeds(options["seeds"]), batch_size=options["batch_size"],
        lr=options["lr"], patience=options.get("patience"), amp=not options.get("no_amp", False),
        keep=options.get("keep") or "val_auc", recipe=RETRAIN_RECIPE,
    )
    config = with_train_overrides(config, {k: v for k, v in sets.items() if k.startswith("train.")})
    device = torch_device(options.get("device") or "cpu")
    recorded = None
    if options.get("checkpoint"):
        source = RetrainSource.from_checkpoint(options["checkpoint"])
    elif study_name:
        optuna_storage = make_storage(storage)
        source = RetrainSource.from_trial(study_name, load_trial(optuna_storage, study_name, trial))
        recorded = load_study(study_name, optuna_storage)[1].data
    else:
        source = RetrainSource.from_baseline(options["baseline"])
    data = resolve_data(
        recorded, source, dataset=options.get("dataset"), size=options.get("size"),
        root=options.get("data_root"), overrides={k: v for k, v in sets.items() if k.startswith("data.")},
    )
    out = options.get("out") or storage_home() / "retrain" / f"{source.name}-{data.name}-{data.size}"
    searched = recorded.size if recorded is not None else source.source.get("input_size")
    return RetrainPlan(source=source, data=data, config=config, device=device, out=Path(out),
                       searched_size=searched)


def with_train_overrides(config: RetrainConfig, overrides: dict[str, str]) -> RetrainConfig:
    """``config`` with ``--set train.KEY=VALUE`` items applied to its :class:`TrainConfig`, checked as a
    study file's [train] table is (the epochs, batch size and seeds stay the flags')."""
    from nas3d.config import StudyConfig, StudySettings

    taken = {"train.max_epochs": "--epochs", "train.batch_size": "--batch-size", "train.seed": "--seeds",
             "train.lr": "--lr", "train.patience": "--patience", "train.keep": "--keep",
             "train.amp": "--no-amp"}
    for key in overrides:
        if key in taken:
            raise ValueError(f"retrain sets {key} by its flag {taken[key]}; drop --set {key}")
    if not overrides:
        return config
    holder = StudyConfig(study=StudySettings(name="retrain"), train=config.train)
    return dataclasses.replace(config, train=holder.with_overrides(overrides, source="command line").train)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 0,42,143`` as integers."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"--seeds expects comma-separated integers such as 0,42,143, but got {text!r}"
        ) from None


@dataclass(frozen=True)
class SeedResult:
    """One seed's run: the best-val epoch's validation metrics and its test metrics, or why it failed."""

    seed: int
    status: str  # "completed" or "failed"
    reason: str | None = None
    val_auc: float | None = None
    val_acc: float | None = None
    val_loss: float | None = None
    test_auc: float | None = None
    test_acc: float | None = None
    test_loss: float | None = None
    # binary tasks: the threshold chosen on val, and the test rates at it (ACC above stays at 0.5)
    threshold: float | None = None
    test_balanced_accuracy: float | None = None
    test_sensitivity: float | None = None
    test_specificity: float | None = None
    # where the model predicts one class for every sample: "val at 0.5", "test at the threshold", ...
    single_class: tuple[str, ...] = ()
    best_epoch: int | None = None
    epochs_run: int | None = None
    train_seconds: float | None = None
    seconds: float | None = None  # the whole seed: build, training, test
    checkpoint: str | None = None  # file name inside the output folder
    # per-sample test scores (positive-class score for a binary task, else a row per sample), in the
    # order of results.json's "test_labels"; the bootstrap intervals are computed from them
    test_scores: list[Any] | None = field(default=None, repr=False)

    @property
    def completed(self) -> bool:
        return self.status == "completed"


@dataclass(frozen=True)
class RetrainReport:
    out_dir: Path
    seeds: tuple[SeedResult, ...]
    results: dict[str, Any]  # what results.json holds

    @property
    def results_path(self) -> Path:
        return self.out_dir / RESULTS_FILE

    @property
    def failed(self) -> tuple[SeedResult, ...]:
        return tuple(s for s in self.seeds if not s.completed)


def retrain(
    source: RetrainSource,
    data_config: DataConfig,
    config: RetrainConfig,
    device: torch.device | str,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = False,
    on_seed: Callable[[SeedResult], None] | None = None,
    save_every: int = 10,
    say: Callable[[str], object] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RetrainReport:
    """Train ``source``'s model once per seed by ``config``, test each best-val checkpoint, write
    ``out_dir``/results.json and ``out_dir``/seed-{seed}.pt.

    ``on_seed`` is called with each seed's result as soon as it is known. Data errors
    (:class:`nas3d.data.DatasetUnavailable`, ...) are raised before anything is written; training
    failures are recorded per seed and do not stop the other seeds.

    Resuming (the rerun of a killed run): where ``out_dir`` holds an unfinished results.json of the
    same model, data, recipe and device, its seeds are kept (``on_seed`` sees them too) and the others
    are trained, each from its ``seed-{seed}.progress.pt`` when there is one (saved every ``save_every``
    epochs). No ``--force`` is needed for that, since nothing finished is overwritten; an unfinished
    run of anything else is refused with one line, as is a finished one, unless ``overwrite``
    (``--force``), which starts over. ``say`` gets a line for each resumed or set-aside piece
    (default: this module's logger). ``should_stop`` is handed to training: a stop is saved at the end
    of the epoch and raised as :class:`nas3d.train.TrainingStopped`.
    """
    say = say or logger.info
    device = torch.device(device)
    out_dir = Path(out_dir)
    results_path = out_dir / RESULTS_FILE
    earlier = _unfinished_results(results_path, overwrite)
    if data_config.is_manifest:  # classes, channels and hash: what the checkpoints record for predict
        data_config = resolve_manifest(data_config)
    data = load_splits(data_config, device, for_search=False)  # full train and val, and test
    assert data.test is not None
    costs = dataclasses.asdict(measure_costs(source.recipe, data.in_channels, data.num_classes, data.size))
    amp_dtype = autocast_dtype(device, config.train.amp)
    out_dir.mkdir(parents=True, exist_ok=True)
    from nas3d import __version__

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "nas3d_version": __version__,
        "name": source.name,
        "model": source.describe(),
        "data": dataclasses.asdict(data_config),
        "dataset": data.name,
        "size": data.size,
        "task": data.task,
        "in_channels": data.in_channels,
        "num_classes": data.num_classes,
        "samples": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "retrain": config.to_dict(),
        "device": device_name(device),
        # How test scores were computed, so a reloaded checkpoint reproduces them exactly.
        "evaluation": {
            "batch_size": config.batch_size,
            "training_precision": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
            "precision": "float32",  # scores are float32 softmax of float32 logits (nas3d.train.predict)
            "channels_last": config.train.channels_last,
            "kept_epoch": f"best {config.train.keep}",
            "metrics": ("nas3d.metrics (MedMNIST getAUC/getACC)" if not data_config.is_medmnist
                        else "medmnist.Evaluator on the test split"),
        },
        "costs": {**costs, "flops_convention": FLOPS_CONVENTION},
        "test_labels": data.test.labels.cpu().tolist(),
        "seeds": [],
        "summary": {},
        "complete": False,
    }
    kept = _kept_seeds(earlier, results, results_path, say) if earlier is not None else {}
    if overwrite:  # starting over: no seed may go on from an earlier run's progress
        for seed in config.seeds:
            FolderProgressStore(out_dir / progress_file_name(seed)).clear()
    seed_results: list[SeedResult] = []
    for seed in config.seeds:
        store = FolderProgressStore(out_dir / progress_file_name(seed))
        result = kept[seed] if seed in kept else _run_seed(
            source, data, data_config, config, seed, device, checkpoint_path=out_dir / f"seed-{seed}.pt",
            progress=progress, progress_store=store, save_every=save_every, say=say, should_stop=should_stop)
        seed_results.append(result)
        results["seeds"] = [dataclasses.asdict(r) for r in seed_results]
        results["summary"] = summarise(seed_results, results["test_labels"], data.task)
        results["complete"] = len(seed_results) == len(config.seeds)
        _write_json(results_path, results)
        # Only now that results.json holds the seed: a kill before this resumes it, not restarts it.
        store.clear()
        if seed not in kept and result.completed:  # a kept seed was said when the run resumed
            logger.info("seed %d: test AUC %.4f ACC %.4f (best epoch %d)", seed, result.test_auc,
                        result.test_acc, result.best_epoch)
        elif seed not in kept:
            logger.warning("seed %d failed: %s", seed, result.reason)
        if on_seed is not None:
            on_seed(result)
    return RetrainReport(out_dir=out_dir, seeds=tuple(seed_results), results=results)


def progress_file_name(seed: int) -> str:
    """The file :func:`retrain` keeps a seed's training progress in, inside its output folder."""
    return f"seed-{seed}.progress.pt"


#: What must be equal for a rerun to keep an unfinished results.json's seeds.
_SAME_RUN_KEYS = ("model", "data", "samples", "retrain", "evaluation", "device")


def _unfinished_results(results_path: Path, overwrite: bool) -> dict[str, Any] | None:
    """The results.json of an unfinished earlier run in the output folder, to resume; None where there is
    none or ``overwrite``. A finished (or unreadable) one is refused as ever, unless ``overwrite``."""
    if overwrite or not results_path.exists():
        return None
    try:
        earlier = load_results(results_path)
    except ValueError:
        earlier = None
    if earlier is None or earlier.get("complete") is not False:
        check_out(results_path, overwrite)  # raises: "... exists; pass --force to overwrite it ..."
    return earlier


def _kept_seeds(earlier: dict[str, Any], results: dict[str, Any], results_path: Path,
                say: Callable[[str], object]) -> dict[int, SeedResult]:
    """The seeds an unfinished earlier run of the same setup finished, by seed; a one-line ``ValueError``
    where it is a run of another setup (its seeds would be mixed with results they cannot be pooled with)."""
    differ = _differences({k: earlier.get(k) for k in _SAME_RUN_KEYS},
                          {k: results[k] for k in _SAME_RUN_KEYS})
    if differ:
        raise ValueError(f"{results_path} is an unfinished run of another setup ({', '.join(differ)} "
                         "differ); rerun with the arguments it was started with to resume it, pass --force "
                         "to start over, or choose another --out")
    fields = {f.name for f in dataclasses.fields(SeedResult)}
    kept: dict[int, SeedResult] = {}
    for entry in earlier.get("seeds", []):
        result = SeedResult(**{k: v for k, v in entry.items() if k in fields})
        result = dataclasses.replace(result, single_class=tuple(result.single_class))
        checkpoint = results_path.parent / (result.checkpoint or "")
        if result.completed and not checkpoint.is_file():
            say(f"seed {result.seed}: its checkpoint {checkpoint} is missing; training it again")
            continue
        kept[result.seed] = result
    left = [s for s in results["retrain"]["seeds"] if s not in kept]
    say(f"resuming {results_path.parent}: seeds {', '.join(map(str, kept)) or 'none'} finished before, "
        f"{', '.join(map(str, left))} to train")
    return kept


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys (one level down as ``key.sub``) where ``before`` and ``now`` differ, compared as JSON
    (a tuple and the list that JSON made of it are equal)."""
    before, now = (json.loads(json.dumps(d, default=str)) for d in (before, now))
    found = []
    for key in sorted(before.keys() | now.keys()):
        a, b = before.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found += [f"{key}.{k}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
        else:
            found.append(key)
    return found


class ProgressStore(Protocol):
    """Where a seed job's training progress lives between kills (opaque bytes)."""

    def load(self) -> bytes | None:
        """The bytes saved last; None where no progress was saved yet."""
        ...

    def save(self, data: bytes) -> None:
        """Replace the saved bytes, whole (a kill mid-save leaves the previous ones)."""
        ...

    def clear(self) -> None:
        """Forget the progress: the job finished."""
        ...


class FolderProgressStore:
    """A :class:`ProgressStore` in one file, replaced atomically (a temporary file, then a rename)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda file: file.write(data))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"FolderProgressStore({str(self.path)!r})"


def run_seed_job(
    source: RetrainSource,
    data_config: DataConfig,
    config: RetrainConfig,
    seed: int,
    *,
    device: str = "cpu",
    progress_store: ProgressStore | None = None,
    save_every: int = 10,
    say: Callable[[str], None] = lambda line: None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_path: str | Path | None = None,
) -> SeedResult:
    """Train and test ``source``'s model for one ``seed`` by ``config``: one seed of :func:`retrain`,
    by the same code, for a caller that schedules seeds as jobs.

    With ``progress_store``, training resumes from its saved progress (``say`` is told from which
    epoch, or why a saved progress is set aside), saves every ``save_every`` epochs, and clears it once
    the seed is done (completed or failed). ``should_stop`` stops training between batches; a stop is
    saved at the end of the epoch and raised as :class:`nas3d.train.TrainingStopped`. The best-val
    checkpoint is written to ``checkpoint_path`` when given (``SeedResult.checkpoint`` holds its file
    name). Data errors are raised; training failures are a ``failed`` result with their reason.
    """
    torch_device = torch.device(device)
    if data_config.is_manifest:  # classes, channels and hash, as retrain() records them
        data_config = resolve_manifest(data_config)
    data = load_splits(data_config, torch_device, for_search=False)
    result = _run_seed(source, data, data_config, config, seed, torch_device,
                       checkpoint_path=None if checkpoint_path is None else Path(checkpoint_path),
                       progress_store=progress_store, save_every=save_every, say=say, should_stop=should_stop)
    if progress_store is not None:
        progress_store.clear()
    return result


def _progress_identity(source: RetrainSource, data_config: DataConfig, train: TrainConfig) -> dict[str, Any]:
    """What a seed's saved progress must have been saved by: the model, the data and the training recipe
    (its seed included), as JSON values."""
    identity = {"model": source.recipe.to_dict(), "data": dataclasses.asdict(data_config),
                "train": dataclasses.asdict(train)}
    return json.loads(json.dumps(identity, default=str))


def _progress_bytes(identity: dict[str, Any], progress: TrainProgress) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": PROGRESS_FORMAT, "identity": json.dumps(identity), "train": progress.to_dict()},
               buffer)
    return buffer.getvalue()


def _saved_progress(store: ProgressStore, identity: dict[str, Any], seed: int, epochs: int,
                    say: Callable[[str], object]) -> TrainProgress | None:
    """The progress in ``store`` when it is this seed job's, else None.

    A progress that is unreadable or another run's is set aside with one line and the seed starts from
    epoch 0, rather than refused: progress only saves time and never decides a result, so starting
    over is always correct, while refusing would leave an unattended rerun or a queued job stuck until
    someone deletes a file. The next save replaces it.
    """
    data = store.load()
    if data is None:
        return None
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        if found != PROGRESS_FORMAT:
            raise ValueError(f"format {found!r}, expected {PROGRESS_FORMAT!r}")
        saved_identity = json.loads(payload["identity"])
        saved = TrainProgress.from_dict(payload["train"])
    except Exception as e:  # torch.load fails in many ways on a damaged file; any of them means unusable
        say(f"seed {seed}: the saved progress is unreadable ({type(e).__name__}: {one_line(e, 160)}); "
            "starting from epoch 0")
        return None
    differ = _differences(saved_identity, identity)
    if differ:
        shown = ", ".join(differ[:4]) + (" ..." if len(differ) > 4 else "")
        say(f"seed {seed}: the saved progress is of another run ({shown} differ); starting from epoch 0")
        return None
    if saved.epoch >= epochs:  # never saved after the last epoch: a file written by something else
        say(f"seed {seed}: the saved progress is at epoch {saved.epoch} of {epochs}, past the end; "
            "starting from epoch 0")
        return None
    say(f"seed {seed}: resuming from epoch {saved.epoch} of {epochs}")
    return saved


def _run_seed(
    source: RetrainSource,
    data: DeviceData,
    data_config: DataConfig,
    config: RetrainConfig,
    seed: int,
    device: torch.device,
    *,
    checkpoint_path: Path | None,
    progress: bool = False,
    progress_store: ProgressStore | None = None,
    save_every: int = 10,
    say: Callable[[str], object] = lambda line: None,
    should_stop: Callable[[], bool] | None = None,
) -> SeedResult:
    """One seed by the protocol, for :func:`retrain` and :func:`run_seed_job` alike (the caller clears
    ``progress_store`` once it has recorded the result)."""
    start = time.perf_counter()
    train_config = config.train_config(seed)
    resume_from = save_progress = None
    if progress_store is not None:
        identity = _progress_identity(source, data_config, train_config)
        resume_from = _saved_progress(progress_store, identity, seed, train_config.max_epochs, say)

        def save_progress(state: TrainProgress) -> None:
            progress_store.save(_progress_bytes(identity, state))

    torch.manual_seed(seed)  # train_trial seeds the batch order; the initial weights need it too
    model = source.recipe.build(data.in_channels, data.num_classes)
    try:
        trained = train_trial(model, data, train_config, device, progress=progress, should_stop=should_stop,
                              resume_from=resume_from, save_progress=save_progress, save_every=save_every)
        try:
            scores, test_loss = predict(model, data.test, device, config.batch_size,
                                        channels_last=config.train.channels_last)
            if not math.isfinite(test_loss):
                raise NonFiniteLoss(f"loss is {test_loss}")
        except TrainingFailure as e:
            raise type(e)(f"test {e} with the best-val weights") from None
        test_auc, test_acc = test_metrics(data_config, data.test, scores)
        val_scores, _ = predict(model, data.val, device, config.batch_size,
                                channels_last=config.train.channels_last)
    except TrainingFailure as e:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return SeedResult(seed=seed, status="failed", reason=f"{type(e).__name__}: {e}",
                          seconds=round(time.perf_counter() - start, 3))
    metrics = {
        "val_auc": trained.val_auc, "val_acc": trained.val_acc, "val_loss": trained.val_loss,
        "test_auc": test_auc, "test_acc": test_acc, "test_loss": test_loss,
    }
    decision = decision_metrics(data, val_scores, scores, config.train.threshold)
    metrics.update({k: v for k, v in decision.items() if k.startswith("test_")})
    metadata = {
        **{k: source.source[k] for k in ("study", "trial") if k in source.source},
        "dataset": data.name,
        **checkpoint_data(data_config),
        "seed": seed,
        "best_epoch": trained.best_epoch,
        "metrics": metrics,
        "retrain": config.to_dict(),
        **({"threshold": decision["threshold"], "threshold_rule": config.train.threshold}
           if decision["threshold"] is not None else {}),
    }
    if checkpoint_path is not None:
        save_checkpoint(checkpoint_path, model, source.recipe, in_channels=data.in_channels,
                        num_classes=data.num_classes, input_size=data.size, metadata=metadata)
    return SeedResult(
        seed=seed,
        status="completed",
        **metrics,
        threshold=decision["threshold"],
        single_class=decision["single_class"],
        best_epoch=trained.best_epoch,
        epochs_run=trained.epochs_run,
        train_seconds=round(trained.train_seconds, 3),
        seconds=round(time.perf_counter() - start, 3),
        checkpoint=None if checkpoint_path is None else checkpoint_path.name,
        test_scores=compact_scores(scores, data.task),
    )


def decision_metrics(data: DeviceData, val_scores: np.ndarray, test_scores: np.ndarray,
                     rule: str) -> dict[str, Any]:
    """A binary model's threshold chosen on ``val_scores`` by ``rule`` with the test rates at it, and
    where the model predicts a single class (val and test, at 0.5 and at the threshold; multi-class:
    by argmax)."""
    assert data.test is not None
    found: dict[str, Any] = {"threshold": None, "single_class": ()}
    cuts = {"0.5": 0.5}
    if data.task == "binary-class":
        threshold = choose_threshold(data.val.labels.cpu().numpy(), val_scores, rule)
        rates = binary_rates(data.test.labels.cpu().numpy(), test_scores, threshold)
        found.update({"threshold": threshold, **{f"test_{k}": v for k, v in rates.items()}})
        cuts["the threshold"] = threshold
    else:
        cuts = {"argmax": 0.5}
    found["single_class"] = tuple(
        f"{split} at {where}" for split, scores in (("val", val_scores), ("test", test_scores))
        for where, cut in cuts.items() if single_class(scores, data.task, cut) is not None)
    return found


def compact_scores(scores: np.ndarray, task: str) -> list[Any]:
    """Scores for results.json: float32 values by their shortest exact decimal (ranks and thresholds
    on them are those of the float32 scores); the positive column only for a binary task."""
    values = np.asarray(scores, dtype=np.float32)
    values = values[:, -1] if task == "binary-class" else values
    return json.loads(np.array2string(values, separator=",", threshold=values.size + 1,
                                      floatmode="unique", max_line_width=2**31))


def test_metrics(data_config: DataConfig, split: Any, scores: np.ndarray) -> tuple[float, float]:
    """Test AUC and ACC of ``scores``: by ``medmnist.Evaluator`` itself on the real test split (same flag,
    split and size), or by :mod:`nas3d.metrics` (the same functions) for synthetic data."""
    labels = split.labels.cpu().numpy()
    if not data_config.is_medmnist:  # synthetic data or a manifest: no medmnist split to evaluate on
        return auc(labels, scores, split.task), accuracy(labels, scores, split.task)
    return evaluator_metrics(data_config.dataset, "test", data_config.size, data_config.data_root, labels,
                             scores)


def summarise(seeds: Sequence[SeedResult], test_labels: Sequence[int] | None = None,
              task: str | None = None) -> dict[str, Any]:
    """Mean and standard deviation (population, ddof=0, as ``np.std``) of each metric over the
    completed seeds (``None`` where no seed completed or the task has no such metric); with the test
    labels and task, ``intervals``: a 95 % BCa bootstrap interval over the test samples of test AUC
    and ACC (seeds averaged); ``single_class``: the seeds that predict one class somewhere."""
    completed = [s for s in seeds if s.completed]
    summary: dict[str, Any] = {"completed": len(completed), "failed": len(seeds) - len(completed)}
    for metric in SUMMARY_METRICS:
        values = np.array([getattr(s, metric) for s in completed
                           if getattr(s, metric) is not None], dtype=np.float64)
        summary[metric] = (
            {"mean": float(values.mean()), "std": float(values.std())} if len(values) else None
        )
    scored = [s.test_scores for s in completed if s.test_scores is not None]
    if test_labels is not None and task is not None and scored:
        summary["intervals"] = {name: list(bootstrap_interval(test_labels, scored, task, metric))
                                for name, metric in INTERVAL_METRICS.items()}
    summary["single_class"] = {str(s.seed): list(s.single_class) for s in completed if s.single_class}
    return summary


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results.json written by :func:`retrain` (``path`` may be its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; give a folder written by `nas3d retrain`")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        found = results.get("format") if isinstance(results, dict) else type(results).__name__
        raise ValueError(
            f"{path} is not a nas3d retrain result (format {found!r}, expected {RESULTS_FORMAT!r})"
        )
    return results


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Replace ``path`` atomically: a reader (or a crash) never sees half a file."""
    text = json.dumps(value, indent=2, allow_nan=True) + "\n"
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))
