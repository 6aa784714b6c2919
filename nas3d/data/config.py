"""Which data a study trains on: :class:`DataConfig`, which hands every question about the data to
its source (a MedMNIST file, synthetic data, or a manifest; see :mod:`nas3d.data.source`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medmnist.info import DEFAULT_ROOT

from nas3d.data.manifest import is_manifest
from nas3d.data.manifest_source import ManifestSource
from nas3d.data.medmnist_file import DATASETS, MedMNISTFile
from nas3d.data.preprocessing import CT_WINDOWS, NORMALISATIONS, Preprocessing
from nas3d.data.source import DataSource
from nas3d.data.splits import Selection
from nas3d.data.synthetic import SYNTHETIC, SyntheticFile
from nas3d.util import check_choice, unknown_option_message


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
    # Cross-validated scores (docs/studies.md#cross-validated-scores): k > 1 pools the search's train
    # share and val share, splits the pool into k stratified folds by cv_seed, and scores a trial by
    # the mean val AUC of k models, one trained per fold. 1: one model, scored on the val share.
    cv_folds: int = 1
    cv_seed: int = 0
    # How many of the k folds a trial trains, first to last; 0: all k. 1 is a hold-out scored on a k-th
    # of the pool, which the truth table's replays (docs/noise.md) found to pick better architectures
    # than the same training spent on k folds of fewer of them.
    cv_train_folds: int = 0
    # synthetic data only
    synthetic_classes: int = 2
    synthetic_samples: int = 256  # training samples; val and test get a quarter each
    # manifests only (dataset = "path/labels.csv"; docs/own-data.md)
    # "percentile" (the training split's 0.5-99.5 %, the default: it suits any modality), "ct" (a HU
    # window), "zscore" (per volume, for MRI), "minmax" (per volume) or "window" (clip to data.window)
    normalise: str = "percentile"
    # "ct" and "window": [low, high]; "ct" also takes a name (soft_tissue, lung, bone; default
    # soft_tissue); "window" defaults to [0, 255], MedMNIST's uint8 / 255
    window: tuple[float, ...] | str = ()
    spacing: tuple[float, ...] = ()  # target spacing in mm (R, A, S); () = the manifest's median
    crop_foreground: bool = False  # crop each volume to the box of voxels above its minimum first
    positive_class: str = ""  # a binary manifest's positive class; "" = data.classes' second, else a rule
    split_fractions: tuple[float, ...] = (0.7, 0.15, 0.15)  # train, val, test without a split column
    split_seed: int = 0  # the stratified split's seed
    classes: tuple[str, ...] = ()  # class names in index order; () = the manifest's labels (docs/own-data.md)
    # recorded when the study is created (nas3d.data.prepare_data), checked by every worker
    channels: int = 0  # image columns × channels per volume
    manifest_hash: str = ""  # sha256 over the CSV and every volume it names
    percentile_bounds: tuple[tuple[float, ...], ...] = ()  # "percentile": [low, high] per channel
    monai_version: str = ""  # the MONAI version whose transforms prepared the samples

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", _window_bounds(self.normalise, self.window))
        for name in ("split_fractions", "classes", "spacing"):  # JSON gives lists; keep the config hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "percentile_bounds", tuple(tuple(float(v) for v in b)
                                                           for b in self.percentile_bounds))
        if self.dataset not in (*DATASETS, SYNTHETIC) and not is_manifest(self.dataset):
            raise ValueError(
                "data.dataset: " + unknown_option_message("dataset", self.dataset, (*DATASETS, SYNTHETIC))
                + ", or a manifest path ending in .csv"
            )
        check_choice("data.normalise", self.normalise, NORMALISATIONS)
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ValueError(f"data.window must be [low, high] with low < high, but got {list(self.window)}")
        if self.spacing and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"data.spacing must be three spacings in mm > 0 (R, A, S), but got "
                             f"{list(self.spacing)}")
        if any(len(b) != 2 or not b[0] < b[1] for b in self.percentile_bounds):
            raise ValueError("data.percentile_bounds must be [low, high] per channel with low < high, but "
                             f"got {[list(b) for b in self.percentile_bounds]}")
        if self.cv_folds < 1:
            raise ValueError(f"data.cv_folds must be >= 1 (1: no cross-validation), but got "
                             f"{self.cv_folds!r}")
        if not 0 <= self.cv_train_folds <= self.cv_folds or (self.cv_train_folds and self.cv_folds < 2):
            raise ValueError(f"data.cv_train_folds must be 0 (all folds) or 1..data.cv_folds with "
                             f"data.cv_folds >= 2, but got {self.cv_train_folds!r} of {self.cv_folds!r}")
        if self.cv_folds > 1 and self.record_full_val:
            raise ValueError("data.record_full_val scores the whole val split, which cross-validation folds "
                             "train on: set data.cv_folds = 1 or data.record_full_val = false")
        fractions = self.split_fractions
        if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError("data.split_fractions must be three fractions > 0 (train, val, test) summing "
                             f"to 1, but got {list(fractions)}")
        if len(set(self.classes)) != len(self.classes) or any(not c.strip() for c in self.classes):
            raise ValueError(f"data.classes must be distinct, non-empty names, but got {list(self.classes)}")
        if self.classes and len(self.classes) < 2:
            raise ValueError(f"data.classes needs at least two classes, but got {list(self.classes)}")
        self.source  # noqa: B018 (each source checks the sizes it accepts)
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
    def source(self) -> DataSource:
        """Where the samples come from, and what they are (:class:`nas3d.data.source.DataSource`);
        built on each call, as cheap as the properties that ask it."""
        if self.is_manifest:
            return ManifestSource(
                Path(self.dataset).expanduser().absolute(), self.size, self.normalise, self.window,
                self.split_fractions, self.split_seed, self.classes, self.channels, self.manifest_hash,
                self.spacing, self.crop_foreground, self.percentile_bounds, self.positive_class,
                self.monai_version,
            )
        if self.dataset == SYNTHETIC:
            return SyntheticFile.of(self.size, self.data_root, self.synthetic_classes, self.synthetic_samples)
        return MedMNISTFile.of(self.dataset, self.size, self.data_root, self.download)

    @property
    def trained_folds(self) -> int:
        """How many models a trial trains: ``cv_train_folds`` of the ``cv_folds`` folds (0: all)."""
        return self.cv_train_folds or self.cv_folds

    @property
    def is_manifest(self) -> bool:
        return is_manifest(self.dataset)

    @property
    def is_medmnist(self) -> bool:
        """A real MedMNIST3D flag (scored by medmnist's Evaluator), not synthetic data or a manifest."""
        return self.dataset in DATASETS

    def fraction(self, split: str) -> float:
        """The share of ``split`` ("train" or "val") a search trains or scores on."""
        if split == "val" and self.search_val_fraction is not None:
            return self.search_val_fraction
        return self.search_fraction

    def selection(self, *, for_search: bool) -> Selection:
        """Which samples a load keeps (see :func:`nas3d.data.load_splits`)."""
        return Selection(for_search, {split: self.fraction(split) for split in ("train", "val")},
                         self.subset_seed, self.record_full_val)

    @property
    def resolved(self) -> bool:
        """Whether what a study records of its manifest is recorded (see :func:`prepare_data`)."""
        return not self.is_manifest or self.source.resolved

    @property
    def data_root(self) -> Path:
        """The folder the npz file lives in."""
        return Path(self.root or DEFAULT_ROOT or "~/.medmnist").expanduser()

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in index order: the manifest's, medmnist's INFO labels, or "0", "1", ..."""
        return self.source.class_names

    @property
    def name(self) -> str:
        """A short name: the MedMNIST flag, "synthetic", or the manifest's file name without .csv."""
        return self.source.name

    @property
    def file_name(self) -> str:
        """The file the data is read from: the npz file medmnist (or the synthetic writer) uses for this
        dataset and size, or the manifest's CSV."""
        return self.source.file_name

    @property
    def task(self) -> str:
        """``"binary-class"`` or ``"multi-class"``, as in medmnist's INFO."""
        return self.source.task

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def in_channels(self) -> int:
        return self.source.in_channels

    @property
    def preprocessing(self) -> Preprocessing:
        """How a volume becomes model input for this data: what ``nas3d predict`` and ONNX users repeat."""
        return self.source.preprocessing


def _window_bounds(normalise: str, window: tuple[float, ...] | str | list[float]) -> tuple[float, ...]:
    """``data.window`` as ``(low, high)``: a CT window's name resolved, ``()`` the normalisation's default."""
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError("data.window: " + unknown_option_message("CT window", window, tuple(CT_WINDOWS))
                             + ", or [low, high] in HU")
        return CT_WINDOWS[window]
    if not window:
        return CT_WINDOWS["soft_tissue"] if normalise == "ct" else (0.0, 255.0)
    return tuple(float(v) for v in window)
