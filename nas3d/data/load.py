"""The entry points: :func:`load_splits` puts a dataset on a device; :func:`prepare_data` checks it
before a study is created and returns what the study records; the rest serve tests and benches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from nas3d.data.config import DataConfig
from nas3d.data.manifest_source import ManifestSource
from nas3d.data.medmnist_file import NpzSource
from nas3d.data.splits import SPLITS, DeviceData

_Source = TypeVar("_Source")


def load_splits(cfg: DataConfig, device: torch.device | str, *, for_search: bool) -> DeviceData:
    """Load ``cfg``'s dataset onto ``device``.

    With ``for_search`` only a deterministic share of train and of val is kept (``cfg.fraction``:
    stratified by class, at least one sample per class, chosen by ``subset_seed``) and test is not loaded.
    Raises :class:`DatasetUnavailable` or :class:`DatasetCorrupt` with a one-line reason.
    A manifest is read through its cache (:func:`prepare_manifest`): a recorded ``manifest_hash`` that
    the files no longer have is a :class:`ManifestChanged`.
    """
    return cfg.source.load(device, cfg.selection(for_search=for_search))


def prepare_data(cfg: DataConfig) -> DataConfig:
    """Check the data a study will train on (the npz file, or every sample of a manifest) and return
    the configuration to record: ``cfg`` itself, or with the manifest's path, classes, channels and
    content hash filled in. A damaged file fails here, in one line, rather than in every worker's
    first trial."""
    recorded = cfg.source.check()
    return dataclasses.replace(cfg, **recorded) if recorded else cfg  # type: ignore[arg-type]


def resolve_manifest(cfg: DataConfig) -> DataConfig:
    """``cfg`` with what a study records of its manifest filled in (as :func:`prepare_data`), for a
    load that follows in this process: samples prepared here are held for that load, which then
    does not prepare them again."""
    recorded = _source(cfg, ManifestSource, "a manifest").resolve(hold=True)
    return dataclasses.replace(cfg, **recorded)  # type: ignore[arg-type]


def check_manifest_unchanged(cfg: DataConfig) -> None:
    """For a manifest study: :class:`ManifestChanged` (one line) unless the files hash as recorded.
    Cheap to repeat (hashes are cached by file size and mtime); no-op for MedMNIST."""
    if isinstance(cfg.source, ManifestSource):
        cfg.source.check_unchanged()


@dataclass(frozen=True)
class PreparedManifest:
    """A manifest's samples ready for a model: the resolved config, float32 images ``(N, C, S, S, S)``,
    int64 labels and the sample indices of each split."""

    config: DataConfig
    images: np.ndarray
    labels: np.ndarray
    splits: dict[str, np.ndarray]


def prepare_manifest(cfg: DataConfig, *, write_cache: bool = True) -> PreparedManifest:
    """Read, check and prepare every sample of ``cfg``'s manifest, through the cache beside it
    (:meth:`nas3d.data.manifest_source.ManifestSource.prepare`)."""
    source = _source(cfg, ManifestSource, "a manifest")
    prepared = source.prepare(write_cache=write_cache)
    resolved = dataclasses.replace(cfg, **prepared.recorded)  # type: ignore[arg-type]
    return PreparedManifest(resolved, prepared.images, prepared.labels, prepared.splits)


def ensure_file(cfg: DataConfig) -> Path:
    """The path of ``cfg``'s npz file, downloading (real) or writing (synthetic) it when missing.

    A real file is md5-checked against medmnist's INFO, whether it was downloaded or already there.
    """
    return _source(cfg, NpzSource, "an npz dataset").ensure_file()


def check_data(cfg: DataConfig) -> Path:
    """:func:`ensure_file`, and for synthetic data (which has no md5 to check) a read of the whole
    file; the path."""
    source = _source(cfg, NpzSource, "an npz dataset")
    source.check()
    return source.ensure_file()


def read_arrays(
    cfg: DataConfig, path: Path, splits: tuple[str, ...] = SPLITS
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images, labels)}`` from ``path``, checked against ``cfg`` (shape, dtype, label range).

    Real datasets are read by medmnist's dataset class for the flag; synthetic ones by ``np.load``,
    which is what that class does underneath.
    """
    return _source(cfg, NpzSource, "an npz dataset").read_arrays(path, splits)


def _source(cfg: DataConfig, kind: type[_Source], what: str) -> _Source:
    source = cfg.source
    if not isinstance(source, kind):
        raise ValueError(f"data.dataset {cfg.dataset!r} is not {what}")
    return source
