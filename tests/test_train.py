"""nas3d.train on CPU with tiny synthetic volumes and a tiny local CNN."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from medmnist.evaluator import getACC, getAUC
from torch import nn

from nas3d.data import DataConfig, DeviceData, load_splits
from nas3d.train import (
    NonFiniteLoss,
    TrainConfig,
    TrainingFailure,
    TrialOutOfMemory,
    autocast_dtype,
    cpu_has_native_bf16,
    cuda_has_native_bf16,
    cudnn_benchmark,
    evaluate,
    predict,
    train_trial,
)

FAST = TrainConfig(max_epochs=12, patience=2, batch_size=16, lr=0.05)
# Long enough for the 3-class set, whose loss falls slowly, to be learned in float32 and in bf16 alike.
LEARN = TrainConfig(max_epochs=30, patience=5, batch_size=16, lr=0.02)


def tiny_cnn(classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, classes),
    )


@pytest.fixture(scope="module", params=[2, 3], ids=["binary", "3-class"])
def data(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DeviceData:
    root = tmp_path_factory.mktemp("data")
    cfg = DataConfig(
        dataset="synthetic", size=10, synthetic_classes=request.param, synthetic_samples=64, root=str(root)
    )
    return load_splits(cfg, "cpu", for_search=False)


def test_learns_and_reports_the_best_auc_epoch(data: DeviceData) -> None:
    model = tiny_cnn(data.num_classes)
    result = train_trial(model, data, LEARN, "cpu")
    assert result.val_auc > 0.75  # the synthetic classes are learnable by a tiny CNN in a few epochs
    best = max(result.history, key=lambda r: (r.val_auc, -r.val_loss))
    assert result.best_epoch == best.epoch
    assert (result.val_auc, result.val_acc, result.val_loss) == (best.val_auc, best.val_acc, best.val_loss)
    assert result.epochs_run == len(result.history) and result.train_seconds > 0
    assert result.samples_per_second > 0


def test_model_ends_with_best_epoch_weights_scored_like_medmnist(data: DeviceData) -> None:
    model = tiny_cnn(data.num_classes)
    result = train_trial(model, data, FAST, "cpu")
    assert result.best_epoch < result.epochs_run  # so the weights below must have been restored
    model.eval()
    with torch.no_grad():  # scored by hand, in the trainer's float32 and channels-last layout
        images, labels = data.val.batch(slice(None))
        images = images.contiguous(memory_format=torch.channels_last_3d)
        scores = torch.softmax(torch.cat([model(x) for x in images.split(FAST.batch_size)]), 1).numpy()
    y = labels.numpy().reshape(-1, 1)
    assert result.val_auc == pytest.approx(getAUC(y, scores, data.task), abs=1e-12)
    assert result.val_acc == getACC(y, scores, data.task)
    assert evaluate(model, data.val, "cpu", FAST.batch_size, channels_last=True) == pytest.approx(
        (result.val_auc, result.val_acc, result.val_loss), abs=1e-6
    )


def test_stops_after_patience_epochs_without_lower_val_loss(data: DeviceData) -> None:
    result = train_trial(tiny_cnn(data.num_classes), data, replace(FAST, max_epochs=40, lr=1.0), "cpu")
    losses = [r.val_loss for r in result.history]
    lowest = int(np.argmin(losses))  # first epoch with the lowest loss
    assert result.epochs_run < 40
    assert result.epochs_run == lowest + 1 + FAST.patience


def test_same_trial_twice_gives_identical_results(data: DeviceData) -> None:
    runs = []
    for _ in range(2):
        model = tiny_cnn(data.num_classes, seed=7)
        result = train_trial(model, data, FAST, "cpu")
        runs.append((result.history, result.best_epoch, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][:2] == runs[1][:2]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2], strict=True))


def test_cpu_trains_in_float32_unless_bf16_is_asked_for() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, True) is None  # amp is for CUDA: float32 keeps CPU runs reproducible
    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert autocast_dtype(cpu, True, cpu_bf16=True) is expected


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
def test_cpu_bf16_learns_with_float32_master_weights(data: DeviceData) -> None:
    model = tiny_cnn(data.num_classes)
    result = train_trial(model, data, replace(LEARN, cpu_bf16=True), "cpu")
    assert result.val_auc > 0.75
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_cpu_without_native_bf16_keeps_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    # Emulated bf16 is slower than float32, so such a CPU must not get autocast even when asked.
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False)
    assert autocast_dtype(torch.device("cpu"), True, cpu_bf16=True) is None


class _NanLogits(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(1, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean((1, 2, 3, 4))[:, None]) * float("nan")


def test_diverging_loss_is_a_training_failure(data: DeviceData) -> None:
    with pytest.raises(NonFiniteLoss, match="loss became nan in epoch 1") as info:
        train_trial(_NanLogits(data.num_classes), data, FAST, "cpu")
    assert isinstance(info.value, TrainingFailure)
    with pytest.raises(NonFiniteLoss, match="lr=1e"):
        train_trial(tiny_cnn(data.num_classes), data, replace(FAST, lr=1e30), "cpu")


class _OutOfMemory(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")


def test_out_of_memory_is_a_training_failure(data: DeviceData) -> None:
    with pytest.raises(TrialOutOfMemory) as info:
        train_trial(_OutOfMemory(), data, FAST, "cpu")
    message = str(info.value)
    assert isinstance(info.value, TrainingFailure)
    assert message == "out of memory on cpu at batch size 16: CUDA out of memory. Tried to allocate 2.00 GiB"
    # raised outside the handler, so the failed run's frames (and tensors) are not kept alive by it
    assert info.value.__context__ is None


def test_missing_validation_class_is_refused(data: DeviceData) -> None:
    keep = data.val.labels != 0
    val = replace(data.val, images=data.val.images[keep], labels=data.val.labels[keep])
    with pytest.raises(ValueError, match=r"no sample of classes \[0\]"):
        train_trial(tiny_cnn(data.num_classes), replace(data, val=val), FAST, "cpu")


def test_progress_bar_only_when_asked(data: DeviceData, capsys: pytest.CaptureFixture[str]) -> None:
    config = replace(FAST, max_epochs=2)
    train_trial(tiny_cnn(data.num_classes), data, config, "cpu")
    assert capsys.readouterr().err == ""
    train_trial(tiny_cnn(data.num_classes), data, config, "cpu", progress=True)
    assert "epoch" in capsys.readouterr().err


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="train.patience must be >= 1, but got 0"):
        TrainConfig(patience=0)
    with pytest.raises(ValueError, match="train.lr"):
        TrainConfig(lr=0.0)


def test_keep_val_acc_keeps_the_best_accuracy_epoch(data: DeviceData) -> None:
    result = train_trial(tiny_cnn(data.num_classes), data, replace(FAST, keep="val_acc"), "cpu")
    best = max(result.history, key=lambda r: (r.val_acc, -r.val_loss))  # ties: the lower loss
    assert result.best_epoch == best.epoch
    assert (result.val_acc, result.val_auc) == (best.val_acc, best.val_auc)
    with pytest.raises(ValueError, match="train.keep must be one of val_auc, val_acc, got 'val_loss'"):
        TrainConfig(keep="val_loss")


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0])
def test_lr_must_be_finite_and_positive(lr: float) -> None:
    with pytest.raises(ValueError, match="train.lr must be a finite number > 0"):
        TrainConfig(lr=lr)


def test_scores_are_float32_even_inside_a_bf16_autocast(data: DeviceData) -> None:
    # A caller (or a training loop) under autocast must not get bf16 logits: the scores are what
    # MedMNIST's evaluator ranks, and bf16 has 8 mantissa bits.
    model = tiny_cnn(data.num_classes)
    plain, loss = predict(model, data.val, "cpu", 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, loss_inside = predict(model, data.val, "cpu", 16)
        assert model(data.val.batch(slice(0, 4))[0]).dtype == torch.bfloat16  # autocast is really on
    assert plain.dtype == np.float32 and np.array_equal(plain, inside) and loss == loss_inside


def test_cuda_amp_is_bf16_only_where_the_gpu_has_it_natively() -> None:
    # The real query, on this machine: with no GPU (or a pre-Ampere one) that is fp16 + GradScaler.
    native = cuda_has_native_bf16(torch.device("cuda"))
    if not torch.cuda.is_available():
        assert native is False
    assert autocast_dtype(torch.device("cuda"), True) is (torch.bfloat16 if native else torch.float16)
    assert autocast_dtype(torch.device("cuda"), False) is None


def test_cudnn_benchmark_is_set_for_the_run_only(data: DeviceData) -> None:
    before = torch.backends.cudnn.benchmark
    try:
        for wanted in (True, False):
            torch.backends.cudnn.benchmark = not wanted
            with cudnn_benchmark(wanted):
                assert torch.backends.cudnn.benchmark is wanted
            assert torch.backends.cudnn.benchmark is (not wanted)
        torch.backends.cudnn.benchmark = False
        train_trial(tiny_cnn(data.num_classes), data, replace(FAST, max_epochs=1), "cpu")
        assert torch.backends.cudnn.benchmark is False  # a CPU run leaves the global flag alone
    finally:
        torch.backends.cudnn.benchmark = before


# -- recipe options -------------------------------------------------------------------------------------


def test_schedules_give_the_documented_rate_per_epoch() -> None:
    constant = TrainConfig(max_epochs=8, lr=0.1)
    assert [constant.lr_at(e) for e in range(1, 9)] == [0.1] * 8
    multistep = replace(constant, schedule="multistep")  # MedMNIST's: x0.1 from epoch 5 (50 %), 7 (75 %)
    assert [multistep.lr_at(e) for e in range(1, 9)] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    assert replace(multistep, max_epochs=1).lr_at(1) == 0.1  # a one-epoch run is not decayed at once
    cosine = replace(constant, schedule="cosine", warmup_epochs=2)
    rates = [cosine.lr_at(e) for e in range(1, 9)]
    assert rates[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])  # linear warm-up, then the full rate
    assert all(a > b for a, b in zip(rates[2:], rates[3:], strict=False)) and rates[-1] > 0
    assert rates[5] == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 3 / 6)))


def test_the_paper_recipe_is_todays_and_explicit_keys_override_a_named_one() -> None:
    from nas3d.train import RECIPES, Recipe

    # constant, Adam, no weights, no augmentation
    assert TrainConfig().options == RECIPES["paper"] == Recipe()
    small = TrainConfig(recipe="small3d", weight_decay=0.0)
    assert small.options == replace(RECIPES["small3d"], weight_decay=0.0)
    assert TrainConfig().describe_recipe() == "paper"
    assert small.describe_recipe() == ("small3d with cosine schedule, 1 warm-up epochs, balanced class "
                                       "weights, augmentation")
    with pytest.raises(ValueError, match="unknown train.recipe 'fast'"):
        TrainConfig(recipe="fast")
    with pytest.raises(ValueError, match="train.weight_decay must be a finite number >= 0"):
        TrainConfig(weight_decay=-1.0)


def test_balanced_class_weights_are_inverse_frequency() -> None:
    from nas3d.train import balanced_class_weights

    weights = balanced_class_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert weights.tolist() == pytest.approx([4 / 9, 4 / 3, 4 / 3])  # absent class 2 counts as one


def test_augmentation_is_reproducible_and_keeps_shapes_and_labels() -> None:
    from nas3d.train import augment_batch

    images = torch.rand(6, 1, 5, 7, 7)
    first = augment_batch(images, torch.Generator().manual_seed(3))
    again = augment_batch(images, torch.Generator().manual_seed(3))
    other = augment_batch(images, torch.Generator().manual_seed(4))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, images)
    # without the affine and jitter, a sample is its own flips/quarter turns: the same values, moved
    exact = augment_batch(images, torch.Generator().manual_seed(3), max_degrees=0, max_scale=0, max_shift=0,
                          max_jitter=0)
    assert torch.allclose(exact.flatten(1).sort().values, images.flatten(1).sort().values, atol=1e-6)


def test_every_option_trains_reproducibly_and_changes_the_run(data: DeviceData) -> None:
    options = replace(FAST, max_epochs=3, schedule="cosine", warmup_epochs=1, weight_decay=0.01,
                      class_weights="balanced", augment=True)
    runs = [train_trial(tiny_cnn(data.num_classes, seed=7), data, config, "cpu").history
            for config in (options, options, replace(FAST, max_epochs=3))]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_the_recipe_keys_are_study_file_keys_and_round_trip() -> None:
    from nas3d.config import ConfigError, default_study_config
    from nas3d.train import RECIPES

    config = default_study_config("adrenalmnist3d").with_overrides(
        {"train.recipe": "small3d", "train.augment": "false", "train.weight_decay": "0"})
    assert config.train.options == replace(RECIPES["small3d"], augment=False, weight_decay=0.0)
    stored = config.to_dict()["train"]  # as the study records it: the name and the explicit keys
    assert (stored["recipe"], stored["augment"], stored["schedule"]) == ("small3d", False, None)
    assert type(config).from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"\[train\]: train.class_weights must be one of none, balanced"):
        config.with_overrides({"train.class_weights": "inverse"})

