"""Synthetic data in MedMNIST's npz format: written once per shape, then read back from disk like a
real file, so tests and smoke studies take the path real data takes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nas3d.data.medmnist_file import NpzSource
from nas3d.util import atomic_write

SYNTHETIC = "synthetic"
SYNTHETIC_VERSION = 1  # bump when write_synthetic_npz changes what it writes


@dataclass(frozen=True)
class SyntheticFile(NpzSource):
    """Balls of a class-dependent radius (:func:`write_synthetic_npz`), written on first use."""

    samples: int = 256  # training samples; val and test get a quarter each

    @classmethod
    def of(cls, size: int, root: Path, classes: int, samples: int) -> SyntheticFile:
        if not 4 <= size <= 256:  # any size: tests and smoke studies use tiny volumes
            raise ValueError(f"data.size must be in [4, 256] for synthetic data, but got {size!r}")
        # The generator version is in the name so a changed generator never reuses an old file.
        file_name = f"synthetic_v{SYNTHETIC_VERSION}_{classes}c_{samples}n_{size}.npz"
        return cls(size=size, root=root, name=SYNTHETIC, num_classes=classes, in_channels=1,
                   task="binary-class" if classes == 2 else "multi-class",
                   class_names=tuple(str(i) for i in range(classes)), file_name=file_name, samples=samples)

    def ensure_file(self) -> Path:
        path = self.root / self.file_name
        if not path.exists():
            n_eval = self.samples // 4
            write_synthetic_npz(path, num_classes=self.num_classes, n_train=self.samples, n_val=n_eval,
                                n_test=n_eval, size=self.size, seed=0)
        return path

    def check(self) -> dict[str, object]:
        # no md5 to check a synthetic file against: read it whole, as the study will
        self.read_arrays(self.ensure_file())
        return {}

    def _read(self, path: Path, splits: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        with np.load(path) as npz:  # what medmnist's dataset classes do underneath
            return {split: (npz[f"{split}_images"], npz[f"{split}_labels"]) for split in splits}


def write_synthetic_npz(
    path: str | os.PathLike[str],
    *,
    num_classes: int,
    n_train: int,
    n_val: int,
    n_test: int,
    size: int,
    seed: int,
) -> Path:
    """Write a MedMNIST-format npz whose classes a small 3D CNN learns to tell apart, but not at once.

    Each volume holds one ball on a noisy background. The ball's radius grows with the class (±15 %
    jitter, so neighbouring classes overlap) and its brightness varies at random, so neither total
    intensity nor any single voxel gives the label away: a model has to measure the ball's extent.
    Labels cycle through the classes before shuffling, so every split of ≥ ``num_classes`` samples
    holds every class. Images are uint8 ``(N, size, size, size)``, labels uint8 ``(N, 1)``, as in
    medmnist's files. The file is written atomically, so concurrent writers of the same file are safe.
    """
    if not 2 <= num_classes <= 255:
        raise ValueError(f"num_classes must be in [2, 255], but got {num_classes!r}")
    if size < 4:
        raise ValueError(f"size must be at least 4, but got {size!r}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    radii = np.linspace(0.2, 0.32, num_classes) * size
    axis = np.arange(size, dtype=np.float32)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.uint8)
        radius = (radii[labels] * rng.uniform(0.85, 1.15, n)).astype(np.float32)
        centre = rng.uniform(0.3 * size, 0.7 * size, (n, 3)).astype(np.float32)
        bright = rng.uniform(90.0, 200.0, n).astype(np.float32)
        images = np.empty((n, size, size, size), np.uint8)
        for chunk in np.array_split(np.arange(n), max(1, n // 16)):  # bounded memory at 64³
            sq = (axis - centre[chunk, :, None]) ** 2  # (b, 3, size): squared distance along each axis
            dist2 = sq[:, 0, :, None, None] + sq[:, 1, None, :, None] + sq[:, 2, None, None, :]
            inside = dist2 <= radius[chunk, None, None, None] ** 2
            volume = np.where(inside, bright[chunk, None, None, None], 50.0)
            volume += rng.standard_normal(volume.shape, dtype=np.float32) * 40.0
            images[chunk] = np.clip(volume, 0, 255).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    # noise barely compresses; uncompressed writes 5× faster
    return atomic_write(path, lambda file: np.savez(file, **arrays))
