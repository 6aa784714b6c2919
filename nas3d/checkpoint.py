"""Self-contained checkpoints: weights plus the recipe to rebuild the model, never a pickled module.

A checkpoint is a plain ``torch.save`` of a dict of tensors, strings and numbers, so it loads with
``torch.load(weights_only=True)``; a fresh process with only nas3d installed rebuilds the network
from the recipe (:class:`nas3d.registry.ModelRecipe`) stored beside the weights. Searched
architectures and baselines share this one format; files written before it (``nas3d-checkpoint/1``,
``nas3d-baseline/1``) still load.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas3d.architecture import Architecture
from nas3d.data import DATASETS, DataConfig, Preprocessing
from nas3d.registry import NAS3D, ModelRecipe
from nas3d.util import atomic_write, one_line

__all__ = ["FORMAT", "Checkpoint", "checkpoint_data", "load_checkpoint", "save_checkpoint"]

FORMAT = "nas3d-checkpoint/2"
# Earlier formats, read by their recipe key: a searched architecture, or a baseline by name.
_FORMAT_1 = "nas3d-checkpoint/1"
_BASELINE_FORMAT_1 = "nas3d-baseline/1"


@dataclass(frozen=True)
class Checkpoint:
    recipe: ModelRecipe
    in_channels: int
    num_classes: int
    input_size: int
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]  # metrics, study/trial identity, dataset, package version

    @property
    def architecture(self) -> Architecture | None:
        """The searched architecture, or None for a baseline."""
        return self.recipe.architecture

    @property
    def data_config(self) -> DataConfig | None:
        """The data the model was trained on, as recorded (None where a file records none)."""
        recorded = self.metadata.get("data")
        try:
            if isinstance(recorded, dict):
                return DataConfig(**recorded)
            if self.metadata.get("dataset") in DATASETS:  # older files: the flag only
                return DataConfig(dataset=self.metadata["dataset"], size=self.input_size)
        except (TypeError, ValueError):  # written by another version: fall back to the numbers
            return None
        return None

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in output order: as recorded, else from the data config (medmnist's INFO labels
        for a MedMNIST model), else "0", "1", ..."""
        names = self.metadata.get("classes")
        if not names and self.data_config is not None:
            names = self.data_config.class_names
        if not names or len(names) != self.num_classes:
            names = [str(i) for i in range(self.num_classes)]
        return tuple(str(n) for n in names)

    @property
    def preprocessing(self) -> Preprocessing:
        """How a volume becomes this model's input, as in training (see :class:`nas3d.data.Preprocessing`).
        Files without the record were trained on MedMNIST-style data: uint8 / 255 at the input size."""
        recorded = self.metadata.get("preprocessing")
        if isinstance(recorded, dict):
            return dataclasses.replace(Preprocessing.from_dict(recorded), channels=self.in_channels)
        data = self.data_config
        if data is not None and data.resolved:
            return dataclasses.replace(data.preprocessing, channels=self.in_channels)
        return Preprocessing(self.input_size, self.in_channels, "window", (0.0, 255.0))

    @property
    def threshold(self) -> float:
        """A binary model's decision threshold (a sample is positive when its score is above it), as
        ``nas3d retrain`` chose it on validation; 0.5 (MedMNIST's) where the file records none."""
        recorded = self.metadata.get("threshold")
        number = isinstance(recorded, int | float) and not isinstance(recorded, bool)
        return float(recorded) if number else 0.5

    @property
    def best_fold(self) -> int | None:
        """For a cross-validated trial's checkpoint (``data.cv_folds`` > 1): the fold (0-based) whose model
        it holds, the one with the best val AUC (``metadata["fold"]`` has every fold's); None otherwise."""
        fold = self.metadata.get("fold")
        return int(fold["best"]) if isinstance(fold, dict) and "best" in fold else None

    @property
    def binary(self) -> bool:
        """Whether the model scores two classes (a thresholded positive class)."""
        return self.num_classes == 2

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        """The network with these weights loaded, in eval mode."""
        model = self.recipe.build(self.in_channels, self.num_classes)
        model.load_state_dict(self.state_dict)  # strict: a missing or extra key is an error
        return model.to(device).eval()


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    recipe: ModelRecipe | Architecture | str,
    *,
    in_channels: int,
    num_classes: int,
    input_size: int,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights (on the CPU) and ``recipe`` to ``path``, atomically."""
    from nas3d import __version__

    data = {
        "format": FORMAT,
        "model": ModelRecipe.of(recipe).to_dict(),
        "in_channels": in_channels,
        "num_classes": num_classes,
        "input_size": input_size,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        # identity and size of the model, checked against the recipe on every load
        "metadata": {"nas3d_version": __version__, **_identity(ModelRecipe.of(recipe)),
                     "params": sum(p.numel() for p in model.parameters()), **(metadata or {})},
    }
    return atomic_write(path, lambda file: torch.save(data, file))


def checkpoint_data(data: DataConfig) -> dict[str, Any]:
    """What a checkpoint records of its data: the config (``nas3d retrain`` loads it again), and the
    class names and preprocessing (``nas3d predict`` and ONNX users repeat them)."""
    return {"data": dataclasses.asdict(data), "classes": list(data.class_names),
            "preprocessing": data.preprocessing.to_dict()}


def _identity(recipe: ModelRecipe) -> dict[str, str]:
    """What names the model: the architecture's hash (equal for isomorphic cells), or the registry name."""
    arch = recipe.architecture
    return {"arch_hash": arch.arch_hash()} if arch is not None else {"model_name": recipe.name}


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a nas3d checkpoint safely (``weights_only=True``); a one-line ``ValueError`` for a file
    that is not one."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; export one with `nas3d export`")
    foreign = _foreign_kind(path)
    if foreign:
        raise ValueError(f"{path} is {foreign}, not a nas3d checkpoint; give the .pt file that "
                         "`nas3d export` or `nas3d retrain` wrote")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's own message advises weights_only=False, i.e. running code from the file: never that.
        raise ValueError(f"{path} is a PyTorch file holding Python objects (a pickled model?), not a nas3d "
                         "checkpoint, which holds tensors and numbers only; give the .pt file that "
                         "`nas3d export` or `nas3d retrain` wrote") from None
    except Exception as e:  # a truncated or damaged file: say which, in one line
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {one_line(e, 200)})"
        ) from None
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    try:
        if found == FORMAT:
            recipe = ModelRecipe.from_dict(data["model"])
        elif found == _FORMAT_1:
            recipe = ModelRecipe(NAS3D, {"architecture": data["architecture"]})
        elif found == _BASELINE_FORMAT_1:
            recipe = ModelRecipe(data["baseline"])
        else:
            raise ValueError(f"format {found!r}, expected {FORMAT!r}")
        checkpoint = Checkpoint(
            recipe=recipe,
            in_channels=data["in_channels"],
            num_classes=data["num_classes"],
            input_size=data["input_size"],
            state_dict=data["state_dict"],
            metadata=data["metadata"],
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a nas3d checkpoint ({one_line(e, 200)})") from None
    # Files of the first formats predate the cost and identity records: their weights are checked only.
    problem = _mismatch(checkpoint, costs=found == FORMAT)
    if problem:
        raise ValueError(f"{path}: the recorded model ({recipe.describe()}) does not match the file: "
                         f"{problem}; refusing it (export or retrain it again)")
    return checkpoint


def _foreign_kind(path: Path) -> str | None:
    """What a file that is surely no PyTorch checkpoint is ("an ONNX model", ...), or None. PyTorch writes
    a zip archive (an old format: a pickle stream); anything else is refused before ``torch.load``."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    # An ONNX ModelProto opens with field 1 (ir_version, a small varint), then a string or the graph.
    if path.suffix.lower() == ".onnx" or (len(head) > 2 and head[0] == 0x08 and head[1] < 0x80
                                          and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x3A, 0x42)):
        return "an ONNX model (run it with onnxruntime, docs/own-data.md)"
    if not head:
        return "empty"
    return "not a PyTorch file"


def _mismatch(checkpoint: Checkpoint, *, costs: bool = True) -> str | None:
    """Why the weights, recorded costs or identity are not those of the recipe's model, or None.

    The model is rebuilt on the meta device (no memory, no compute) and the weights are loaded into it
    strictly: every key present, none extra, every shape equal. A recipe swapped for another with the
    same weight shapes (relu_conv3 for mish_conv3) passes that, so (``costs``) the recorded identity,
    parameter count and FLOPs are compared as well.
    """
    from nas3d.costs import count_flops

    metadata = checkpoint.metadata
    with torch.device("meta"):
        model = checkpoint.recipe.build(checkpoint.in_channels, checkpoint.num_classes).eval()
    expected, given = model.state_dict(), checkpoint.state_dict
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    shapes = [k for k in expected.keys() & given.keys() if tuple(expected[k].shape) != tuple(given[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing weights", missing), ("unexpected weights", unexpected),
                                     ("weights of another shape", sorted(shapes))) if keys]
        return "; ".join(parts)
    with warnings.catch_warnings():  # copying into meta tensors is a no-op, which is all a check needs
        warnings.filterwarnings("ignore", "for .*: copying from a non-meta parameter", UserWarning)
        model.load_state_dict(given, strict=True)  # as Checkpoint.build does; raises on any other mismatch
    if not costs:
        return None
    for key, value in _identity(checkpoint.recipe).items():
        if key in metadata and metadata[key] != value:
            return f"it records {key} {metadata[key]!r}, the recorded model has {value!r}"
    params = sum(p.numel() for p in model.parameters())
    if "params" in metadata and metadata["params"] != params:
        return f"it records {metadata['params']} parameters, the recorded model has {params}"
    flops = (metadata.get("metrics") or {}).get("flops")
    if flops is not None:
        size = checkpoint.input_size
        counted = count_flops(model, (1, checkpoint.in_channels, size, size, size))
        if counted != flops:
            return f"it records {flops} FLOPs, the recorded model has {counted} at {size}^3"
    return None
