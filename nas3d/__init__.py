"""nas3d: multi-objective neural architecture search for 3D biomedical images on Optuna."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from nas3d.architecture import Architecture, InfeasibleArchitecture, prune_cell
from nas3d.space import SearchSpace, params_for, sample_architecture

try:
    __version__ = version("nas3d")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Architecture",
    "InfeasibleArchitecture",
    "SearchSpace",
    "__version__",
    "params_for",
    "prune_cell",
    "sample_architecture",
]
