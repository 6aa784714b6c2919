"""Splits held on a device, what a model needs to know of them, and which share of them a search keeps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """One split held on a device: images ``(N, C, D, H, W)`` and int64 labels ``(N,)``.

    MedMNIST images stay uint8 (a quarter of the memory) and become float in [0, 1] one batch at a
    time. A manifest's images are float32, already normalised (``zscore`` is not bounded, and
    quantising to 8 bits would lose what a CT's range holds), and are batched as they are.
    """

    images: torch.Tensor
    labels: torch.Tensor
    task: str

    @classmethod
    def from_arrays(
        cls, images: np.ndarray, labels: np.ndarray, *, task: str, device: torch.device | str
    ) -> Split:
        """Move MedMNIST arrays (images ``(N, D, H, W)`` uint8, labels ``(N, 1)``) to ``device``."""
        x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
        y = torch.from_numpy(np.asarray(labels).reshape(-1).astype(np.int64))
        return cls(x.to(device), y.to(device), task)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __repr__(self) -> str:
        return f"Split({tuple(self.images.shape)}, {self.images.device}, {self.task!r})"

    def batch(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels of the samples at ``index`` (a device tensor or a slice)."""
        images = self.images[index]
        if images.dtype != torch.uint8:  # a manifest's volumes, normalised when they were prepared
            return images.float(), self.labels[index]
        # Same scaling as medmnist's MedMNIST3D.__getitem__ (img / 255.0), done on the device.
        return images.float().div_(255.0), self.labels[index]

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Index tensors covering the split once: in order, or shuffled by ``generator`` (a CPU generator)."""
        n = len(self)
        if generator is None:
            order = torch.arange(n, device=self.labels.device)
        else:
            order = torch.randperm(n, generator=generator).to(self.labels.device)
        return iter(order.split(batch_size))


@dataclass(frozen=True)
class DataShape:
    """What a model needs to know of a dataset to be built and costed, without its samples."""

    in_channels: int
    num_classes: int
    size: int


@dataclass(frozen=True)
class DeviceData:
    """A dataset's splits on one device plus what a model needs to know about it."""

    name: str
    num_classes: int
    in_channels: int
    size: int
    train: Split
    val: Split
    test: Split | None  # not loaded for search: trials must never see it
    full_val: Split | None = None  # the whole val split beside a search share (record_full_val)

    @property
    def task(self) -> str:
        return self.train.task

    @property
    def shape(self) -> DataShape:
        return DataShape(in_channels=self.in_channels, num_classes=self.num_classes, size=self.size)


@dataclass(frozen=True)
class Selection:
    """Which samples of each split a load keeps: every split whole, or for a search train and val
    only, each cut to its stratified share (``fractions``, chosen by ``subset_seed``)."""

    for_search: bool
    fractions: dict[str, float]  # "train" and "val"
    subset_seed: int = 0
    record_full_val: bool = False  # keep the whole val split too, beside its share

    @property
    def names(self) -> tuple[str, ...]:
        return ("train", "val") if self.for_search else SPLITS

    def pick(self, labels: Callable[[str], np.ndarray],
             take: Callable[[str, np.ndarray | None], Split]) -> dict[str, Split]:
        """``{split: Split}`` (and ``"full_val"`` when recorded): ``take(split, keep)`` puts the samples
        at indices ``keep`` of ``split`` (``None``: all of them) on the device; ``labels(split)`` are
        that split's labels, from which the share is drawn."""
        out: dict[str, Split] = {}
        for index, split in enumerate(self.names):
            fraction = self.fractions[split] if self.for_search else 1.0
            if split == "val" and self.record_full_val and fraction < 1.0:
                out["full_val"] = take(split, None)
            keep = None
            if fraction < 1.0:
                keep = stratified_subset(labels(split), fraction, seed=(self.subset_seed, index))
            out[split] = take(split, keep)
        return out


def stratified_subset(labels: np.ndarray, fraction: float, *, seed: int | tuple[int, ...]) -> np.ndarray:
    """Sorted indices of a ``fraction`` of each class (at least one), the same for the same seed.

    Stratified so a small validation subset still holds every class: AUC is undefined for a missing one.
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    keep = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        count = max(1, int(fraction * len(members) + 0.5))  # half up, not Python's half-to-even
        keep.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(keep))
