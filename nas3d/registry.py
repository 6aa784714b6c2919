"""One registry of buildable models: searched nas3d architectures and the ResNet baselines.

A :class:`ModelRecipe` is a registry name plus that entry's arguments, as plain JSON data. It is what
a checkpoint stores beside the weights, what ``nas3d retrain`` trains and what the cost counter
measures, so none of them branches on "searched or baseline".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nas3d.architecture import Architecture
from nas3d.baselines import BASELINES, build_baseline
from nas3d.model import build_model
from nas3d.util import unknown_option_message

__all__ = ["MODELS", "NAS3D", "ModelRecipe"]

NAS3D = "nas3d"


def _build_nas3d(in_channels: int, num_classes: int, *, architecture: Mapping[str, Any]) -> nn.Module:
    return build_model(Architecture.from_dict(dict(architecture)), in_channels, num_classes)


def _baseline_builder(name: str) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int) -> nn.Module:
        return build_baseline(name, in_channels, num_classes)

    return build


#: name -> builder(in_channels, num_classes, **args). The baselines' names come from their table.
MODELS: dict[str, Callable[..., nn.Module]] = {
    NAS3D: _build_nas3d,
    **{name: _baseline_builder(name) for name in BASELINES},
}


@dataclass(frozen=True)
class ModelRecipe:
    """A registry ``name`` and its JSON ``args``; ``build`` gives a freshly initialised network."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(unknown_option_message("model", self.name, list(MODELS)))
        # A canonical, immutable copy: recipes are compared and hashed as data.
        object.__setattr__(self, "args", json.loads(json.dumps(dict(self.args))))
        if self.name == NAS3D:
            Architecture.from_dict(self.args.get("architecture", {}))  # validates

    @classmethod
    def of(cls, model: Architecture | str | ModelRecipe) -> ModelRecipe:
        """The recipe of an architecture, a baseline name, or a recipe."""
        if isinstance(model, ModelRecipe):
            return model
        if isinstance(model, Architecture):
            return cls(NAS3D, {"architecture": model.to_dict()})
        return cls(model)

    @property
    def architecture(self) -> Architecture | None:
        """The searched architecture, for a nas3d recipe."""
        return Architecture.from_dict(self.args["architecture"]) if self.name == NAS3D else None

    def build(self, in_channels: int = 1, num_classes: int = 2) -> nn.Module:
        return MODELS[self.name](in_channels, num_classes, **self.args)

    def describe(self) -> str:
        """A short label: the architecture string, or the baseline's name."""
        arch = self.architecture
        return arch.short_str() if arch is not None else self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": dict(self.args)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRecipe:
        if not isinstance(data, Mapping) or "name" not in data:
            raise ValueError(f"a model recipe is {{'name': ..., 'args': {{...}}}}, but got {data!r}")
        return cls(data["name"], data.get("args") or {})
