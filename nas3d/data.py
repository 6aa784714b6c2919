"""MedMNIST3D data: the medmnist loaders, a synthetic npz writer, and splits held on the device.

Real datasets are read by the ``medmnist`` dataset classes from ``{root}/{flag}.npz`` (28³) or
``{root}/{flag}_64.npz``; synthetic data is written in exactly that npz format and read back from disk.
Both end in the same array checks and the same device tensors, so every code path above the file is
the one real data takes.

medmnist itself checks md5 only inside ``download``, and reports every failure as a multi-line
``RuntimeError`` (or a raw numpy/zipfile error for a damaged file). Here a missing file is a
:class:`DatasetUnavailable` and a damaged one a :class:`DatasetCorrupt`, each with a one-line message
that says what to do.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import medmnist
import numpy as np
import torch
from medmnist.info import DEFAULT_ROOT, INFO

from nas3d.util import atomic_write, one_line, unknown_option_message

SYNTHETIC = "synthetic"
SYNTHETIC_VERSION = 1  # bump when write_synthetic_npz changes what it writes
#: The MedMNIST3D flags, derived from medmnist's own table.
DATASETS: tuple[str, ...] = tuple(flag for flag, info in INFO.items() if info["python_class"].endswith("3D"))
SIZES: tuple[int, ...] = tuple(medmnist.dataset.MedMNIST3D.available_sizes)
SPLITS = ("train", "val", "test")
#: Seconds any one socket operation of a download may block: an unreachable network fails fast,
#: while a slow but live transfer keeps going.
DOWNLOAD_TIMEOUT_S = 15.0


class DatasetUnavailable(ValueError):
    """The dataset file is not on disk and could not be downloaded."""


class DatasetCorrupt(ValueError):
    """The dataset file exists but is not the MedMNIST file it should be."""


@dataclass(frozen=True)
class DataConfig:
    """Which data a study trains on."""

    dataset: str = "organmnist3d"  # a MedMNIST3D flag, or "synthetic"
    size: int = 28  # 28 or 64 (synthetic: any edge length from 4 to 256)
    root: str | None = None  # folder holding {flag}.npz / {flag}_{size}.npz; None = medmnist's default
    download: bool = True  # try medmnist's download when the file is missing
    search_fraction: float = 0.25  # deterministic share of train and val used during search
    subset_seed: int = 0
    # Also score every search epoch on the whole validation split (recorded in the learning curve,
    # never used to choose or stop): how benchmarks such as bench/arch_table.py see how well the
    # search share ranks architectures.
    record_full_val: bool = False
    # synthetic data only
    synthetic_classes: int = 2
    synthetic_samples: int = 256  # training samples; val and test get a quarter each

    def __post_init__(self) -> None:
        if self.dataset not in (*DATASETS, SYNTHETIC):
            raise ValueError(
                "data.dataset: " + unknown_option_message("dataset", self.dataset, (*DATASETS, SYNTHETIC))
            )
        if self.dataset == SYNTHETIC:
            if not 4 <= self.size <= 256:  # any size: tests and smoke studies use tiny volumes
                raise ValueError(f"data.size must be in [4, 256] for synthetic data, but got {self.size!r}")
        elif self.size not in SIZES:
            raise ValueError(f"data.size must be one of {SIZES} for {self.dataset}, but got {self.size!r}")
        if not 0.0 < self.search_fraction <= 1.0:
            raise ValueError(f"data.search_fraction must be in (0, 1], but got {self.search_fraction!r}")
        if not 2 <= self.synthetic_classes <= 255:
            raise ValueError(
                f"data.synthetic_classes must be in [2, 255], but got {self.synthetic_classes!r}"
            )
        if self.synthetic_samples < 4 * self.synthetic_classes:
            raise ValueError(
                "data.synthetic_samples must be at least 4 × synthetic_classes (so val and test hold every "
                f"class), but got {self.synthetic_samples!r} for {self.synthetic_classes} classes"
            )

    @property
    def data_root(self) -> Path:
        """The folder the npz file lives in."""
        return Path(self.root or DEFAULT_ROOT or "~/.medmnist").expanduser()

    @property
    def file_name(self) -> str:
        """The npz file name medmnist (or the synthetic writer) uses for this dataset and size."""
        if self.dataset == SYNTHETIC:
            # The generator version is in the name so a changed generator never reuses an old file.
            shape = f"{self.synthetic_classes}c_{self.synthetic_samples}n_{self.size}"
            return f"synthetic_v{SYNTHETIC_VERSION}_{shape}.npz"
        return f"{self.dataset}{'' if self.size == 28 else f'_{self.size}'}.npz"

    @property
    def task(self) -> str:
        """``"binary-class"`` or ``"multi-class"``, as in medmnist's INFO."""
        if self.dataset == SYNTHETIC:
            return "binary-class" if self.synthetic_classes == 2 else "multi-class"
        return INFO[self.dataset]["task"]

    @property
    def num_classes(self) -> int:
        if self.dataset == SYNTHETIC:
            return self.synthetic_classes
        return len(INFO[self.dataset]["label"])

    @property
    def in_channels(self) -> int:
        return 1 if self.dataset == SYNTHETIC else INFO[self.dataset]["n_channels"]


@dataclass(frozen=True)
class Split:
    """One split held on a device: uint8 images ``(N, C, D, H, W)`` and int64 labels ``(N,)``.

    Images stay uint8 (a quarter of the memory) and become float in [0, 1] one batch at a time.
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
        # Same scaling as medmnist's MedMNIST3D.__getitem__ (img / 255.0), done on the device.
        return self.images[index].float().div_(255.0), self.labels[index]

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Index tensors covering the split once: in order, or shuffled by ``generator`` (a CPU generator)."""
        n = len(self)
        if generator is None:
            order = torch.arange(n, device=self.labels.device)
        else:
            order = torch.randperm(n, generator=generator).to(self.labels.device)
        return iter(order.split(batch_size))


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
class DataShape:
    """What a model needs to know of a dataset to be built and costed, without its samples."""

    in_channels: int
    num_classes: int
    size: int


def load_splits(cfg: DataConfig, device: torch.device | str, *, for_search: bool) -> DeviceData:
    """Load ``cfg``'s dataset onto ``device``.

    With ``for_search`` only a deterministic ``search_fraction`` of train and of val is kept (stratified
    by class, at least one sample per class, chosen by ``subset_seed``) and test is not loaded.
    Raises :class:`DatasetUnavailable` or :class:`DatasetCorrupt` with a one-line reason.
    """
    path = ensure_file(cfg)
    arrays = read_arrays(cfg, path, ("train", "val") if for_search else SPLITS)
    splits: dict[str, Split] = {}
    for index, (split, (images, labels)) in enumerate(arrays.items()):
        if split == "val" and for_search and cfg.record_full_val and cfg.search_fraction < 1.0:
            splits["full_val"] = Split.from_arrays(images, labels, task=cfg.task, device=device)
        if for_search and cfg.search_fraction < 1.0:
            keep = stratified_subset(labels, cfg.search_fraction, seed=(cfg.subset_seed, index))
            images, labels = images[keep], labels[keep]
        splits[split] = Split.from_arrays(images, labels, task=cfg.task, device=device)
    return DeviceData(
        name=cfg.dataset,
        num_classes=cfg.num_classes,
        in_channels=cfg.in_channels,
        size=cfg.size,
        train=splits["train"],
        val=splits["val"],
        test=splits.get("test"),
        full_val=splits.get("full_val"),
    )


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


def ensure_file(cfg: DataConfig) -> Path:
    """The path of ``cfg``'s npz file, downloading (real) or writing (synthetic) it when missing.

    A real file is md5-checked against medmnist's INFO, whether it was downloaded or already there.
    """
    path = cfg.data_root / cfg.file_name
    if cfg.dataset == SYNTHETIC:
        if not path.exists():
            n_eval = cfg.synthetic_samples // 4
            write_synthetic_npz(
                path,
                num_classes=cfg.synthetic_classes,
                n_train=cfg.synthetic_samples,
                n_val=n_eval,
                n_test=n_eval,
                size=cfg.size,
                seed=0,
            )
        return path

    info = INFO[cfg.dataset]
    size_flag = "" if cfg.size == 28 else f"_{cfg.size}"
    url, md5 = info[f"url{size_flag}"], info[f"MD5{size_flag}"]
    if not path.exists():
        if not cfg.download:
            raise DatasetUnavailable(
                f"{cfg.file_name} not found in {path.parent} and download is off; get it from {url} "
                f"(md5 {md5}) and point --data-root at its folder, or allow download"
            )
        _download(cfg, path, url)
    actual = _md5(str(path), *_stat_key(path))
    if actual != md5:
        raise DatasetCorrupt(
            f"{path} has md5 {actual}, not medmnist's {md5} (truncated or from another release?); "
            f"delete it and download again, or fetch {url}"
        )
    return path


def check_data(cfg: DataConfig) -> Path:
    """:func:`ensure_file`, and for synthetic data (which has no md5 to check) a read of the whole
    file as ``cfg`` says it is; the path. What a study checks before it is created: a damaged file
    fails here, in one line, rather than in every worker's first trial."""
    path = ensure_file(cfg)
    if cfg.dataset == SYNTHETIC:  # a real file passed medmnist's md5 in ensure_file
        read_arrays(cfg, path)
    return path


def read_arrays(
    cfg: DataConfig, path: Path, splits: tuple[str, ...] = SPLITS
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images, labels)}`` from ``path``, checked against ``cfg`` (shape, dtype, label range).

    Real datasets are read by medmnist's dataset class for the flag; synthetic ones by ``np.load``,
    which is what that class does underneath.
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        if cfg.dataset == SYNTHETIC:
            with np.load(path) as npz:
                for split in splits:
                    out[split] = (npz[f"{split}_images"], npz[f"{split}_labels"])
        else:
            dataset_class = getattr(medmnist, INFO[cfg.dataset]["python_class"])
            for split in splits:
                ds = dataset_class(split=split, root=str(path.parent), size=cfg.size, download=False)
                out[split] = (ds.imgs, ds.labels)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, ValueError) as exc:
        raise DatasetCorrupt(
            f"{path} is not a readable MedMNIST npz ({type(exc).__name__}: {one_line(exc)})"
        ) from None
    for split, (images, labels) in out.items():
        _check_split(path, split, images, labels, cfg.size, cfg.num_classes)
    return out


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


def _download(cfg: DataConfig, path: Path, url: str) -> None:
    """Fetch the file through medmnist's own download (torchvision's ``download_url``, md5-checked).

    Folders it creates for the file are removed again when the download fails: a mistyped
    ``--data-root`` leaves nothing behind."""
    created = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(cfg, path, url)
    except BaseException:
        for folder in created:  # deepest first; only what we made, and only if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _fetch(cfg: DataConfig, path: Path, url: str) -> None:
    dataset_class = getattr(medmnist, INFO[cfg.dataset]["python_class"])
    # torchvision's urlopen has no timeout: without one a black-holed network hangs a worker for minutes.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # Download into a private folder and move the file in whole, so a partial download or two
        # workers fetching at once never leave a half-written file under the real name.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
            dataset_class(split="train", root=tmp, size=cfg.size, download=True)
            os.replace(Path(tmp) / cfg.file_name, path)
    except RuntimeError as exc:
        # medmnist wraps the real cause (URLError, md5 mismatch, ...) in a multi-line RuntimeError,
        # with a bare except that also swallows Ctrl-C.
        cause = exc.__context__ or exc
        if isinstance(cause, KeyboardInterrupt):
            raise cause from None
        raise DatasetUnavailable(
            f"could not download {cfg.file_name} from {url} into {path.parent} "
            f"({type(cause).__name__}: {one_line(cause)}); "
            "fetch it by hand and point --data-root at its folder"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


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

