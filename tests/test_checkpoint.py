"""A checkpoint loads only when its weights, recorded costs and identity are those of its recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nas3d.architecture import Architecture
from nas3d.checkpoint import load_checkpoint, save_checkpoint
from nas3d.costs import measure_costs
from nas3d.model import build_model

RELU = Architecture(("relu_conv3",), ((0, 1), (1, 2)), 1, 1, 8)


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "relu.pt"
    metrics = {"val_auc": 0.9, "flops": measure_costs(RELU, 1, 2, 12, with_thop=False).flops}
    save_checkpoint(path, build_model(RELU), RELU, in_channels=1, num_classes=2, input_size=12,
                    metadata={"study": "s", "trial": 3, "metrics": metrics})
    return path


def _edited(path: Path, edit) -> Path:
    raw = torch.load(path, weights_only=True)
    edit(raw)
    torch.save(raw, path)
    return path


def test_an_intact_checkpoint_loads_and_records_its_identity(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(_saved(tmp_path))
    assert checkpoint.metadata["arch_hash"] == RELU.arch_hash()
    assert checkpoint.metadata["params"] == sum(p.numel() for p in build_model(RELU).parameters())


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        # same weight shapes and FLOPs (mish_conv3 differs from relu_conv3 only in its activation)
        (lambda raw: raw["model"]["args"].update(architecture=Architecture(
            ("mish_conv3",), ((0, 1), (1, 2)), 1, 1, 8).to_dict()), "records arch_hash"),
        # another architecture: other weights
        (lambda raw: raw["model"]["args"].update(architecture=Architecture(
            ("relu_conv3",), ((0, 1), (1, 2)), 1, 1, 16).to_dict()), "weights of another shape"),
        (lambda raw: raw["state_dict"].pop("classifier.bias"), "missing weights classifier.bias"),
        (lambda raw: raw["state_dict"].update(extra=torch.zeros(1)), "unexpected weights extra"),
        (lambda raw: raw["metadata"]["metrics"].update(flops=123), "it records 123 FLOPs"),
        (lambda raw: raw["metadata"].update(params=7), "it records 7 parameters"),
    ],
    ids=["swapped-same-shapes", "swapped-other-shapes", "missing", "unexpected", "flops", "params"],
)
def test_a_checkpoint_that_does_not_match_its_recipe_is_refused(tmp_path: Path, edit, expected: str) -> None:
    path = _edited(_saved(tmp_path), edit)
    with pytest.raises(ValueError, match="does not match the file") as info:
        load_checkpoint(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("recorded", "expected"), [(None, 0.5), (0.27, 0.27), (True, 0.5), ("0.3", 0.5)],
                         ids=["none (older files)", "recorded", "a bool", "text"])
def test_the_threshold_is_the_recorded_number_else_medmnists(tmp_path: Path, recorded, expected) -> None:
    def edit(raw: dict) -> None:
        if recorded is not None:
            raw["metadata"]["threshold"] = recorded

    checkpoint = load_checkpoint(_edited(_saved(tmp_path), edit))
    assert checkpoint.threshold == expected and checkpoint.binary
