"""A MedMNIST3D npz file, read by the ``medmnist`` dataset classes, and what both npz sources share.

Real datasets are read from ``{root}/{flag}.npz`` (28³) or ``{root}/{flag}_64.npz``. medmnist itself
checks md5 only inside ``download``, and reports every failure as a multi-line ``RuntimeError`` (or a
raw numpy/zipfile error for a damaged file). Here a missing file is a :class:`DatasetUnavailable` and
a damaged one a :class:`DatasetCorrupt`, each with a one-line message that says what to do.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import medmnist
import numpy as np
import torch
from medmnist.info import INFO

from nas3d.data.errors import DatasetCorrupt, DatasetUnavailable
from nas3d.data.preprocessing import Preprocessing
from nas3d.data.splits import SPLITS, DeviceData, Selection, Split
from nas3d.util import one_line

#: The MedMNIST3D flags, derived from medmnist's own table.
DATASETS: tuple[str, ...] = tuple(flag for flag, info in INFO.items() if info["python_class"].endswith("3D"))
SIZES: tuple[int, ...] = tuple(medmnist.dataset.MedMNIST3D.available_sizes)
#: Seconds any one socket operation of a download may block: an unreachable network fails fast,
#: while a slow but live transfer keeps going.
DOWNLOAD_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class NpzSource:
    """Data in MedMNIST's npz format (``{split}_images`` uint8 ``(N, S, S, S)``, ``{split}_labels``
    ``(N, 1)``): what the MedMNIST and the synthetic source share. Both end in the same array checks
    and the same device tensors, so every code path above the file is the one real data takes."""

    size: int
    root: Path  # the folder the npz file lives in

    # each npz source defines these
    name: str
    num_classes: int
    in_channels: int
    task: str
    class_names: tuple[str, ...]
    file_name: str

    def ensure_file(self) -> Path:
        """The path of the npz file, fetched or written when it is missing."""
        raise NotImplementedError

    def _read(self, path: Path, splits: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError

    @property
    def preprocessing(self) -> Preprocessing:
        # MedMNIST volumes are uint8 divided by 255: the window [0, 255]
        return Preprocessing(self.size, self.in_channels, "window", (0.0, 255.0))

    def read_arrays(
        self, path: Path, splits: tuple[str, ...] = SPLITS
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{split: (images, labels)}`` from ``path``, checked (shape, dtype, label range)."""
        try:
            out = self._read(path, splits)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, ValueError) as exc:
            raise DatasetCorrupt(
                f"{path} is not a readable MedMNIST npz ({type(exc).__name__}: {one_line(exc)})"
            ) from None
        for split, (images, labels) in out.items():
            _check_split(path, split, images, labels, self.size, self.num_classes)
        return out

    def check(self) -> dict[str, object]:
        self.ensure_file()
        return {}

    def load(self, device: torch.device | str, selection: Selection) -> DeviceData:
        arrays = self.read_arrays(self.ensure_file(), selection.names)

        def take(split: str, keep: np.ndarray | None) -> Split:
            images, labels = arrays[split]
            if keep is not None:
                images, labels = images[keep], labels[keep]
            return Split.from_arrays(images, labels, task=self.task, device=device)

        splits = selection.pick(lambda split: arrays[split][1], take)
        return DeviceData(name=self.name, num_classes=self.num_classes, in_channels=self.in_channels,
                          size=self.size, train=splits["train"], val=splits["val"], test=splits.get("test"),
                          full_val=splits.get("full_val"))


@dataclass(frozen=True)
class MedMNISTFile(NpzSource):
    """A MedMNIST3D dataset: its flag's npz file, downloaded when missing and allowed."""

    download: bool = True

    @classmethod
    def of(cls, flag: str, size: int, root: Path, download: bool) -> MedMNISTFile:
        if size not in SIZES:
            raise ValueError(f"data.size must be one of {SIZES} for {flag}, but got {size!r}")
        info = INFO[flag]
        labels = info["label"]
        return cls(size=size, root=root, name=flag, num_classes=len(labels), in_channels=info["n_channels"],
                   task=info["task"], class_names=tuple(labels[str(i)] for i in range(len(labels))),
                   file_name=f"{flag}{'' if size == 28 else f'_{size}'}.npz", download=download)

    def ensure_file(self) -> Path:
        """The path of the npz file, downloaded when missing; md5-checked against medmnist's INFO,
        whether it was downloaded or already there."""
        path = self.root / self.file_name
        info = INFO[self.name]
        size_flag = "" if self.size == 28 else f"_{self.size}"
        url, md5 = info[f"url{size_flag}"], info[f"MD5{size_flag}"]
        if not path.exists():
            if not self.download:
                raise DatasetUnavailable(
                    f"{self.file_name} not found in {path.parent} and download is off; get it from {url} "
                    f"(md5 {md5}) and point --data-root at its folder, or allow download"
                )
            self._download(path, url)
        stat = path.stat()
        actual = _md5(str(path), stat.st_size, stat.st_mtime_ns)
        if actual != md5:
            raise DatasetCorrupt(
                f"{path} has md5 {actual}, not medmnist's {md5} (truncated or from another release?); "
                f"delete it and download again, or fetch {url}"
            )
        return path

    def _read(self, path: Path, splits: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        dataset_class = getattr(medmnist, INFO[self.name]["python_class"])
        out = {}
        for split in splits:
            ds = dataset_class(split=split, root=str(path.parent), size=self.size, download=False)
            out[split] = (ds.imgs, ds.labels)
        return out

    def _download(self, path: Path, url: str) -> None:
        """Fetch the file through medmnist's own download (torchvision's ``download_url``, md5-checked).

        Folders it creates for the file are removed again when the download fails: a mistyped
        ``--data-root`` leaves nothing behind."""
        created = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fetch(path, url)
        except BaseException:
            for folder in created:  # deepest first; only what we made, and only if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise

    def _fetch(self, path: Path, url: str) -> None:
        dataset_class = getattr(medmnist, INFO[self.name]["python_class"])
        # torchvision's urlopen has no timeout: without one a black-holed network hangs a worker for minutes.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            # Download into a private folder and move the file in whole, so a partial download or two
            # workers fetching at once never leave a half-written file under the real name.
            with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
                dataset_class(split="train", root=tmp, size=self.size, download=True)
                os.replace(Path(tmp) / self.file_name, path)
        except RuntimeError as exc:
            # medmnist wraps the real cause (URLError, md5 mismatch, ...) in a multi-line RuntimeError,
            # with a bare except that also swallows Ctrl-C.
            cause = exc.__context__ or exc
            if isinstance(cause, KeyboardInterrupt):
                raise cause from None
            raise DatasetUnavailable(
                f"could not download {self.file_name} from {url} into {path.parent} "
                f"({type(cause).__name__}: {one_line(cause)}); "
                "fetch it by hand and point --data-root at its folder"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)


@lru_cache(maxsize=32)
def _md5(path: str, _size: int, _mtime_ns: int) -> str:
    """md5 of a file, cached per (path, size, mtime) so a worker hashes each dataset once."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_split(
    path: Path, split: str, images: np.ndarray, labels: np.ndarray, size: int, num_classes: int
) -> None:
    """Reject arrays that are readable but not MedMNIST3D-shaped, before they reach a model."""
    problem = None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size,) * 3:
        problem = (
            f"{split}_images is {images.dtype} {images.shape}, expected uint8 (N, {size}, {size}, {size})"
        )
    elif labels.shape != (images.shape[0], 1) or not np.issubdtype(labels.dtype, np.integer):
        problem = f"{split}_labels is {labels.dtype} {labels.shape}, expected integer ({images.shape[0]}, 1)"
    elif labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        problem = (
            f"{split}_labels range over [{labels.min()}, {labels.max()}], expected [0, {num_classes - 1}]"
        )
    elif len(labels) == 0:
        problem = f"{split} split is empty"
    if problem:
        raise DatasetCorrupt(f"{path}: {problem}")
