"""Self-contained checkpoints: weights plus the recipe to rebuild the model, never a pickled module.

A checkpoint is a plain ``torch.save`` of a dict of tensors, strings and numbers, so it loads with
``torch.load(weights_only=True)``; a fresh process with only nas3d installed rebuilds the network
from the architecture stored beside the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
    from nas3d import __version__

    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {
            "format": FORMAT,
            "architecture": model.arch.to_dict(),
            "in_channels": model.stem[0].in_channels,
            "num_classes": model.classifier.out_features,
            "input_size": input_size,
            "state_dict": state,
            "metadata": {"nas3d_version": __version__, **(metadata or {})},
        },
        path,
    )
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safely: ``weights_only=True``)."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a nas3d checkpoint (format {found!r}, expected {FORMAT!r})")
    return Checkpoint(
        architecture=Architecture.from_dict(data["architecture"]),
        in_channels=data["in_channels"],
        num_classes=data["num_classes"],
        input_size=data["input_size"],
        state_dict=data["state_dict"],
        metadata=data["metadata"],
    )
