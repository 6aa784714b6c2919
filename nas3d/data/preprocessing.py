"""How a volume becomes model input: reading NIfTI and NumPy files, resampling, normalising.

The same steps prepare a manifest's samples for training and the volumes ``nas3d predict`` is given,
so a model sees its inputs in one way; :class:`Preprocessing` records the settings with the study and
in every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nas3d.data.errors import ManifestError
from nas3d.util import check_choice, one_line

#: How a manifest's volumes are scaled after resampling (DataConfig.normalise).
NORMALISATIONS = ("minmax", "zscore", "window")
#: Volume files a manifest may name.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".npz")
PREPROCESS_VERSION = 1  # bump when prepare_volume changes what it computes: old cache entries then miss


class BadVolume(ValueError):
    """A volume file that reads but is not a usable volume; the message completes "volume X ..."."""


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
                raise BadVolume(f"holds {len(npz.files)} arrays ({', '.join(npz.files[:4])}), expected one")
            array = npz[npz.files[0]]
    else:
        raise BadVolume(f"is not a volume file nas3d reads ({', '.join(VOLUME_SUFFIXES)})")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or 0 in array.shape:
        raise BadVolume(f"has shape {tuple(array.shape)}, expected (D, H, W) or channels and (D, H, W)")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == np.bool_):
        raise BadVolume(f"holds {array.dtype} values, expected numbers")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise BadVolume(f"holds {np.count_nonzero(~np.isfinite(array))} NaN or infinite values")
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
        except BadVolume as e:
            raise ManifestError(f"{where}: volume {image.name} {e}") from None
        except Exception as e:  # nibabel and numpy raise many kinds for a damaged file
            raise ManifestError(f"{where}: volume {image.name} is not readable ({type(e).__name__}: "
                                f"{one_line(e, 120)})") from None
        channels.append(prepare_volume(array, pre))
    return np.concatenate(channels)


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
