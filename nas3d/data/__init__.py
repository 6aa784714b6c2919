"""MedMNIST3D data and the user's own volumes, held on the device for training.

Three sources, one module each, behind one small protocol (:mod:`nas3d.data.source`): a MedMNIST
npz file (``medmnist_file``), synthetic data written in that npz format (``synthetic``), and a
manifest, a labels CSV naming NIfTI or NumPy volumes (``manifest``, ``manifest_source``, with
``hashes`` and ``preprocessing``). :class:`DataConfig` names the data and answers for its source;
:func:`load_splits` puts it on a device, and :func:`prepare_data` checks it when a study is created.
"""

from nas3d.data.config import DataConfig
from nas3d.data.errors import DatasetCorrupt, DatasetUnavailable, ManifestChanged, ManifestError
from nas3d.data.hashes import file_sha256, manifest_hashes
from nas3d.data.load import (
    PreparedManifest,
    check_data,
    check_manifest_unchanged,
    ensure_file,
    load_splits,
    prepare_data,
    prepare_manifest,
    read_arrays,
    resolve_manifest,
)
from nas3d.data.manifest import CACHE_DIR, Manifest, ManifestRow, class_order, is_manifest, read_manifest
from nas3d.data.medmnist_file import DATASETS, DOWNLOAD_TIMEOUT_S, SIZES
from nas3d.data.preprocessing import (
    CT_WINDOWS,
    NORMALISATIONS,
    PREPROCESS_VERSION,
    VOLUME_SUFFIXES,
    Preprocessing,
    Volume,
    prepare_for_model,
    prepare_image,
    prepare_sample,
    prepare_volume,
    read_sample,
    read_volume,
)
from nas3d.data.source import DataSource
from nas3d.data.splits import SPLITS, DataShape, DeviceData, Selection, Split, stratified_subset
from nas3d.data.synthetic import SYNTHETIC, SYNTHETIC_VERSION, write_synthetic_npz

__all__ = [
    "CACHE_DIR",
    "CT_WINDOWS",
    "DATASETS",
    "DOWNLOAD_TIMEOUT_S",
    "NORMALISATIONS",
    "PREPROCESS_VERSION",
    "SIZES",
    "SPLITS",
    "SYNTHETIC",
    "SYNTHETIC_VERSION",
    "VOLUME_SUFFIXES",
    "DataConfig",
    "DataShape",
    "DataSource",
    "DatasetCorrupt",
    "DatasetUnavailable",
    "DeviceData",
    "Manifest",
    "ManifestChanged",
    "ManifestError",
    "ManifestRow",
    "PreparedManifest",
    "Preprocessing",
    "Selection",
    "Split",
    "Volume",
    "check_data",
    "class_order",
    "check_manifest_unchanged",
    "ensure_file",
    "file_sha256",
    "is_manifest",
    "load_splits",
    "manifest_hashes",
    "prepare_data",
    "prepare_for_model",
    "prepare_image",
    "prepare_manifest",
    "prepare_sample",
    "prepare_volume",
    "read_arrays",
    "read_manifest",
    "read_sample",
    "read_volume",
    "resolve_manifest",
    "stratified_subset",
    "write_synthetic_npz",
]
