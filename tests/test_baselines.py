"""ResNet baselines: shapes at the MedMNIST sizes, exact cost counts, checkpoints, published numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nas3d.baselines import (
    BASELINES,
    PUBLISHED,
    PUBLISHED_MODELS,
    SEED_STUDY_MEAN,
    build_baseline,
)
from nas3d.checkpoint import load_checkpoint, save_checkpoint
from nas3d.costs import measure_costs
from nas3d.data import DATASETS


def baseline_costs(name: str, in_channels: int, num_classes: int, size: int) -> tuple[int, int]:
    costs = measure_costs(name, in_channels, num_classes, size, with_thop=False)
    return costs.flops, costs.params


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("name", list(BASELINES))
def test_forward_at_medmnist_sizes_on_the_meta_device(name: str, size: int) -> None:
    with torch.device("meta"):
        model = build_baseline(name, in_channels=1, num_classes=11).eval()
        out = model(torch.empty(2, 1, size, size, size))
    assert out.shape == (2, 11)


@pytest.mark.parametrize("name", list(BASELINES))
def test_forward_and_backward_on_a_tiny_real_volume(name: str) -> None:
    torch.manual_seed(0)
    model = build_baseline(name, in_channels=1, num_classes=3)
    out = model(torch.rand(2, 1, 4, 4, 4))  # 4 -> 2 -> 1 -> 1: the strided stages still fit
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.stem[0].weight.grad is not None


def _conv(c_in: int, c_out: int, k: int, out_size: int) -> int:
    return 2 * c_in * c_out * k**3 * out_size**3


def test_resnet18_flops_and_params_match_a_hand_count() -> None:
    # Stem at 28^3, then stages at 28, 14, 7, 4 (3x3x3 stride 2 padding 1: 7 -> 4); each strided
    # stage's first block has a 1x1x1 strided shortcut. FLOPs = 2 x MACs of convolutions and the
    # classifier, as FlopCounterMode counts them (no bias: the convs have none).
    classes, sizes, widths = 11, (28, 14, 7, 4), (64, 128, 256, 512)
    flops = _conv(1, 64, 3, 28)
    params = 1 * 64 * 27 + 2 * 64  # stem conv + BatchNorm3d
    channels = 64
    for stage, (width, size) in enumerate(zip(widths, sizes, strict=True)):
        for block in range(2):
            flops += _conv(channels, width, 3, size) + _conv(width, width, 3, size)
            params += (channels * width + width * width) * 27 + 2 * (2 * width)
            if stage > 0 and block == 0:
                flops += _conv(channels, width, 1, size)
                params += channels * width + 2 * width
            channels = width
    flops += 2 * 512 * classes
    params += 512 * classes + classes
    assert baseline_costs("resnet18", 1, classes, 28) == (flops, params)


def test_resnet50_is_bigger_than_resnet18_and_flops_grow_with_the_volume() -> None:
    flops18, params18 = baseline_costs("resnet18", 1, 2, 28)
    flops50, params50 = baseline_costs("resnet50", 1, 2, 28)
    assert flops50 > flops18 and params50 > params18
    assert baseline_costs("resnet50", 1, 2, 64)[1] == params50  # params do not depend on the size
    assert baseline_costs("resnet50", 1, 2, 64)[0] > 8 * flops50  # (64/28)^3 = 11.9; the head is fixed


def test_unknown_baseline_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown baseline 'resnet5'\. Did you mean 'resnet50'\?.*resnet18"):
        build_baseline("resnet5", 1, 2)


def test_baseline_checkpoint_loads_with_weights_only_and_reproduces_predictions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_baseline("resnet18", 1, 2).eval()
    x = torch.rand(3, 1, 4, 4, 4)
    expected = model(x)
    path = save_checkpoint(tmp_path / "r18.pt", model, "resnet18", in_channels=1, num_classes=2, input_size=4,
                           metadata={"seed": 0})
    raw = torch.load(path, weights_only=True)
    assert raw["model"] == {"name": "resnet18", "args": {}} and raw["metadata"]["seed"] == 0
    loaded = load_checkpoint(path)
    shapes = (loaded.in_channels, loaded.num_classes, loaded.input_size)
    assert loaded.recipe.name == "resnet18" and shapes == (1, 2, 4)
    assert loaded.architecture is None
    torch.testing.assert_close(loaded.build()(x), expected, rtol=0, atol=0)


def test_a_baseline_checkpoint_of_the_first_format_still_loads(tmp_path: Path) -> None:
    # The layout nas3d 0.1 wrote for baselines ("nas3d-baseline/1"): the name was the recipe.
    torch.manual_seed(0)
    model = build_baseline("resnet18", 1, 2).eval()
    x = torch.rand(2, 1, 4, 4, 4)
    torch.save({"format": "nas3d-baseline/1", "baseline": "resnet18", "in_channels": 1, "num_classes": 2,
                "input_size": 4, "state_dict": model.state_dict(), "metadata": {}}, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded.recipe.name == "resnet18"
    torch.testing.assert_close(loaded.build()(x), model(x), rtol=0, atol=0)


def test_a_checkpoint_missing_its_recipe_is_refused_in_one_line(tmp_path: Path) -> None:
    torch.save({"format": "nas3d-checkpoint/1"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"x\.pt is not a nas3d checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


def test_published_table_covers_every_model_and_dataset() -> None:
    assert list(PUBLISHED) == list(PUBLISHED_MODELS)
    for model, by_dataset in PUBLISHED.items():
        assert set(by_dataset) == set(DATASETS), model
        assert all(0.5 < auc <= 1 and 0.4 < acc <= 1 for auc, acc in by_dataset.values())
    assert PUBLISHED["ResNet-18+3D"]["organmnist3d"] == (0.996, 0.907)
    assert PUBLISHED["ResNet-50+3D"]["vesselmnist3d"] == (0.907, 0.918)
    assert PUBLISHED["AutoKeras"]["synapsemnist3d"] == (0.538, 0.724)
    assert SEED_STUDY_MEAN == (0.915, 0.847)
