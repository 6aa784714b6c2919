# Long module: every way a dataset reaches the device (MedMNIST files, synthetic npz, manifests) shares
# DataConfig, Split and the split checks, and load_splits dispatches between them; the manifest half
# (Preprocessing to prepare_for_model) is the part to move out next, with the dispatch beside it.
"""MedMNIST3D data and the user's own volumes: the medmnist loaders, a synthetic npz writer, manifests
(a labels CSV naming NIfTI or NumPy volumes), and splits held on the device.

Real datasets are read by the ``medmnist`` dataset classes from ``{root}/{flag}.npz`` (28³) or
``{root}/{flag}_64.npz``; synthetic data is written in exactly that npz format and read back from disk.
Both end in the same array checks and the same device tensors, so every code path above the file is
the one real data takes.

medmnist itself checks md5 only inside ``download``, and reports every failure as a multi-line
``RuntimeError`` (or a raw numpy/zipfile error for a damaged file). Here a missing file is a
:class:`DatasetUnavailable` and a damaged one a :class:`DatasetCorrupt`, each with a one-line message
that says what to do.

A manifest (``dataset = "path/labels.csv"``, see docs/own-data.md) is read, resampled and normalised
here; the prepared float32 volumes are cached beside the CSV (``.nas3d-cache/``), one file per sample
keyed by the content hashes of its volumes and the preprocessing settings. The manifest's content hash
(the CSV and every volume) and its class names are recorded in the study's configuration by
:func:`resolve_manifest`, and a worker whose files hash otherwise refuses to load them
(:class:`ManifestChanged`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
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
import torch.nn.functional as F
from medmnist.info import DEFAULT_ROOT, INFO

from nas3d.util import atomic_write, check_choice, one_line, unknown_option_message

SYNTHETIC = "synthetic"
SYNTHETIC_VERSION = 1  # bump when write_synthetic_npz changes what it writes
#: The MedMNIST3D flags, derived from medmnist's own table.
DATASETS: tuple[str, ...] = tuple(flag for flag, info in INFO.items() if info["python_class"].endswith("3D"))
SIZES: tuple[int, ...] = tuple(medmnist.dataset.MedMNIST3D.available_sizes)
SPLITS = ("train", "val", "test")
#: Seconds any one socket operation of a download may block: an unreachable network fails fast,
#: while a slow but live transfer keeps going.
DOWNLOAD_TIMEOUT_S = 15.0
#: How a manifest's volumes are scaled after resampling (DataConfig.normalise).
NORMALISATIONS = ("minmax", "zscore", "window")
#: Volume files a manifest may name.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".npz")
CACHE_DIR = ".nas3d-cache"
PREPROCESS_VERSION = 1  # bump when prepare_volume changes what it computes: old cache entries then miss

logger = logging.getLogger(__name__)


class DatasetUnavailable(ValueError):
    """The dataset file is not on disk and could not be downloaded."""


class DatasetCorrupt(ValueError):
    """The dataset file exists but is not the MedMNIST file it should be."""


class ManifestError(DatasetCorrupt):
    """A manifest (labels CSV) or a volume it names cannot be used; the message names the CSV row."""


class ManifestChanged(ManifestError):
    """The manifest's files are not those the study was created with."""


class _BadVolume(ValueError):
    """A volume file that reads but is not a usable volume; the message completes "volume X ..."."""


def is_manifest(dataset: str) -> bool:
    """Whether ``dataset`` names a manifest (any value ending in ``.csv``) rather than a MedMNIST flag."""
    return dataset.lower().endswith(".csv")


@dataclass(frozen=True)
class DataConfig:
    """Which data a study trains on."""

    dataset: str = "organmnist3d"  # a MedMNIST3D flag, "synthetic", or a manifest "path/labels.csv"
    size: int = 28  # 28 or 64 (synthetic and manifests: any edge length from 4 to 256)
    root: str | None = None  # folder holding {flag}.npz / {flag}_{size}.npz; None = medmnist's default
    download: bool = True  # try medmnist's download when the file is missing
    search_fraction: float = 0.25  # deterministic share of train and val used during search
    # The share of val used during search when it should differ from train's; None = search_fraction
    # (the seed's quarter). The CPU profile scores on the whole split: the quarter of a small split
    # (25 volumes for AdrenalMNIST3D) misranks architectures, and scoring is cheap next to training.
    search_val_fraction: float | None = None
    subset_seed: int = 0
    # Also score every search epoch on the whole validation split (recorded in the learning curve,
    # never used to choose or stop): how benchmarks such as bench/arch_table.py see how well the
    # search share ranks architectures.
    record_full_val: bool = False
    # synthetic data only
    synthetic_classes: int = 2
    synthetic_samples: int = 256  # training samples; val and test get a quarter each
    # manifests only (dataset = "path/labels.csv"; docs/own-data.md)
    normalise: str = "minmax"  # per volume after resampling: "minmax" to [0, 1], "zscore", or "window"
    window: tuple[float, ...] = (0.0, 255.0)  # normalise = "window": clip to [low, high], scale to [0, 1]
    split_fractions: tuple[float, ...] = (0.7, 0.15, 0.15)  # train, val, test without a split column
    split_seed: int = 0  # the stratified split's seed
    classes: tuple[str, ...] = ()  # class names in index order; () = the manifest's labels, sorted
    # recorded when the study is created (resolve_manifest), checked by every worker
    channels: int = 0  # image columns × channels per volume
    manifest_hash: str = ""  # sha256 over the CSV and every volume it names

    def __post_init__(self) -> None:
        for name in ("window", "split_fractions", "classes"):  # JSON gives lists; keep the config hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.dataset not in (*DATASETS, SYNTHETIC) and not is_manifest(self.dataset):
            raise ValueError(
                "data.dataset: " + unknown_option_message("dataset", self.dataset, (*DATASETS, SYNTHETIC))
                + ", or a manifest path ending in .csv"
            )
        check_choice("data.normalise", self.normalise, NORMALISATIONS)
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ValueError(f"data.window must be [low, high] with low < high, but got {list(self.window)}")
        fractions = self.split_fractions
        if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError("data.split_fractions must be three fractions > 0 (train, val, test) summing "
                             f"to 1, but got {list(fractions)}")
        if len(set(self.classes)) != len(self.classes) or any(not c.strip() for c in self.classes):
            raise ValueError(f"data.classes must be distinct, non-empty names, but got {list(self.classes)}")
        if self.classes and len(self.classes) < 2:
            raise ValueError(f"data.classes needs at least two classes, but got {list(self.classes)}")
        if self.dataset == SYNTHETIC or self.is_manifest:
            if not 4 <= self.size <= 256:  # any size: tests and smoke studies use tiny volumes
                what = "synthetic data" if self.dataset == SYNTHETIC else "a manifest"
                raise ValueError(f"data.size must be in [4, 256] for {what}, but got {self.size!r}")
        elif self.size not in SIZES:
            raise ValueError(f"data.size must be one of {SIZES} for {self.dataset}, but got {self.size!r}")
        for name in ("search_fraction", "search_val_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"data.{name} must be in (0, 1], but got {value!r}")
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
    def is_manifest(self) -> bool:
        return is_manifest(self.dataset)

    def fraction(self, split: str) -> float:
        """The share of ``split`` ("train" or "val") a search trains or scores on."""
        if split == "val" and self.search_val_fraction is not None:
            return self.search_val_fraction
        return self.search_fraction

    @property
    def is_medmnist(self) -> bool:
        """A real MedMNIST3D flag (scored by medmnist's Evaluator), not synthetic data or a manifest."""
        return self.dataset in DATASETS

    @property
    def resolved(self) -> bool:
        """Whether the manifest's classes, channels and hash are recorded (see :func:`resolve_manifest`)."""
        return not self.is_manifest or bool(self.manifest_hash and self.classes and self.channels)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in index order: the manifest's, medmnist's INFO labels, or "0", "1", ..."""
        if self.is_manifest:
            return self.classes
        if self.dataset == SYNTHETIC:
            return tuple(str(i) for i in range(self.synthetic_classes))
        labels = INFO[self.dataset]["label"]
        return tuple(labels[str(i)] for i in range(len(labels)))

    @property
    def name(self) -> str:
        """A short name: the MedMNIST flag, "synthetic", or the manifest's file name without .csv."""
        return Path(self.dataset).stem if self.is_manifest else self.dataset

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
        if self.is_manifest:
            return "binary-class" if self.num_classes == 2 else "multi-class"
        if self.dataset == SYNTHETIC:
            return "binary-class" if self.synthetic_classes == 2 else "multi-class"
        return INFO[self.dataset]["task"]

    @property
    def num_classes(self) -> int:
        if self.is_manifest:
            return len(self.classes)
        if self.dataset == SYNTHETIC:
            return self.synthetic_classes
        return len(INFO[self.dataset]["label"])

    @property
    def in_channels(self) -> int:
        if self.is_manifest:
            return self.channels
        return 1 if self.dataset == SYNTHETIC else INFO[self.dataset]["n_channels"]

    @property
    def preprocessing(self) -> Preprocessing:
        """How a volume becomes model input for this data: what ``nas3d predict`` and ONNX users repeat."""
        if self.is_manifest:
            return Preprocessing(self.size, self.in_channels, self.normalise, self.window)
        # MedMNIST volumes are uint8 divided by 255: the window [0, 255]
        return Preprocessing(self.size, self.in_channels, "window", (0.0, 255.0))


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

    With ``for_search`` only a deterministic share of train and of val is kept (``cfg.fraction``:
    stratified by class, at least one sample per class, chosen by ``subset_seed``) and test is not loaded.
    Raises :class:`DatasetUnavailable` or :class:`DatasetCorrupt` with a one-line reason.
    A manifest is read through its cache (:func:`prepare_manifest`): a recorded ``manifest_hash`` that
    the files no longer have is a :class:`ManifestChanged`.
    """
    if cfg.is_manifest:
        return _manifest_splits(cfg, device, for_search=for_search)
    path = ensure_file(cfg)
    arrays = read_arrays(cfg, path, ("train", "val") if for_search else SPLITS)
    splits: dict[str, Split] = {}
    for index, (split, (images, labels)) in enumerate(arrays.items()):
        fraction = cfg.fraction(split) if for_search else 1.0
        if split == "val" and cfg.record_full_val and fraction < 1.0:
            splits["full_val"] = Split.from_arrays(images, labels, task=cfg.task, device=device)
        if fraction < 1.0:
            keep = stratified_subset(labels, fraction, seed=(cfg.subset_seed, index))
            images, labels = images[keep], labels[keep]
        splits[split] = Split.from_arrays(images, labels, task=cfg.task, device=device)
    return DeviceData(
        name=cfg.name,
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



# --- manifests: the user's own volumes ------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How one sample's volumes become model input, in this order (what ``nas3d predict`` repeats and
    docs/own-data.md spells out for ONNX users):

    1. each volume file is read as float32 channels ``(C, D, H, W)`` (NIfTI: nibabel's ``get_fdata``,
       a 4-D file's last axis is its channels; NumPy: a 4-D array's first axis is);
    2. each is resampled to ``size``³ with ``F.interpolate(mode="trilinear", align_corners=False)``
       (skipped when it is ``size``³ already, where it would be the identity);
    3. each channel is normalised on its own: ``minmax`` to [0, 1] (a constant volume gives 0),
       ``zscore`` to mean 0 and standard deviation 1 (population), ``window`` clipped to
       ``[low, high]`` and scaled to [0, 1];
    4. the channels of a sample's files are stacked in column order (``image``, ``image_2``, ...).
    """

    size: int
    channels: int
    normalise: str = "minmax"
    window: tuple[float, ...] = (0.0, 255.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", tuple(float(v) for v in self.window))
        check_choice("normalise", self.normalise, NORMALISATIONS)

    def to_dict(self) -> dict[str, object]:
        return {"version": PREPROCESS_VERSION, "size": self.size, "channels": self.channels,
                "normalise": self.normalise, "window": list(self.window)}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Preprocessing:
        return cls(**{k: v for k, v in data.items() if k != "version"})  # type: ignore[arg-type]

    def cache_key(self, file_hashes: tuple[str, ...]) -> str:
        """The cache entry of a sample whose volumes have these content hashes, prepared this way."""
        settings = {**self.to_dict(), "channels": None, "files": list(file_hashes)}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:40]


@dataclass(frozen=True)
class ManifestRow:
    """One sample of a manifest: its CSV line (the header is line 1), its volumes, label and split."""

    line: int
    cells: tuple[str, ...]  # the image cells as written
    images: tuple[Path, ...]  # resolved against the CSV's folder
    label: str | None
    split: str | None


@dataclass(frozen=True)
class Manifest:
    path: Path
    image_columns: tuple[str, ...]
    rows: tuple[ManifestRow, ...]
    has_split: bool

    def where(self, row: ManifestRow) -> str:
        return f"{self.path} line {row.line}"


@dataclass(frozen=True)
class PreparedManifest:
    """A manifest's samples ready for a model: the resolved config, float32 images ``(N, C, S, S, S)``,
    int64 labels and the sample indices of each split."""

    config: DataConfig
    images: np.ndarray
    labels: np.ndarray
    splits: dict[str, np.ndarray]


_IMAGE_COLUMN = re.compile(r"image(?:_(\d+))?")


def read_manifest(path: str | os.PathLike[str], *, labels: bool = True) -> Manifest:
    """Parse a manifest CSV (columns ``image``, ``image_2``, ..., ``label``, optional ``split``; other
    columns are ignored). ``labels=False`` (prediction) makes ``label`` optional. One-line
    :class:`ManifestError` for a missing file, missing columns, empty cells or an unknown split."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetUnavailable(f"manifest {path} not found; give the labels CSV's path (--dataset "
                                 "labels.csv), the same on every host") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {path} is not a readable UTF-8 CSV ({type(e).__name__}: "
                            f"{one_line(e, 120)})") from None
    try:
        table = list(csv.reader(text.splitlines()))
    except csv.Error as e:
        raise ManifestError(f"manifest {path} is not a valid CSV ({one_line(e)})") from None
    header = [h.strip() for h in table[0]] if table else []
    numbered = {}
    for index, name in enumerate(header):
        match = _IMAGE_COLUMN.fullmatch(name)
        if match:
            numbered[int(match.group(1) or 1)] = index
    needed = ("image", "label") if labels else ("image",)
    if any(name not in header for name in needed) or 1 not in numbered:
        raise ManifestError(
            f"manifest {path} needs the columns {', '.join(map(repr, needed))} (optional: 'split', and "
            f"'image_2', ... for more channels), but its header is {header!r}"
        )
    columns = tuple(sorted(numbered))
    if columns != tuple(range(1, len(columns) + 1)):
        raise ManifestError(f"manifest {path}: image columns must be image, image_2, image_3, ... without "
                            f"gaps, but got {[header[numbered[c]] for c in columns]}")
    label_at = header.index("label") if "label" in header else None
    split_at = header.index("split") if "split" in header else None
    rows = []
    for line, values in enumerate(table[1:], start=2):
        if not any(v.strip() for v in values):
            continue  # a blank line
        padded = [v.strip() for v in values] + [""] * (len(header) - len(values))

        def cell(i: int | None, padded: list[str] = padded) -> str:
            return padded[i] if i is not None else ""

        where = f"{path} line {line}"
        cells = tuple(cell(numbered[c]) for c in columns)
        for c, value in zip(columns, cells, strict=True):
            if not value:
                raise ManifestError(f"{where}: the {header[numbered[c]]!r} cell is empty")
        label = cell(label_at) if label_at is not None else None
        if label_at is not None and not label and labels:
            raise ManifestError(f"{where}: the 'label' cell is empty")
        split = cell(split_at).lower() if split_at is not None else None
        if split_at is not None and split not in SPLITS:
            raise ManifestError(f"{where}: split {cell(split_at)!r} is not one of {', '.join(SPLITS)}")
        images = tuple(Path(v).expanduser() if Path(v).expanduser().is_absolute() else path.parent / v
                       for v in cells)
        rows.append(ManifestRow(line, cells, images, _canonical_label(label) if label else None, split))
    if not rows:
        raise ManifestError(f"manifest {path} has a header but no rows")
    image_columns = tuple(header[numbered[c]] for c in columns)
    return Manifest(path, image_columns, tuple(rows), split_at is not None)


def _canonical_label(text: str) -> str:
    """An integer label in one spelling ("01" and "1" are one class); a name as written."""
    try:
        return str(int(text))
    except ValueError:
        return text


def _sorted_classes(labels: set[str]) -> tuple[str, ...]:
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        return tuple(sorted(labels, key=int))  # integer labels in numeric order: 0..K-1 stay themselves
    return tuple(sorted(labels))


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) for the life of the process."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=65536)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_hashes(manifest: Manifest) -> tuple[str, tuple[tuple[str, ...], ...]]:
    """The manifest's content hash (its CSV and every volume, in row order) and each row's volume
    hashes. A missing or unreadable volume is a one-line error naming its CSV row."""
    digest = hashlib.sha256(b"nas3d-manifest/1\0")
    digest.update(file_sha256(manifest.path).encode())
    per_row = []
    for row in manifest.rows:
        hashes = []
        for cell, image in zip(row.cells, row.images, strict=True):
            try:
                hashes.append(file_sha256(image))
            except FileNotFoundError:
                raise ManifestError(f"{manifest.where(row)}: volume {cell!r} not found ({image})") from None
            except OSError as e:
                raise ManifestError(f"{manifest.where(row)}: volume {cell!r} is not readable "
                                    f"({e.strerror or type(e).__name__}: {image})") from None
            digest.update(hashes[-1].encode())
        per_row.append(tuple(hashes))
    return digest.hexdigest(), tuple(per_row)


def read_volume(path: Path) -> np.ndarray:
    """A volume file as finite float32 channels ``(C, D, H, W)``; ``ValueError`` saying what is wrong
    (what numpy or nibabel raise for a damaged file, else a message that completes "volume X ...")."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel

        image = nibabel.load(str(path))
        array = np.asarray(image.get_fdata(dtype=np.float32))
        while array.ndim > 4 and array.shape[3] == 1:  # (X, Y, Z, 1, C): NIfTI's vector volumes
            array = array.squeeze(3)
        if array.ndim == 4:
            array = np.moveaxis(array, -1, 0)  # NIfTI stores channels (or time) last
    elif name.endswith(".npy"):
        array = np.load(path, allow_pickle=False)
    elif name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as npz:
            if len(npz.files) != 1:
                raise _BadVolume(f"holds {len(npz.files)} arrays ({', '.join(npz.files[:4])}), expected one")
            array = npz[npz.files[0]]
    else:
        raise _BadVolume(f"is not a volume file nas3d reads ({', '.join(VOLUME_SUFFIXES)})")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or 0 in array.shape:
        raise _BadVolume(f"has shape {tuple(array.shape)}, expected (D, H, W) or channels and (D, H, W)")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == np.bool_):
        raise _BadVolume(f"holds {array.dtype} values, expected numbers")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise _BadVolume(f"holds {np.count_nonzero(~np.isfinite(array))} NaN or infinite values")
    return array


def prepare_volume(array: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Resample float32 ``(C, D, H, W)`` to ``pre.size``³ and normalise each channel (see
    :class:`Preprocessing`); float32 ``(C, S, S, S)``."""
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    size = (pre.size,) * 3
    if tuple(x.shape[1:]) != size:
        x = F.interpolate(x[None], size=size, mode="trilinear", align_corners=False)[0]
    flat = x.reshape(x.shape[0], -1)
    shape = (-1, 1, 1, 1)
    if pre.normalise == "minmax":
        low, high = flat.min(dim=1).values.view(shape), flat.max(dim=1).values.view(shape)
        span = high - low
        x = (x - low) / torch.where(span > 0, span, torch.ones_like(span))
    elif pre.normalise == "zscore":
        mean, std = flat.mean(dim=1).view(shape), flat.std(dim=1, correction=0).view(shape)
        x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    else:
        low, high = pre.window
        x = (x.clamp(low, high) - low) / (high - low)
    return x.numpy()


def prepare_sample(images: tuple[Path, ...], pre: Preprocessing, *, where: str) -> np.ndarray:
    """One sample's volumes prepared and stacked into float32 ``(C, S, S, S)``; a one-line
    :class:`ManifestError` starting with ``where`` for a volume that cannot be read."""
    channels = []
    for image in images:
        try:
            array = read_volume(image)
        except FileNotFoundError:
            raise ManifestError(f"{where}: volume {image} not found") from None
        except _BadVolume as e:
            raise ManifestError(f"{where}: volume {image.name} {e}") from None
        except Exception as e:  # nibabel and numpy raise many kinds for a damaged file
            raise ManifestError(f"{where}: volume {image.name} is not readable ({type(e).__name__}: "
                                f"{one_line(e, 120)})") from None
        channels.append(prepare_volume(array, pre))
    return np.concatenate(channels)


def prepare_manifest(cfg: DataConfig, *, write_cache: bool = True) -> PreparedManifest:
    """Read, check and prepare every sample of ``cfg``'s manifest, through the cache beside it.

    Cache entries (``.nas3d-cache/<key>.npy``, float32 ``(C, S, S, S)``) are keyed by the content
    hashes of a sample's volumes and the preprocessing settings, so a changed volume misses its own
    entry only. New entries are written (atomically) only once every sample has been prepared and
    every check passed: bad data leaves nothing behind. A read-only data folder is not an error.
    Raises :class:`ManifestChanged` when ``cfg`` records a ``manifest_hash`` the files do not have.
    """
    manifest = read_manifest(Path(cfg.dataset).expanduser().absolute())
    digest, hashes = manifest_hashes(manifest)
    if cfg.manifest_hash and digest != cfg.manifest_hash:
        raise ManifestChanged(
            f"the files of manifest {manifest.path} changed since the study was created (content hash "
            f"{digest[:12]}, recorded {cfg.manifest_hash[:12]}): every worker must see the same data; "
            "restore the files the study was made with, or create a new study (--name) for the new data"
        )
    classes = cfg.classes or _sorted_classes({row.label for row in manifest.rows if row.label is not None})
    for row in manifest.rows:
        if row.label not in classes:
            raise ManifestError(f"{manifest.where(row)}: label {row.label!r} is not one of the classes "
                                f"{list(classes)} (data.classes)")
    if len(classes) < 2:
        raise ManifestError(f"manifest {manifest.path}: every row has label {classes[0]!r}; a classifier "
                            "needs at least two classes")
    labels = np.array([classes.index(row.label) for row in manifest.rows], dtype=np.int64)  # type: ignore[arg-type]
    splits = _manifest_split_indices(manifest, labels, classes, cfg)

    pre = Preprocessing(cfg.size, 0, cfg.normalise, cfg.window)  # channels: known once a sample is read
    cache = manifest.path.parent / CACHE_DIR
    samples: list[np.ndarray] = []
    missing: list[tuple[Path, np.ndarray]] = []
    first: tuple[int, ManifestRow] | None = None
    for row, row_hashes in zip(manifest.rows, hashes, strict=True):
        entry = cache / f"{pre.cache_key(row_hashes)}.npy"
        sample = _read_cache_entry(entry, cfg.size)
        if sample is None:
            sample = prepare_sample(row.images, pre, where=manifest.where(row))
            missing.append((entry, sample))
        if first is None:
            first = (sample.shape[0], row)
        elif sample.shape[0] != first[0]:
            raise ManifestError(
                f"{manifest.where(row)}: the sample has {sample.shape[0]} channel(s), but line "
                f"{first[1].line}'s has {first[0]}; every sample needs the same channels"
            )
        samples.append(sample)
    assert first is not None
    resolved = dataclasses.replace(cfg, dataset=str(manifest.path), classes=classes, channels=first[0],
                        manifest_hash=digest)
    if write_cache and missing:
        _write_cache_entries(cache, missing)
    return PreparedManifest(resolved, np.stack(samples), labels, splits)


def _read_cache_entry(entry: Path, size: int) -> np.ndarray | None:
    try:
        sample = np.load(entry, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # not there (or damaged): prepared again
    ok = sample.dtype == np.float32 and sample.ndim == 4 and sample.shape[1:] == (size,) * 3
    return sample if ok else None


def _write_cache_entries(cache: Path, entries: list[tuple[Path, np.ndarray]]) -> None:
    try:
        cache.mkdir(exist_ok=True)
        for entry, sample in entries:
            atomic_write(entry, lambda file, sample=sample: np.save(file, sample, allow_pickle=False))
    except OSError as e:
        logger.warning("could not cache prepared volumes in %s (%s); they are prepared again next time",
                       cache, e.strerror or e)


def _manifest_split_indices(
    manifest: Manifest, labels: np.ndarray, classes: tuple[str, ...], cfg: DataConfig
) -> dict[str, np.ndarray]:
    """Each split's sample indices: the ``split`` column's, else a stratified split by
    ``cfg.split_fractions`` seeded by ``cfg.split_seed``. Every split must hold every class."""
    if manifest.has_split:
        names = np.array([row.split for row in manifest.rows])
        splits = {split: np.flatnonzero(names == split) for split in SPLITS}
        for split, index in splits.items():
            if len(index) == 0:
                raise ManifestError(f"manifest {manifest.path}: the {split} split is empty (no row has "
                                    f"split = {split}); give it rows, or drop the split column")
    else:
        rng = np.random.default_rng(cfg.split_seed)
        parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        _, f_val, f_test = cfg.split_fractions
        for k, name in enumerate(classes):
            members = rng.permutation(np.flatnonzero(labels == k))
            if len(members) < 3:
                raise ManifestError(
                    f"manifest {manifest.path}: class {name!r} has {len(members)} sample(s); a stratified "
                    "split needs at least 3 per class (one each for train, val, test), or give a split column"
                )
            n = len(members)  # at least one each for val and test, and one left for train
            n_val = min(max(1, int(f_val * n + 0.5)), n - 2)  # half up, as stratified_subset
            n_test = min(max(1, int(f_test * n + 0.5)), n - 1 - n_val)
            parts["val"].append(members[:n_val])
            parts["test"].append(members[n_val:n_val + n_test])
            parts["train"].append(members[n_val + n_test:])
        splits = {split: np.sort(np.concatenate(p)) for split, p in parts.items()}
    for split in ("train", "val", "test"):
        present = set(labels[splits[split]].tolist())
        for k, name in enumerate(classes):
            if k in present:
                continue
            if k not in set(labels.tolist()):
                raise ManifestError(f"manifest {manifest.path}: class {name!r} (data.classes) has no sample")
            if split == "train":
                other = next(s for s in ("val", "test") if k in set(labels[splits[s]].tolist()))
                raise ManifestError(f"manifest {manifest.path}: class {name!r} is in the {other} split but "
                                    "not in train, so no model could learn it; move rows of it to train")
            raise ManifestError(f"manifest {manifest.path}: class {name!r} has no sample in the {split} "
                                f"split, so its AUC is undefined; give the {split} split one")
    return splits


def resolve_manifest(cfg: DataConfig) -> DataConfig:
    """``cfg`` with its manifest checked and prepared (filling the cache) and what the study records
    filled in: the CSV's absolute path, the class names, the channel count and the content hash."""
    return prepare_manifest(cfg).config


def prepare_data(cfg: DataConfig) -> DataConfig:
    """Check the data a study will train on (:func:`check_data`, or every sample of a manifest) and
    return the configuration to record: ``cfg`` itself, or the resolved manifest config."""
    if cfg.is_manifest:
        return resolve_manifest(cfg)
    check_data(cfg)
    return cfg


def check_manifest_unchanged(cfg: DataConfig) -> None:
    """For a manifest study: :class:`ManifestChanged` (one line) unless the files hash as recorded.
    Cheap to repeat in one process (hashes are cached by file size and mtime); no-op for MedMNIST."""
    if not cfg.is_manifest or not cfg.manifest_hash:
        return
    manifest = read_manifest(Path(cfg.dataset))
    digest, _ = manifest_hashes(manifest)
    if digest != cfg.manifest_hash:
        prepare_manifest(cfg, write_cache=False)  # raises ManifestChanged with the full message


def _manifest_splits(cfg: DataConfig, device: torch.device | str, *, for_search: bool) -> DeviceData:
    prepared = prepare_manifest(cfg)
    resolved = prepared.config
    splits: dict[str, Split] = {}
    for index, split in enumerate(("train", "val") if for_search else SPLITS):
        members = prepared.splits[split]
        fraction = cfg.fraction(split) if for_search else 1.0
        if split == "val" and cfg.record_full_val and fraction < 1.0:
            splits["full_val"] = _manifest_split(prepared, members, device)
        if fraction < 1.0:
            members = members[stratified_subset(prepared.labels[members], fraction,
                                                seed=(cfg.subset_seed, index))]
        splits[split] = _manifest_split(prepared, members, device)
    return DeviceData(name=resolved.name, num_classes=resolved.num_classes, in_channels=resolved.in_channels,
                      size=resolved.size, train=splits["train"], val=splits["val"], test=splits.get("test"),
                      full_val=splits.get("full_val"))


def _manifest_split(prepared: PreparedManifest, members: np.ndarray, device: torch.device | str) -> Split:
    images = torch.from_numpy(prepared.images[members])
    labels = torch.from_numpy(prepared.labels[members])
    return Split(images.to(device), labels.to(device), prepared.config.task)


def prepare_for_model(
    samples: list[tuple[str, tuple[Path, ...]]], pre: Preprocessing
) -> np.ndarray:
    """Volumes to predict on (``(where, files)`` per sample) prepared as in training, float32
    ``(N, C, S, S, S)``; a one-line :class:`ManifestError` for a volume that is unreadable or has
    another channel count than ``pre.channels``."""
    out = []
    for where, files in samples:
        sample = prepare_sample(files, pre, where=where)
        if sample.shape[0] != pre.channels:
            raise ManifestError(f"{where}: the sample has {sample.shape[0]} channel(s), but the model takes "
                                f"{pre.channels}")
        out.append(sample)
    return np.stack(out)
