# Long module: the trainer (recipe options, the loop, evaluation, device helpers) is one concern.
"""Training one trial: on-device data, Adam, early stopping on validation loss.

The recipe is the seed study's (docs/studies.md#the-seed-studys-recipe): Adam, cross-entropy,
validation every epoch, stop after ``patience`` epochs without a lower validation loss. The trial's
score is the best validation AUC seen (the seed's "fitness = best val score"; ties go to the lower
loss); the model ends holding that epoch's weights, and that epoch's ACC and loss are reported with
it. Stopping watches the loss, as the seed does, because it keeps moving where AUC plateaus.
Options beyond it (docs/studies.md#training-recipes): a learning-rate ``schedule``, AdamW's
``weight_decay``, ``class_weights`` in the loss and ``augment``; ``recipe = "paper"`` (the default)
is the seed study's exactly, and an explicit key overrides the named recipe's value.

Batches are drawn by index from whole splits already on the device (:class:`nas3d.data.Split`), so
the loop does no per-sample Python work and no host-to-device copies. It runs in channels_last_3d
memory format; on CUDA under autocast (bf16 where the GPU computes it natively, else fp16 with a
gradient scaler), with cuDNN autotuning as ``TrainConfig.cudnn_benchmark`` asks, for the run only.
On the CPU it trains in float32, bit-reproducibly; bf16 there is an opt-in (``TrainConfig.cpu_bf16``).
Validation and test scores are always computed in float32 (no autocast), as MedMNIST's evaluator
sees them: bf16 logits would tie scores and move AUC in the third decimal. This module does not
import optuna: failures are exceptions (:class:`TrainingFailure`) whose message is the reason the
caller records.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nas3d.data import DeviceData, Split
from nas3d.metrics import accuracy, auc, parse_threshold_rule
from nas3d.util import check_choice, unknown_option_message

#: The epoch a run keeps: by best validation AUC or best validation ACC (TrainConfig.keep).
KEEP_CHOICES = ("val_auc", "val_acc")
SCHEDULES = ("constant", "multistep", "cosine")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass(frozen=True)
class Recipe:
    """The options a named recipe sets (``TrainConfig.options`` resolves them)."""

    schedule: str = "constant"  # learning rate per epoch: constant, multistep (x0.1 at 50 % and 75 %), cosine
    warmup_epochs: int = 0  # linear warm-up epochs before the cosine decay (cosine only)
    weight_decay: float = 0.0  # AdamW's decoupled decay when > 0; plain Adam at 0
    class_weights: str = "none"  # "balanced": inverse class frequency of the training split in the loss
    augment: bool = False  # per-batch flips, 90-degree rotations, a small affine and intensity jitter

    def __post_init__(self) -> None:
        check_choice("train.schedule", self.schedule, SCHEDULES)
        check_choice("train.class_weights", self.class_weights, CLASS_WEIGHTS)
        if self.warmup_epochs < 0:
            raise ValueError(f"train.warmup_epochs must be >= 0, but got {self.warmup_epochs!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(
                f"train.weight_decay must be a finite number >= 0, but got {self.weight_decay!r}")


#: Named recipes. "paper" is the seed study's (constant lr, Adam, unweighted loss, no augmentation);
#: "augmented" is the paper's with augmentation, the recipe table's best (bench/recipe_table.py,
#: docs/studies.md#training-recipes) and ``nas3d retrain``'s default; "small3d" turns on every option.
RECIPES = {
    "paper": Recipe(),
    "augmented": Recipe(augment=True),
    "small3d": Recipe(schedule="cosine", warmup_epochs=1, weight_decay=1e-2, class_weights="balanced",
                      augment=True),
}


@dataclass(frozen=True)
class TrainConfig:
    """Search-time training recipe; defaults are the seed study's (docs/studies.md)."""

    max_epochs: int = 50
    patience: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    amp: bool = True  # mixed precision on CUDA
    # bf16 autocast on CPUs with native bf16 (cpu_has_native_bf16), opt-in. Measured on a 2-core AMD
    # EPYC with avx512_bf16 (bench/train_throughput.py, seed architectures, 28³, batch 128): about
    # 1.5x to 2x faster than float32. Not the default because oneDNN's bf16 training is not
    # bit-reproducible (the same trial twice gave different losses for some networks) and a BatchNorm
    # ResNet at 4³ once diverged to nan; float32 channels-last was identical every time.
    cpu_bf16: bool = False
    # channels_last_3d memory format. Measured on an H200 (bf16, 28³, batch 128): +3 % to +39 % on the
    # seed architectures (their BatchNorm stem and InstanceNorm ops run far faster channels-last),
    # 2.1x on a small BN/IN CNN; only a norm-free toy net got slower (-5 to -20 %). On the CPU above
    # (bench/train_throughput.py, float32): the loop ran 1.78x-1.95x the channels-first seed loop on two
    # seed architectures (1.15x SynapseMNIST3D, 1.16x the small CNN), and 1.00x when channels-first.
    channels_last: bool = True
    # torch.backends.cudnn.benchmark for the duration of a CUDA run (restored after): input shapes are
    # fixed, so autotuned kernels pay off from the second epoch. A global flag, so it is asked for here
    # rather than set behind the caller's back.
    cudnn_benchmark: bool = True
    # The epoch whose weights the run keeps and reports: the best validation AUC (the search objective,
    # and MedMNIST's own benchmark code's choice) or the best validation ACC (the seed code's choice).
    # Ties go to the lower validation loss.
    keep: str = "val_auc"
    # A named recipe (RECIPES); each option below left unset (None) takes the recipe's value, so
    # `recipe = "small3d"` with `augment = false` is that recipe without augmentation.
    recipe: str = "paper"
    schedule: str | None = None
    warmup_epochs: int | None = None
    weight_decay: float | None = None
    class_weights: str | None = None
    augment: bool | None = None
    # The decision threshold of a binary model, chosen on the validation split after training
    # (nas3d retrain): "youden" maximises balanced accuracy, "sensitivity:0.9" reaches that sensitivity.
    threshold: str = "youden"

    def __post_init__(self) -> None:
        for name in ("max_epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, but got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a finite number > 0, but got {self.lr!r}")
        check_choice("train.keep", self.keep, KEEP_CHOICES)
        if self.recipe not in RECIPES:
            raise ValueError(unknown_option_message("train.recipe", self.recipe, list(RECIPES)))
        self.options  # noqa: B018  (validates the resolved options)
        parse_threshold_rule(self.threshold)

    @property
    def options(self) -> Recipe:
        """The recipe's options with this config's explicit keys applied."""
        explicit = {f: getattr(self, f) for f in Recipe.__dataclass_fields__ if getattr(self, f) is not None}
        return dataclasses.replace(RECIPES[self.recipe], **explicit)

    def describe_recipe(self) -> str:
        """The recipe in words: its name, and the options that differ from the paper's."""
        options, paper = self.options, RECIPES["paper"]
        warmup = f", {options.warmup_epochs} warm-up epochs" if options.schedule == "cosine" else ""
        words = {"schedule": f"{options.schedule} schedule{warmup}",
                 "weight_decay": f"AdamW weight decay {options.weight_decay:g}",
                 "class_weights": f"{options.class_weights} class weights", "augment": "augmentation"}
        changed = [text for key, text in words.items() if getattr(options, key) != getattr(paper, key)]
        return self.recipe + (f" with {', '.join(changed)}" if changed else "")

    def lr_at(self, epoch: int) -> float:
        """The learning rate of 1-based ``epoch`` by the schedule.

        multistep: MedMNIST's, x0.1 from 50 % and again from 75 % of ``max_epochs``. cosine: a linear
        warm-up to ``lr`` over ``warmup_epochs``, then a half cosine down to 0 at the end.
        """
        options, total, index = self.options, self.max_epochs, epoch - 1
        if options.schedule == "multistep":
            # ceil: a milestone that is no whole epoch (a short run) falls after it, never at epoch 1
            return self.lr * 0.1 ** sum(index >= math.ceil(m * total) for m in (0.5, 0.75))
        if options.schedule == "cosine":
            warmup = min(options.warmup_epochs, total - 1)
            if index < warmup:
                return self.lr * (index + 1) / (warmup + 1)
            return self.lr * 0.5 * (1 + math.cos(math.pi * (index - warmup) / (total - warmup)))
        return self.lr


class TrainingFailure(RuntimeError):
    """A trial that could not be trained; ``str(exc)`` is the one-line reason to record."""


class TrainingStopped(Exception):
    """``should_stop`` asked training to stop (a worker's stop signal); not a failure of the model."""


class TrialOutOfMemory(TrainingFailure):
    """The device ran out of memory; the architecture may still be good at a smaller batch."""


class NonFiniteLoss(TrainingFailure):
    """The loss became nan or inf: training diverged."""


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    val_auc: float
    val_acc: float
    # Wall time of the epoch's training pass and search validation; not part of a record's equality, so
    # that the same trial run twice gives equal records.
    seconds: float | None = field(default=None, compare=False)
    # Scores on the whole validation split, where the data holds one beside the search share
    # (``DataConfig.record_full_val``): recorded for benchmarks, never used to choose or stop.
    full_val_auc: float | None = None
    full_val_acc: float | None = None


@dataclass(frozen=True)
class TrainResult:
    """Validation metrics of the kept epoch (best by ``TrainConfig.keep``) and how the run went."""

    val_auc: float
    val_acc: float
    val_loss: float
    best_epoch: int  # 1-based
    epochs_run: int
    train_seconds: float  # wall time of the whole run, validation included
    samples_per_second: float  # training samples per second of the training passes alone
    history: tuple[EpochRecord, ...]
    stopped_early: bool = False  # an ``on_epoch`` callback ended the run before patience or max_epochs


@dataclass(frozen=True)
class TrainProgress:
    """Where a run stands after a whole epoch: what :func:`train_trial` needs to go on from there as if
    it had never stopped (``resume_from``), handed to ``save_progress`` every ``save_every`` epochs.

    Its tensors are the live ones of the run: serialise it (:meth:`to_dict` and ``torch.save``) before
    the callback returns. :meth:`to_dict` holds tensors, numbers, strings and lists only, so the saved
    file loads with ``torch.load(weights_only=True)``. There is no learning-rate scheduler state: the
    rate is a function of the epoch (:meth:`TrainConfig.lr_at`), set afresh at every epoch.
    """

    config: dict[str, Any]  # the TrainConfig that made it (dataclasses.asdict); resuming needs the same
    epoch: int  # epochs completed (1-based number of the last one)
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]  # the fp16 gradient scaler's state ({} when it is off)
    best_epoch: int  # 1-based; its record is history[best_epoch - 1]
    best_model: dict[str, torch.Tensor]
    history: tuple[EpochRecord, ...]
    lowest_loss: float  # patience: the lowest validation loss so far, and epochs since it fell
    since_lower: int
    train_seconds: float  # wall time of the training passes so far (for samples_per_second)
    elapsed_seconds: float  # wall time of the run so far, validation included (for train_seconds)
    # Random number generator states: "torch" (the global CPU generator: dropout, init), "batch_order",
    # "augment" (with augmentation) and "cuda" (on a CUDA device). With them a resumed CPU run continues
    # bit for bit as the run that saved it.
    rng: dict[str, torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        """Plain data, tensors on the CPU: for ``torch.save``, and :meth:`from_dict` after
        ``torch.load(weights_only=True)``."""
        def cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu() for k, v in state.items()}

        return {
            "config": self.config, "epoch": self.epoch, "model": cpu(self.model),
            "optimizer": _to_cpu(self.optimizer), "scaler": self.scaler, "best_epoch": self.best_epoch,
            "best_model": cpu(self.best_model), "history": [dataclasses.asdict(r) for r in self.history],
            "lowest_loss": self.lowest_loss, "since_lower": self.since_lower,
            "train_seconds": self.train_seconds, "elapsed_seconds": self.elapsed_seconds,
            "rng": cpu(self.rng),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainProgress:
        """The progress :meth:`to_dict` wrote; a one-line ``ValueError`` for anything else."""
        try:
            history = tuple(EpochRecord(**r) for r in data["history"])
            progress = cls(
                config=dict(data["config"]), epoch=int(data["epoch"]), model=dict(data["model"]),
                optimizer=dict(data["optimizer"]), scaler=dict(data["scaler"]),
                best_epoch=int(data["best_epoch"]), best_model=dict(data["best_model"]), history=history,
                lowest_loss=float(data["lowest_loss"]), since_lower=int(data["since_lower"]),
                train_seconds=float(data["train_seconds"]), elapsed_seconds=float(data["elapsed_seconds"]),
                rng=dict(data["rng"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a training progress record ({type(e).__name__}: {e})") from None
        if not (1 <= progress.best_epoch <= progress.epoch == len(history)) or "torch" not in progress.rng \
                or "batch_order" not in progress.rng:
            raise ValueError(f"not a training progress record (epoch {progress.epoch}, best epoch "
                             f"{progress.best_epoch}, {len(history)} epochs of history)")
        return progress


def _to_cpu(value: Any) -> Any:
    """``value`` (an optimizer state: nested dicts and lists) with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


#: Called after every epoch's validation with the epoch's record and whether the run ends after it
#: anyway (patience or ``max_epochs``); returns False to stop training now. Keeps this module free of
#: optuna: nas3d.early_stopping.EpochMonitor is the one nas3d passes.
EpochCallback = Callable[[EpochRecord, bool], bool]


def train_trial(
    model: nn.Module,
    data: DeviceData,
    config: TrainConfig,
    device: torch.device | str,
    *,
    progress: bool = False,
    on_epoch: EpochCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: TrainProgress | None = None,
    save_progress: Callable[[TrainProgress], None] | None = None,
    save_every: int = 10,
) -> TrainResult:
    """Train ``model`` on ``data.train``, validating on ``data.val`` each epoch, and return the best epoch.

    ``should_stop`` is polled between batches; when it returns true, :class:`TrainingStopped` is
    raised there (so a stop request never lands in the middle of a step or of the caller's bookkeeping).

    The model is moved to ``device`` and left holding the best epoch's weights. The global torch seed
    and the batch order are set from ``config.seed``: on CPU the same model and data give identical
    results twice. Raises :class:`TrialOutOfMemory` or :class:`NonFiniteLoss` (both
    :class:`TrainingFailure`) instead of returning a score for a run that did not train.
    ``on_epoch`` (see :data:`EpochCallback`) sees every epoch and may end the run early; the result
    then has ``stopped_early`` set and holds the best epoch so far.

    Resuming: ``save_progress`` is handed a :class:`TrainProgress` after every ``save_every``-th epoch
    (never after the last one, nor one ``on_epoch`` ended); with it, ``should_stop`` is also polled
    after every epoch, and a stop asked for there is saved before :class:`TrainingStopped` is raised.
    ``resume_from`` (saved by a run with the same ``config``; ``model`` built as for that run) goes on
    after its epoch: on the CPU the result, history and final weights are those of the run that was
    never interrupted. Without these arguments nothing is saved or restored.
    """
    device = torch.device(device)
    if save_progress is not None and (isinstance(save_every, bool) or not isinstance(save_every, int)
                                      or save_every < 1):
        raise ValueError(f"save_every must be an integer >= 1 (epochs between saves), but got {save_every!r}")
    if resume_from is not None:
        _check_resumable(resume_from, config)
    missing = set(range(data.num_classes)) - set(data.val.labels.unique().tolist())
    if missing:
        raise ValueError(f"validation split has no sample of classes {sorted(missing)}: its AUC is undefined")
    try:
        with cudnn_benchmark(config.cudnn_benchmark) if device.type == "cuda" else nullcontext():
            return _train(model, data, config, device, progress, on_epoch, should_stop,
                          resume_from=resume_from, save_progress=save_progress, save_every=save_every)
    except torch.OutOfMemoryError as exc:
        reason = f"out of memory on {device} at batch size {config.batch_size}: {str(exc).splitlines()[0]}"
    # Outside the except block the exception and its traceback, which hold _train's frames and their
    # tensors, are already released, so the cache can really be emptied for the next trial.
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    raise TrialOutOfMemory(reason)


def _check_resumable(progress: TrainProgress, config: TrainConfig) -> None:
    """A one-line ``ValueError`` unless ``progress`` was saved by a run of ``config`` that has epochs left."""
    recorded = dataclasses.asdict(config)
    differ = sorted(k for k in recorded.keys() | progress.config.keys()
                    if recorded.get(k) != progress.config.get(k))
    if differ:
        changes = ", ".join(f"train.{k} {progress.config.get(k)!r} -> {recorded.get(k)!r}"
                            for k in differ[:4])
        raise ValueError(f"the saved progress is of another training recipe ({changes}); resume with the "
                         "recipe that saved it, or start over without it")
    if progress.epoch >= config.max_epochs:
        raise ValueError(f"the saved progress is at epoch {progress.epoch} of {config.max_epochs}: "
                         "nothing is left to train; start over without it")


def _train(
    model: nn.Module,
    data: DeviceData,
    config: TrainConfig,
    device: torch.device,
    progress: bool,
    on_epoch: EpochCallback | None,
    should_stop: Callable[[], bool] | None = None,
    *,
    resume_from: TrainProgress | None = None,
    save_progress: Callable[[TrainProgress], None] | None = None,
    save_every: int = 10,
) -> TrainResult:
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # batch order, independent of model init
    amp_dtype = autocast_dtype(device, config.amp, cpu_bf16=config.cpu_bf16)
    channels_last = config.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    options = config.options
    if options.weight_decay > 0:
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                                             weight_decay=options.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    class_weight = balanced_class_weights(data.train.labels, data.num_classes) \
        if options.class_weights == "balanced" else None
    # Augmentation draws from its own generator, so turning it on leaves the batch order unchanged.
    augment_generator = torch.Generator().manual_seed(config.seed + AUGMENT_SEED_OFFSET) \
        if options.augment else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    history: list[EpochRecord] = []
    best: EpochRecord | None = None
    best_state: dict[str, torch.Tensor] = {}
    lowest_loss, since_lower = math.inf, 0
    stopped_early = False
    train_time = elapsed_before = 0.0
    first_epoch = 1
    if resume_from is not None:
        r = resume_from
        model.load_state_dict(r.model)
        optimizer.load_state_dict(r.optimizer)
        if scaler.is_enabled() and r.scaler:
            scaler.load_state_dict(r.scaler)
        history = list(r.history)
        best = history[r.best_epoch - 1]
        best_state = {k: v.to(device) for k, v in r.best_model.items()}
        lowest_loss, since_lower = r.lowest_loss, r.since_lower
        train_time, elapsed_before, first_epoch = r.train_seconds, r.elapsed_seconds, r.epoch + 1
        # Last, so that nothing above draws from them: the next epoch's batches, augmentations and
        # dropout masks are those the saving run drew next.
        torch.set_rng_state(r.rng["torch"])
        generator.set_state(r.rng["batch_order"])
        if augment_generator is not None and "augment" in r.rng:
            augment_generator.set_state(r.rng["augment"])
        if device.type == "cuda" and "cuda" in r.rng:
            torch.cuda.set_rng_state(r.rng["cuda"], device)

    def snapshot(epoch: int) -> TrainProgress:
        assert best is not None
        rng = {"torch": torch.get_rng_state(), "batch_order": generator.get_state()}
        if augment_generator is not None:
            rng["augment"] = augment_generator.get_state()
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return TrainProgress(
            config=dataclasses.asdict(config), epoch=epoch, model=model.state_dict(),
            optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled() else {},
            best_epoch=best.epoch, best_model=best_state, history=tuple(history),
            lowest_loss=lowest_loss, since_lower=since_lower, train_seconds=train_time,
            elapsed_seconds=elapsed_before + time.perf_counter() - start, rng=rng)

    bar = tqdm(total=config.max_epochs, initial=first_epoch - 1, desc="train", unit="epoch", leave=False,
               disable=not progress)
    with bar:
        for epoch in range(first_epoch, config.max_epochs + 1):
            tick = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(epoch)
            train_loss = train_epoch(
                model,
                data.train,
                optimizer,
                scaler,
                batch_size=config.batch_size,
                generator=generator,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
                should_stop=should_stop,
                class_weight=class_weight,
                augment_generator=augment_generator,
            )
            train_time += time.perf_counter() - tick  # train_epoch ends in a sync (.item()), so this is real
            if not math.isfinite(train_loss):
                raise NonFiniteLoss(f"training loss became {train_loss} in epoch {epoch} (lr={config.lr})")
            try:
                val_auc, val_acc, val_loss = evaluate(
                    model, data.val, device, config.batch_size, channels_last=channels_last
                )
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(f"validation {exc} in epoch {epoch} (lr={config.lr})") from None
            seconds = time.perf_counter() - tick  # what a search pays: without the full-val scoring
            full_auc = full_acc = None
            if data.full_val is not None:
                full_auc, full_acc, _ = evaluate(
                    model, data.full_val, device, config.batch_size, channels_last=channels_last
                )
            record = EpochRecord(epoch, train_loss, val_loss, val_auc, val_acc,
                                 seconds=seconds, full_val_auc=full_auc,
                                 full_val_acc=full_acc)
            history.append(record)
            # Ties (common once AUC saturates at 1.0, and ACC moves in steps) go to the lower val loss.
            if best is None or (getattr(record, config.keep), -val_loss) > (getattr(best, config.keep),
                                                                          -best.val_loss):
                best = record
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if val_loss < lowest_loss:
                lowest_loss, since_lower = val_loss, 0
            else:
                since_lower += 1
            bar.set_postfix(loss=f"{val_loss:.4f}", auc=f"{val_auc:.4f}", best=f"{best.val_auc:.4f}")
            bar.update()
            # Patience (or the last epoch) ends the run on its own terms; the callback is told so, and
            # only a run that would have gone on counts as stopped early.
            last = since_lower >= config.patience or epoch == config.max_epochs
            if on_epoch is not None and not on_epoch(record, last) and not last:
                stopped_early = True
                break
            if last:
                break
            if save_progress is not None:
                # A stop asked for during the epoch waits for its end here, where it can be saved.
                stopping = should_stop is not None and should_stop()
                if stopping or epoch % save_every == 0:
                    save_progress(snapshot(epoch))
                if stopping:
                    raise TrainingStopped(f"stop requested; progress saved at epoch {epoch}")
    assert best is not None  # max_epochs >= 1
    model.load_state_dict(best_state)
    return TrainResult(
        val_auc=best.val_auc,
        val_acc=best.val_acc,
        val_loss=best.val_loss,
        best_epoch=best.epoch,
        epochs_run=len(history),
        train_seconds=elapsed_before + time.perf_counter() - start,
        samples_per_second=len(history) * len(data.train) / train_time,
        history=tuple(history),
        stopped_early=stopped_early,
    )


def torch_device(name: str) -> torch.device:
    """``--device`` as a torch device that exists here; a one-line ``ValueError`` otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, but got {name!r}")
    if device.type == "cuda" and (device.index or 0) >= gpu_count():
        raise ValueError(
            f"--device {name}: {no_gpu_message(device.index or 0)}; use --device cpu or another GPU"
        )
    return device


def gpu_count() -> int:
    """GPUs this process may use (after CUDA_VISIBLE_DEVICES); 0 without a CUDA driver."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def no_gpu_message(index: int) -> str:
    count = gpu_count()
    if count == 0:
        return "CUDA is not available here (no NVIDIA GPU or driver visible to torch)"
    return f"there is no GPU {index}; this machine has {count} (0 to {count - 1})"


def device_name(device: torch.device) -> str:
    """``device`` as trials and results record it: with the GPU's model name on CUDA."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return str(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX).

    torch has no public query for this; its ``torch.cpu._is_*_supported`` helpers are the ones its own
    tests use. Without native support oneDNN emulates bf16 and autocast runs slower than float32.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cuda_has_native_bf16(device: torch.device | str) -> bool:
    """Whether the GPU ``device`` computes bf16 natively (compute capability 8.0 and up).

    torch's ``is_bf16_supported`` asks the *current* device, so it is asked inside that device's
    context; ``including_emulation=False`` because emulated bf16 (e.g. on a V100 or T4) is slower than
    fp16 with a gradient scaler. False where CUDA is not available.
    """
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(torch.device(device)):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(device: torch.device, enabled: bool, *, cpu_bf16: bool = False) -> torch.dtype | None:
    """The mixed-precision dtype to train in on ``device``, or None for float32.

    CUDA (``enabled``): bf16 where that GPU computes it natively, else fp16 (which needs a gradient
    scaler). CPU (``cpu_bf16``): bf16 where the CPU computes it natively, else float32.
    """
    if device.type == "cuda" and enabled:
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    if device.type == "cpu" and cpu_bf16 and cpu_has_native_bf16():
        return torch.bfloat16
    return None


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = enabled`` inside the block, the caller's setting after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def train_epoch(
    model: nn.Module,
    split: Split,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    batch_size: int,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    should_stop: Callable[[], bool] | None = None,
    class_weight: torch.Tensor | None = None,
    augment_generator: torch.Generator | None = None,
) -> float:
    """One pass over ``split`` in the order ``generator`` shuffles; returns the mean training loss.

    ``should_stop`` is polled before each batch; :class:`TrainingStopped` is raised when it is true.
    ``class_weight`` weighs the cross-entropy per class; ``augment_generator`` (a CPU generator)
    turns on :func:`augment_batch`. The reported loss is the unweighted mean either way.

    The loss is summed on the device and read once at the end, so CUDA never waits on the host
    mid-epoch; a nan shows up in the returned mean.
    """
    model.train()
    device = split.labels.device
    total = torch.zeros((), device=device)
    for index in split.batches(batch_size, generator):
        if should_stop is not None and should_stop():
            raise TrainingStopped("stop requested")
        images, labels = split.batch(index)
        if augment_generator is not None:
            images = augment_batch(images, augment_generator)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, weight=class_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        plain = loss if class_weight is None else F.cross_entropy(logits.detach().float(), labels)
        total += plain.detach() * len(labels)
    return total.item() / len(split)


#: Added to the run's seed for the augmentation generator (any fixed offset keeps it apart from the
#: batch-order generator's stream).
AUGMENT_SEED_OFFSET = 0x5EED


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights, ``n / (num_classes * count_c)``, on ``labels``' device; a class
    absent from ``labels`` weighs as if it had one sample (it never appears in the loss anyway)."""
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).float()
    return len(labels) / (num_classes * counts)


def augment_batch(images: torch.Tensor, generator: torch.Generator, *, max_degrees: float = 10.0,
                  max_scale: float = 0.1, max_shift: float = 0.05, max_jitter: float = 0.1) -> torch.Tensor:
    """A randomly augmented copy of ``images`` ``(B, C, D, H, W)``, every sample drawn independently.

    In the axial plane (the last two axes, H and W): a flip of each axis (p = 1/2) and a rotation by
    k x 90 degrees (k uniform in 0..3), both exact index permutations; then a small affine (in-plane
    rotation within ``max_degrees``, scale within 1 +- ``max_scale``, shift within ``max_shift`` of the
    extent on every axis; trilinear, border padding) and an intensity jitter (x * (1 + a) + b, a and b
    within +- ``max_jitter``). Every draw comes from ``generator`` (a CPU generator: the same draws on
    any device), so a CPU run is bit-reproducible. MONAI's RandFlip/RandRotate90/RandAffine draw per
    sample from a numpy RandomState and transform one sample at a time, which would mean a Python loop
    per batch and a generator outside torch's seeding; hence this batch transform in torch.
    """
    batch, device = images.shape[0], images.device

    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 2 - 1).to(device)

    flips = (torch.rand(batch, 2, generator=generator) < 0.5).to(device)
    turns = torch.randint(0, 4, (batch,), generator=generator).to(device)
    angles, scales, shifts = uniform(batch) * math.radians(max_degrees), 1 + uniform(batch) * max_scale, \
        uniform(batch, 3) * max_shift * 2
    gain, offset = uniform(batch) * max_jitter, uniform(batch) * max_jitter

    def where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.view(-1, 1, 1, 1, 1), a, b)

    out = where(flips[:, 0], images.flip(-2), images)
    out = where(flips[:, 1], out.flip(-1), out)
    if out.shape[-1] == out.shape[-2]:  # a quarter turn keeps the shape only on a square plane
        rotated = out
        for k in (1, 2, 3):
            rotated = where(turns == k, torch.rot90(out, k, dims=(-2, -1)), rotated)
        out = rotated
    # affine_grid's theta maps output to input coordinates in (x, y, z) = (W, H, D) order.
    cos, sin = torch.cos(angles) / scales, torch.sin(angles) / scales
    theta = torch.zeros(batch, 3, 4, device=device, dtype=out.dtype)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 2, 2] = 1 / scales
    theta[:, :, 3] = shifts.to(out.dtype)
    grid = F.affine_grid(theta, list(out.shape), align_corners=False)
    out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out * (1 + gain.view(-1, 1, 1, 1, 1)) + offset.view(-1, 1, 1, 1, 1)


def predict(
    model: nn.Module,
    split: Split,
    device: torch.device | str,
    batch_size: int,
    *,
    channels_last: bool = False,
) -> tuple[np.ndarray, float]:
    """Softmax scores ``(N, num_classes)`` for ``split`` (as the MedMNIST evaluator takes them) and the
    mean cross-entropy loss.

    In float32 throughout, whatever precision the model trained in: autocast is turned off, so the
    logits themselves are float32 (upcasting bf16 logits afterwards would keep their 8-bit mantissa
    and tie scores).
    """
    device = torch.device(device)
    model.eval()
    probabilities = []
    total = torch.zeros((), device=device)
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        for index in split.batches(batch_size):
            images, labels = split.batch(index)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last_3d)
            logits = model(images)
            assert logits.dtype == torch.float32, logits.dtype  # a model that casts by itself
            total += F.cross_entropy(logits, labels, reduction="sum")
            probabilities.append(torch.softmax(logits, dim=1))
    return torch.cat(probabilities).cpu().numpy(), total.item() / len(split)


def evaluate(
    model: nn.Module,
    split: Split,
    device: torch.device | str,
    batch_size: int,
    *,
    channels_last: bool = False,
) -> tuple[float, float, float]:
    """``(auc, acc, loss)`` of ``model`` on ``split`` in float32, with the MedMNIST evaluator's AUC and ACC.

    Raises :class:`NonFiniteLoss` when the loss is nan or inf (the scores then are too).
    """
    scores, loss = predict(model, split, device, batch_size, channels_last=channels_last)
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss}")
    labels = split.labels.cpu().numpy()
    return auc(labels, scores, split.task), accuracy(labels, scores, split.task), loss
