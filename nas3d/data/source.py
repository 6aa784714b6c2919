"""What every kind of data answers: the protocol :class:`nas3d.data.DataConfig` dispatches to.

There are three sources, one module each: a MedMNIST npz file (``medmnist_file``), synthetic data
written in that npz format (``synthetic``), and a manifest, a labels CSV naming the user's NIfTI or
NumPy volumes (``manifest_source``). Code above ``nas3d.data`` never sees a source: it asks the
configuration (``cfg.task``, ``cfg.num_classes``, ...) and loads through :func:`nas3d.data.load_splits`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from nas3d.data.preprocessing import Preprocessing
from nas3d.data.splits import DeviceData, Selection


class DataSource(Protocol):
    """One kind of data, built from a :class:`~nas3d.data.DataConfig`'s fields."""

    @property
    def name(self) -> str:
        """A short name: the MedMNIST flag, "synthetic", or the manifest's file name without .csv."""
        ...

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in index order."""
        ...

    @property
    def task(self) -> str:
        """``"binary-class"`` or ``"multi-class"``, as in medmnist's INFO."""
        ...

    @property
    def num_classes(self) -> int: ...

    @property
    def in_channels(self) -> int: ...

    @property
    def preprocessing(self) -> Preprocessing:
        """How a volume becomes model input: what ``nas3d predict`` and ONNX users repeat."""
        ...

    @property
    def file_name(self) -> str:
        """The name of the file the data is read from (an npz, or the manifest's CSV)."""
        ...

    def check(self) -> dict[str, object]:
        """Check that the data is there and usable, before a study is created (a one-line
        :class:`~nas3d.data.DatasetUnavailable` or :class:`~nas3d.data.DatasetCorrupt` if not), and
        return the configuration fields to record that the check resolved (none for npz files)."""
        ...

    def load(self, device: torch.device | str, selection: Selection) -> DeviceData:
        """The samples ``selection`` keeps, on ``device``."""
        ...
