"""ResNet baselines for MedMNIST3D, and the published numbers they are compared with.

The baselines are 3D ResNet-18 (BasicBlock, [2, 2, 2, 2]) and ResNet-50 (Bottleneck, [3, 4, 6, 3]),
stage widths 64-128-256-512, BatchNorm3d, global average pool and a linear classifier. The stem is
the CIFAR-style adaptation for small inputs: one 3x3x3 stride-1 convolution and **no** max-pool, so a
28³ volume is only downsampled by the three strided stages (28 → 14 → 7 → 4). The ImageNet stem
(7x7 stride 2 plus max-pool) would leave a 28³ input at 7³ before the first stage. Strided
bottlenecks put the stride on the 3x3x3 convolution ("ResNet v1.5"); a shortcut whose shape changes
is a 1x1x1 strided convolution plus BatchNorm3d.

They are built, costed and checkpointed through :mod:`nas3d.registry`, like searched architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nas3d.util import unknown_option_message

__all__ = [
    "BASELINES",
    "PUBLISHED",
    "PUBLISHED_MODELS",
    "SEED_STUDY_MEAN",
    "ResNet3d",
    "build_baseline",
]

STAGE_WIDTHS = (64, 128, 256, 512)


def _conv3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False)


class _Shortcut(nn.Sequential):
    """1x1x1 strided projection for a residual whose channels or size change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(_conv1(in_channels, out_channels, stride), nn.BatchNorm3d(out_channels))


class BasicBlock3d(nn.Module):
    """Two 3x3x3 convolutions and a residual (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1, self.bn1 = _conv3(in_channels, width, stride), nn.BatchNorm3d(width)
        self.conv2, self.bn2 = _conv3(width, out_channels), nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = _Shortcut(in_channels, out_channels, stride) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck3d(nn.Module):
    """1x1x1 reduce, 3x3x3 (carrying the stride), 1x1x1 expand by 4, and a residual (ResNet-50)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1, self.bn1 = _conv1(in_channels, width), nn.BatchNorm3d(width)
        self.conv2, self.bn2 = _conv3(width, width, stride), nn.BatchNorm3d(width)
        self.conv3, self.bn3 = _conv1(width, out_channels), nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = _Shortcut(in_channels, out_channels, stride) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


Block = type[BasicBlock3d] | type[Bottleneck3d]


@dataclass(frozen=True)
class _Recipe:
    block: Block
    blocks_per_stage: tuple[int, int, int, int]


#: The baselines by name; the CLI's choices and error messages derive from this table.
BASELINES: dict[str, _Recipe] = {
    "resnet18": _Recipe(BasicBlock3d, (2, 2, 2, 2)),
    "resnet50": _Recipe(Bottleneck3d, (3, 4, 6, 3)),
}


class ResNet3d(nn.Module):
    """A 3D ResNet with the small-input stem. ``forward``: ``(N, C, D, H, W)`` → ``(N, num_classes)``."""

    def __init__(
        self, name: str, block: Block, blocks_per_stage: tuple[int, ...], in_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2:
            raise ValueError(
                f"in_channels >= 1 and num_classes >= 2 must hold, but got "
                f"(in_channels={in_channels}, num_classes={num_classes})"
            )
        self.name = name
        self.stem = nn.Sequential(
            _conv3(in_channels, STAGE_WIDTHS[0]), nn.BatchNorm3d(STAGE_WIDTHS[0]), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        channels = STAGE_WIDTHS[0]
        for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage, strict=True)):
            layers = []
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1  # the first stage keeps the input size
                layers.append(block(channels, width, stride))
                channels = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


def build_baseline(name: str, in_channels: int = 1, num_classes: int = 2) -> ResNet3d:
    """The baseline ``name`` (a key of :data:`BASELINES`), freshly initialised."""
    try:
        recipe = BASELINES[name]
    except KeyError:
        raise ValueError(unknown_option_message("baseline", name, list(BASELINES))) from None
    return ResNet3d(name, recipe.block, recipe.blocks_per_stage, in_channels, num_classes)


# --- published numbers ----------------------------------------------------------------------------

#: Display names of the published models, in table order.
PUBLISHED_MODELS = ("ResNet-18+3D", "ResNet-50+3D", "auto-sklearn", "AutoKeras")

#: MedMNIST v2 benchmark, test (AUC, ACC) at 28³ (Yang et al., Scientific Data 2023, Table 4),
#: by model and dataset flag.
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {
    "ResNet-18+3D": {
        "organmnist3d": (0.996, 0.907), "nodulemnist3d": (0.863, 0.844), "fracturemnist3d": (0.712, 0.508),
        "adrenalmnist3d": (0.827, 0.721), "vesselmnist3d": (0.874, 0.877), "synapsemnist3d": (0.820, 0.745),
    },
    "ResNet-50+3D": {
        "organmnist3d": (0.994, 0.883), "nodulemnist3d": (0.875, 0.847), "fracturemnist3d": (0.725, 0.494),
        "adrenalmnist3d": (0.828, 0.745), "vesselmnist3d": (0.907, 0.918), "synapsemnist3d": (0.851, 0.795),
    },
    "auto-sklearn": {
        "organmnist3d": (0.977, 0.814), "nodulemnist3d": (0.914, 0.874), "fracturemnist3d": (0.628, 0.453),
        "adrenalmnist3d": (0.828, 0.802), "vesselmnist3d": (0.910, 0.915), "synapsemnist3d": (0.631, 0.730),
    },
    "AutoKeras": {
        "organmnist3d": (0.979, 0.804), "nodulemnist3d": (0.844, 0.834), "fracturemnist3d": (0.642, 0.458),
        "adrenalmnist3d": (0.804, 0.705), "vesselmnist3d": (0.773, 0.894), "synapsemnist3d": (0.538, 0.724),
    },
}

#: Which published row a retrained baseline reproduces.
PUBLISHED_NAME_OF_BASELINE = {"resnet18": "ResNet-18+3D", "resnet50": "ResNet-50+3D"}

#: The seed study's (PBC-NAS extension) six-dataset mean test (AUC, ACC) of its best models.
SEED_STUDY_MEAN: tuple[float, float] = (0.915, 0.847)
