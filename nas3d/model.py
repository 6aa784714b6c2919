"""Build the 3D CNN an :class:`~nas3d.architecture.Architecture` describes (no Optuna here).

Network: stem -> ``stacks`` stacks of ``cells_per_stack`` identical cells -> global average pool ->
linear classifier. Channels double at every new stack, with a 2x max-pool between stacks.
"""

from __future__ import annotations

import torch
from torch import nn

from nas3d.architecture import Architecture
from nas3d.ops import build_op


class Cell(nn.Module):
    """One cell: a DAG of operations whose summed output is added to the (projected) cell input."""

    def __init__(self, arch: Architecture, in_channels: int, width: int) -> None:
        super().__init__()
        # A 1x1x1 projection only where the widths differ (the first cell of every later stack).
        self.project = nn.Conv3d(in_channels, width, 1, bias=False) if in_channels != width else None
        self.vertex_ops = nn.ModuleList(build_op(op, width) for op in arch.ops)
        # inputs[v - 1] lists the vertices summed into vertex v; the last entry is the output's.
        self.inputs = [arch.inputs_of(v) for v in range(1, arch.output_vertex + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.project is not None:
            x = self.project(x)
        values = [x]
        for op, sources in zip(self.vertex_ops, self.inputs, strict=False):
            values.append(op(_sum(values, sources)))
        return x + _sum(values, self.inputs[-1])


def _sum(values: list[torch.Tensor], sources: tuple[int, ...]) -> torch.Tensor:
    total = values[sources[0]]
    for source in sources[1:]:
        total = total + values[source]
    return total


class Network(nn.Module):
    """The searched network. ``forward`` maps ``(N, in_channels, D, H, W)`` to ``(N, num_classes)``."""

    def __init__(self, arch: Architecture, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2:
            raise ValueError(
                f"in_channels >= 1 and num_classes >= 2 must hold, but got "
                f"(in_channels={in_channels}, num_classes={num_classes})"
            )
        self.arch = arch
        width = arch.initial_filters
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        channels = width
        for stack, stack_width in enumerate(arch.stack_widths()):
            if stack > 0:
                layers.append(nn.MaxPool3d(2))
            for _ in range(arch.cells_per_stack):
                layers.append(Cell(arch, channels, stack_width))
                channels = stack_width
        self.cells = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cells(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


def build_model(arch: Architecture, in_channels: int = 1, num_classes: int = 2) -> Network:
    """The network for ``arch``; works for any cubic input size of at least ``2 ** (stacks - 1)``."""
    return Network(arch, in_channels, num_classes)
