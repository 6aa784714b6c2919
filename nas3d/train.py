"""Training one trial: on-device data, Adam, early stopping on validation loss.

The recipe is the seed study's (DESIGN.md §4): Adam, cross-entropy, validation every epoch, stop after
``patience`` epochs without a lower validation loss. The trial's score is the best validation AUC seen
(the seed's "fitness = best val score"; ties go to the lower loss); the model ends holding that
epoch's weights, and that epoch's ACC and loss are reported with it. Stopping watches the loss, as the
seed does, because it keeps moving where AUC plateaus.

Batches are drawn by index from whole splits already on the device (:class:`nas3d.data.Split`), so
the loop does no per-sample Python work and no host-to-device copies. It runs in channels_last_3d
memory format; on CUDA under autocast (bf16 where supported, else fp16 with a gradient scaler) with
cuDNN autotuning on. On the CPU it trains in float32, bit-reproducibly; bf16 there is an opt-in
(``TrainConfig.cpu_bf16``). This module does not import optuna: failures
are exceptions (:class:`TrainingFailure`) whose message is the reason the caller records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nas3d.data import DeviceData, Split
from nas3d.metrics import accuracy, auc


@dataclass(frozen=True)
class TrainConfig:
    """Search-time training recipe; defaults are the seed study's (DESIGN.md §4)."""

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

    def __post_init__(self) -> None:
        for name in ("max_epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, but got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, but got {self.lr!r}")


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


@dataclass(frozen=True)
class TrainResult:
    """Validation metrics of the best epoch (highest val AUC) and how the run went."""

    val_auc: float
    val_acc: float
    val_loss: float
    best_epoch: int  # 1-based
    epochs_run: int
    train_seconds: float  # wall time of the whole run, validation included
    samples_per_second: float  # training samples per second of the training passes alone
    history: tuple[EpochRecord, ...]


def train_trial(
    model: nn.Module,
    data: DeviceData,
    config: TrainConfig,
    device: torch.device | str,
    *,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``model`` on ``data.train``, validating on ``data.val`` each epoch, and return the best epoch.

    ``should_stop`` is polled between batches; when it returns true, :class:`TrainingStopped` is
    raised there (so a stop request never lands in the middle of a step or of the caller's bookkeeping).

    The model is moved to ``device`` and left holding the best epoch's weights. The global torch seed
    and the batch order are set from ``config.seed``: on CPU the same model and data give identical
    results twice. Raises :class:`TrialOutOfMemory` or :class:`NonFiniteLoss` (both
    :class:`TrainingFailure`) instead of returning a score for a run that did not train.
    """
    device = torch.device(device)
    missing = set(range(data.num_classes)) - set(data.val.labels.unique().tolist())
    if missing:
        raise ValueError(f"validation split has no sample of classes {sorted(missing)}: its AUC is undefined")
    try:
        return _train(model, data, config, device, progress, should_stop)
    except torch.OutOfMemoryError as exc:
        reason = f"out of memory on {device} at batch size {config.batch_size}: {str(exc).splitlines()[0]}"
    # Outside the except block the exception and its traceback, which hold _train's frames and their
    # tensors, are already released, so the cache can really be emptied for the next trial.
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    raise TrialOutOfMemory(reason)


def _train(
    model: nn.Module,
    data: DeviceData,
    config: TrainConfig,
    device: torch.device,
    progress: bool,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # batch order, independent of model init
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotuned kernels pay off from epoch 2
    amp_dtype = autocast_dtype(device, config.amp, cpu_bf16=config.cpu_bf16)
    channels_last = config.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    history: list[EpochRecord] = []
    best: EpochRecord | None = None
    best_state: dict[str, torch.Tensor] = {}
    lowest_loss, since_lower = math.inf, 0
    train_time = 0.0
    bar = tqdm(total=config.max_epochs, desc="train", unit="epoch", leave=False, disable=not progress)
    with bar:
        for epoch in range(1, config.max_epochs + 1):
            tick = time.perf_counter()
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
            )
            train_time += time.perf_counter() - tick  # train_epoch ends in a sync (.item()), so this is real
            if not math.isfinite(train_loss):
                raise NonFiniteLoss(f"training loss became {train_loss} in epoch {epoch} (lr={config.lr})")
            try:
                val_auc, val_acc, val_loss = evaluate(
                    model, data.val, device, config.batch_size, amp=config.amp, cpu_bf16=config.cpu_bf16,
                    channels_last=channels_last,
                )
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(f"validation {exc} in epoch {epoch} (lr={config.lr})") from None
            record = EpochRecord(epoch, train_loss, val_loss, val_auc, val_acc)
            history.append(record)
            # Ties in AUC (common once it saturates at 1.0) go to the lower validation loss.
            if best is None or (val_auc, -val_loss) > (best.val_auc, -best.val_loss):
                best = record
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if val_loss < lowest_loss:
                lowest_loss, since_lower = val_loss, 0
            else:
                since_lower += 1
            bar.set_postfix(loss=f"{val_loss:.4f}", auc=f"{val_auc:.4f}", best=f"{best.val_auc:.4f}")
            bar.update()
            if since_lower >= config.patience:
                break
    assert best is not None  # max_epochs >= 1
    model.load_state_dict(best_state)
    return TrainResult(
        val_auc=best.val_auc,
        val_acc=best.val_acc,
        val_loss=best.val_loss,
        best_epoch=best.epoch,
        epochs_run=len(history),
        train_seconds=time.perf_counter() - start,
        samples_per_second=len(history) * len(data.train) / train_time,
        history=tuple(history),
    )


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


def autocast_dtype(device: torch.device, enabled: bool, *, cpu_bf16: bool = False) -> torch.dtype | None:
    """The mixed-precision dtype to train in on ``device``, or None for float32.

    CUDA (``enabled``): bf16 where the GPU supports it, else fp16 (which needs a gradient scaler).
    CPU (``cpu_bf16``): bf16 where the CPU computes it natively, else float32.
    """
    if device.type == "cuda" and enabled:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16 and cpu_has_native_bf16():
        return torch.bfloat16
    return None


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
) -> float:
    """One pass over ``split`` in the order ``generator`` shuffles; returns the mean training loss.

    ``should_stop`` is polled before each batch; :class:`TrainingStopped` is raised when it is true.

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
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach() * len(labels)
    return total.item() / len(split)


def predict(
    model: nn.Module,
    split: Split,
    device: torch.device | str,
    batch_size: int,
    *,
    amp: bool = True,
    cpu_bf16: bool = False,
    channels_last: bool = False,
) -> tuple[np.ndarray, float]:
    """Softmax scores ``(N, num_classes)`` for ``split`` (as the MedMNIST evaluator takes them) and the
    mean cross-entropy loss."""
    device = torch.device(device)
    amp_dtype = autocast_dtype(device, amp, cpu_bf16=cpu_bf16)
    model.eval()
    probabilities = []
    total = torch.zeros((), device=device)
    with torch.inference_mode():
        for index in split.batches(batch_size):
            images, labels = split.batch(index)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images).float()
            total += F.cross_entropy(logits, labels, reduction="sum")
            probabilities.append(torch.softmax(logits, dim=1))
    return torch.cat(probabilities).cpu().numpy(), total.item() / len(split)


def evaluate(
    model: nn.Module,
    split: Split,
    device: torch.device | str,
    batch_size: int,
    *,
    amp: bool = True,
    cpu_bf16: bool = False,
    channels_last: bool = False,
) -> tuple[float, float, float]:
    """``(auc, acc, loss)`` of ``model`` on ``split``, with the MedMNIST evaluator's AUC and ACC.

    Raises :class:`NonFiniteLoss` when the loss is nan or inf (the scores then are too).
    """
    scores, loss = predict(
        model, split, device, batch_size, amp=amp, cpu_bf16=cpu_bf16, channels_last=channels_last
    )
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss}")
    labels = split.labels.cpu().numpy()
    return auc(labels, scores, split.task), accuracy(labels, scores, split.task), loss
