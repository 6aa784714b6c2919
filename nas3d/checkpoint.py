"""Self-contained checkpoints: weights plus the recipe to rebuild the model, never a pickled module.

A checkpoint is a plain ``torch.save`` of a dict of tensors, strings and numbers, so it loads with
``torch.load(weights_only=True)``; a fresh process with only nas3d installed rebuilds the network
from the architecture stored beside the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas3d.architecture import Architecture
from nas3d.model import Network, build_model

FORMAT = "nas3d-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    architecture: Architecture
    in_channels: int
    num_classes: int
    input_size: int
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]  # metrics, study/trial identity, dataset, package version

    def build(self, device: torch.device | str = "cpu") -> Network:
        """The network with these weights loaded, in eval mode."""
        model = build_model(self.architecture, self.in_channels, self.num_classes)
        model.load_state_dict(self.state_dict)  # strict: a missing or extra key is an error
        return model.to(device).eval()


def save_checkpoint(
    path: str | Path, model: Network, *, input_size: int, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights and recipe to ``path``."""
    recipe = {"architecture": model.arch.to_dict()}
    return write_checkpoint(path, FORMAT, recipe, model, input_size=input_size, metadata=metadata)


def write_checkpoint(
    path: str | Path,
    checkpoint_format: str,
    recipe: dict[str, Any],
    model: nn.Module,
    *,
    input_size: int,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """The layout every nas3d checkpoint shares: format, recipe, shapes, weights (on the CPU) and
    metadata. ``model`` has a ``stem`` whose first layer is a convolution and a ``classifier``."""
    from nas3d import __version__

    path = Path(path)
    torch.save(
        {
            "format": checkpoint_format,
            **recipe,
            "in_channels": model.stem[0].in_channels,
            "num_classes": model.classifier.out_features,
            "input_size": input_size,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "metadata": {"nas3d_version": __version__, **(metadata or {})},
        },
        path,
    )
    return path


def read_checkpoint(
    path: str | Path, formats: Sequence[str], what: str = "nas3d checkpoint"
) -> dict[str, Any]:
    """The dict a checkpoint holds, loaded safely (``weights_only=True``), if its format is one of
    ``formats``; otherwise a one-line ``ValueError`` naming the file and what it holds."""
    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    if found not in formats:
        expected = " or ".join(repr(f) for f in formats)
        raise ValueError(f"{path} is not a {what} (format {found!r}, expected {expected})")
    return data


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safely: ``weights_only=True``)."""
    data = read_checkpoint(path, (FORMAT,))
    return Checkpoint(
        architecture=Architecture.from_dict(data["architecture"]),
        in_channels=data["in_channels"],
        num_classes=data["num_classes"],
        input_size=data["input_size"],
        state_dict=data["state_dict"],
        metadata=data["metadata"],
    )
