"""A manifest as a data source: its samples checked, prepared through the cache beside the CSV, split,
and put on a device.

Prepared float32 volumes are cached in ``.nas3d-cache/``, one file per sample keyed by the content
hashes of its volumes and the preprocessing settings. The manifest's content hash (the CSV and every
volume) and its class names are recorded in the study's configuration when it is created
(:meth:`ManifestSource.check`), and a worker whose files hash otherwise refuses to load them
(:class:`ManifestChanged`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nas3d.data.errors import ManifestChanged, ManifestError
from nas3d.data.hashes import StoredHashes, manifest_hashes
from nas3d.data.manifest import Manifest, ManifestRow, class_order, read_manifest
from nas3d.data.preprocessing import (
    PERCENTILE_SAMPLES,
    PERCENTILES,
    Preprocessing,
    median_spacing,
    monai_version,
    percentile_bounds,
    prepare_volumes,
    read_sample,
)
from nas3d.data.splits import SPLITS, DeviceData, Selection, Split
from nas3d.util import atomic_write

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedSamples:
    """A manifest's samples ready for a model: what the study records of it (``recorded``: the CSV's
    absolute path, class names, channel count, content hash), float32 images ``(N, C, S, S, S)``,
    int64 labels and the sample indices of each split."""

    recorded: dict[str, object]
    images: np.ndarray
    labels: np.ndarray
    splits: dict[str, np.ndarray]


#: The manifest last resolved for a load in this process (a retrain resolves, then loads), by what
#: decides its samples: so it is prepared once, and not held once the load has put it on the device.
_held: dict[tuple[object, ...], PreparedSamples] = {}


@dataclass(frozen=True)
class ManifestSource:
    """The user's volumes, named by a labels CSV (``DataConfig.dataset = "path/labels.csv"``)."""

    path: Path  # absolute
    size: int
    normalise: str
    window: tuple[float, ...]
    split_fractions: tuple[float, ...]
    split_seed: int
    classes: tuple[str, ...]
    channels: int
    manifest_hash: str
    spacing: tuple[float, ...] = ()
    crop_foreground: bool = False
    percentile_bounds: tuple[tuple[float, ...], ...] = ()
    positive_class: str = ""
    monai_version: str = ""

    def __post_init__(self) -> None:
        if not 4 <= self.size <= 256:  # any size: tests and smoke studies use tiny volumes
            raise ValueError(f"data.size must be in [4, 256] for a manifest, but got {self.size!r}")

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def file_name(self) -> str:
        return self.path.name

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def task(self) -> str:
        return "binary-class" if self.num_classes == 2 else "multi-class"

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.size, self.channels, self.normalise, self.window, self.spacing,
                             self.crop_foreground, self.percentile_bounds)  # type: ignore[arg-type]

    @property
    def resolved(self) -> bool:
        """Whether everything a study records of the manifest is filled in (classes, channels, hash,
        spacing where a volume is NIfTI, and the percentile bounds)."""
        return bool(self.manifest_hash and self.classes and self.channels and self.monai_version
                    and (self.percentile_bounds or self.normalise != "percentile"))

    def _recorded(self) -> dict[str, object]:
        return {"dataset": str(self.path), "classes": self.classes, "channels": self.channels,
                "manifest_hash": self.manifest_hash, "spacing": self.spacing,
                "percentile_bounds": self.percentile_bounds, "positive_class": self.positive_class,
                "monai_version": self.monai_version}

    def check(self) -> dict[str, object]:
        """Check and prepare every sample (filling the cache); what the study records."""
        return self.resolve(hold=False)

    def resolve(self, *, hold: bool) -> dict[str, object]:
        """What the study records of the manifest: the CSV's absolute path, class names, channel count
        and content hash. Recorded ones are checked against the files only (they passed every check
        when they were recorded); else every sample is prepared, and ``hold`` keeps the samples for
        the load that follows in this process (see ``_held``)."""
        if self.resolved:
            self.check_unchanged()
            if self.monai_version != monai_version():
                logger.warning("the study's samples were prepared with MONAI %s, this host has %s: its "
                               "samples may differ slightly; install MONAI %s on every host",
                               self.monai_version, monai_version(), self.monai_version)
            return self._recorded()
        return self.prepare(keep=hold).recorded

    def load(self, device: torch.device | str, selection: Selection) -> DeviceData:
        prepared = self.prepare(keep=False)
        classes = prepared.recorded["classes"]
        channels = prepared.recorded["channels"]
        assert isinstance(classes, tuple) and isinstance(channels, int)
        task = "binary-class" if len(classes) == 2 else "multi-class"

        def take(split: str, keep: np.ndarray | None) -> Split:
            members = prepared.splits[split] if keep is None else prepared.splits[split][keep]
            images = torch.from_numpy(prepared.images[members])
            return Split(images.to(device), torch.from_numpy(prepared.labels[members]).to(device), task)

        splits = selection.pick(lambda split: prepared.labels[prepared.splits[split]], take)
        return DeviceData(name=self.name, num_classes=len(classes), in_channels=channels, size=self.size,
                          train=splits["train"], val=splits["val"], test=splits.get("test"),
                          full_val=splits.get("full_val"))

    def check_unchanged(self) -> None:
        """:class:`ManifestChanged` (one line) unless the files hash as recorded. Cheap to repeat:
        hashes are cached by file size and mtime, in the process and in the cache folder."""
        if self.manifest_hash:
            manifest = read_manifest(self.path)
            stored = StoredHashes(manifest.cache)
            self._check_hash(manifest, stored)
            stored.save()

    def _check_hash(
        self, manifest: Manifest, stored: StoredHashes
    ) -> tuple[str, tuple[tuple[str, ...], ...]]:
        digest, hashes = manifest_hashes(manifest, stored)
        if self.manifest_hash and digest != self.manifest_hash:
            raise ManifestChanged(
                f"the files of manifest {manifest.path} changed since the study was created (content hash "
                f"{digest[:12]}, recorded {self.manifest_hash[:12]}): every worker must see the same data; "
                "restore the files the study was made with, or create a new study (--name) for the new data"
            )
        return digest, hashes

    def prepare(self, *, write_cache: bool = True, keep: bool = False) -> PreparedSamples:
        """Read, check and prepare every sample, through the cache beside the CSV.

        Cache entries (``.nas3d-cache/<key>.npy``, float32 ``(C, S, S, S)``) are keyed by the content
        hashes of a sample's volumes and the preprocessing settings, so a changed volume misses its own
        entry only. New entries are written (atomically) only once every sample has been prepared and
        every check passed: bad data leaves nothing behind. A read-only data folder is not an error.
        ``keep``: hold the result for the next call in this process (see ``_held``); without it, a
        held result is taken and released. Raises :class:`ManifestChanged` when a recorded
        ``manifest_hash`` is not the files'.
        """
        manifest = read_manifest(self.path)
        stored = StoredHashes(manifest.cache)  # saved once every check has passed
        digest, hashes = self._check_hash(manifest, stored)
        classes, positive, why = class_order(manifest, self.classes, self.positive_class)
        def held_key(spacing: tuple[float, ...], bounds: tuple[tuple[float, ...], ...]) -> tuple[object, ...]:
            return (str(manifest.path), self.size, self.normalise, self.window, self.split_fractions,
                    self.split_seed, classes, digest, spacing, self.crop_foreground, bounds)

        key = held_key(self.spacing, self.percentile_bounds)
        if key in _held:
            return _held[key] if keep else _held.pop(key)
        _held.clear()  # one manifest at a time: an older one is not loaded any more
        labels = np.array([classes.index(row.label) for row in manifest.rows], dtype=np.int64)  # type: ignore[arg-type]
        splits = _split_indices(manifest, labels, classes, self.split_fractions, self.split_seed)
        spacing = self.spacing or median_spacing([image for row in manifest.rows for image in row.images])
        bounds = self.percentile_bounds
        bounds_entry = None  # percentile bounds to keep once every check has passed
        if self.normalise == "percentile" and not bounds:
            bounds, bounds_entry = _training_bounds(manifest, [hashes[i] for i in splits["train"]],
                                                    splits["train"])
        # channels: known once a sample is read
        pre = Preprocessing(self.size, 0, self.normalise, self.window, spacing, self.crop_foreground,
                            bounds)  # type: ignore[arg-type] (this host's MONAI: in every cache key)
        samples: list[np.ndarray] = []
        missing: list[tuple[Path, np.ndarray]] = []
        first: tuple[int, ManifestRow] | None = None
        for row, row_hashes in zip(manifest.rows, hashes, strict=True):
            entry = manifest.cache / f"{pre.cache_key(row_hashes)}.npy"
            sample = _read_cache_entry(entry, self.size)
            volumes = read_sample(row.images, where=manifest.where(row)) if sample is None else []
            channels = sum(v.array.shape[0] for v in volumes) if sample is None else sample.shape[0]
            if first is None:
                first = (channels, row)
            elif channels != first[0]:  # checked before preparing: the channels decide the bounds used
                raise ManifestError(
                    f"{manifest.where(row)}: the sample has {channels} channel(s), but line "
                    f"{first[1].line}'s has {first[0]}; every sample needs the same channels"
                )
            if sample is None:
                sample = prepare_volumes(volumes, pre)
                missing.append((entry, sample))
            samples.append(sample)
        assert first is not None
        if write_cache:
            if missing:
                _write_cache_entries(manifest.cache, missing)
            if bounds_entry is not None:
                _write_cache_entries(manifest.cache, [bounds_entry])
            stored.save()
        # Said once every check has passed (a bad input is one line), when the study is created.
        if why and not self.resolved:
            logger.info("manifest %s: positive class %r (%s); set data.positive_class to choose",
                        manifest.path.name, positive, why)
        if not manifest.has_split and not self.resolved:
            logger.info("manifest %s has no split column: split stratified by class (data.split_fractions "
                        "%s, data.split_seed %d) into %s", manifest.path.name, list(self.split_fractions),
                        self.split_seed, ", ".join(f"{len(splits[s])} {s}" for s in SPLITS))
        recorded = {"dataset": str(manifest.path), "classes": classes, "channels": first[0],
                    "manifest_hash": digest, "spacing": spacing, "percentile_bounds": bounds,
                    "positive_class": positive, "monai_version": self.monai_version or pre.monai}
        prepared = PreparedSamples(recorded, np.stack(samples), labels, splits)
        if keep:  # held under what the study records, which the load that follows is given
            _held[held_key(spacing, bounds)] = prepared
        return prepared


def _training_bounds(
    manifest: Manifest, train_hashes: list[tuple[str, ...]], train: np.ndarray
) -> tuple[tuple[tuple[float, float], ...], tuple[Path, np.ndarray] | None]:
    """``normalise = "percentile"``'s bounds per channel over the training split's volumes, and the
    cache entry to write when they were computed here (None when read from it): kept in the cache
    folder by the content hashes of those volumes, so they are read for it once."""
    key = hashlib.sha256(json.dumps([PERCENTILES, PERCENTILE_SAMPLES, train_hashes]).encode()).hexdigest()
    entry = manifest.cache / f"{key[:40]}.bounds"  # an .npy array, named apart from the samples
    try:
        stored = np.load(entry, allow_pickle=False)
        if stored.ndim == 2 and stored.shape[1] == 2:
            return tuple((float(lo), float(hi)) for lo, hi in stored), None
    except (OSError, ValueError, EOFError):
        pass  # not there (or damaged): computed again
    rows = [manifest.rows[i] for i in train]
    bounds = percentile_bounds(read_sample(row.images, where=manifest.where(row)) for row in rows)
    return bounds, (entry, np.array(bounds, dtype=np.float64))


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


def _split_indices(
    manifest: Manifest, labels: np.ndarray, classes: tuple[str, ...], fractions: tuple[float, ...], seed: int
) -> dict[str, np.ndarray]:
    """Each split's sample indices: the ``split`` column's, else a stratified split by ``fractions``
    (``data.split_fractions``) seeded by ``seed``. Every split must hold every class."""
    if manifest.has_split:
        names = np.array([row.split for row in manifest.rows])
        splits = {split: np.flatnonzero(names == split) for split in SPLITS}
        for split, index in splits.items():
            if len(index) == 0:
                raise ManifestError(f"manifest {manifest.path}: the {split} split is empty (no row has "
                                    f"split = {split}); give it rows, or drop the split column")
    else:
        rng = np.random.default_rng(seed)
        parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        _, f_val, f_test = fractions
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
    for split in SPLITS:
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
