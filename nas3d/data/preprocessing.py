"""How a volume becomes model input: reading NIfTI and NumPy files, geometry and intensity through
MONAI's transforms.

The same steps prepare a manifest's samples for training, ``nas3d prepare``'s files and the volumes
``nas3d predict`` is given, so a model sees its inputs in one way; :class:`Preprocessing` records the
settings (and the MONAI version) with the study and in every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nas3d.data.errors import ManifestError
from nas3d.util import check_choice, one_line

logger = logging.getLogger(__name__)

#: How a manifest's volumes are scaled (DataConfig.normalise); docs/own-data.md says which to choose.
NORMALISATIONS = ("percentile", "ct", "zscore", "minmax", "window")
#: Named CT windows in Hounsfield units, [low, high] = level ∓ width / 2: soft tissue W400 L40,
#: lung W1500 L-600, bone W1500 L300.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-450.0, 1050.0),
}
#: The share of the training split's voxel values below and above ``normalise = "percentile"``'s bounds.
PERCENTILES = (0.5, 99.5)
#: Voxels sampled per volume and channel for the percentile bounds (seeded; bounded memory).
PERCENTILE_SAMPLES = 20_000
#: Volume files a manifest may name.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".npz")
PREPROCESS_VERSION = 2  # bump when prepare_volume changes what it computes: old cache entries then miss


def monai_version() -> str:
    import monai

    return str(monai.__version__)


class BadVolume(ValueError):
    """A volume file that reads but is not a usable volume; the message completes "volume X ..."."""


@dataclass(frozen=True)
class Volume:
    """One volume file read: float32 channels ``(C, D, H, W)`` and its affine (voxel to RAS mm), None
    for NumPy files, which have none."""

    array: np.ndarray
    affine: np.ndarray | None


@dataclass(frozen=True)
class Preprocessing:
    """How one sample's volumes become model input, in this order, each step a MONAI transform (what
    ``nas3d predict`` repeats and docs/own-data.md spells out for ONNX users):

    1. each volume file is read as float32 channels (NIfTI with its affine: MONAI's ``NibabelReader``,
       as ``LoadImage`` reads it, a 4-D file's last axis is its channels; NumPy: a 4-D array's first axis is,
       and with no affine its voxels are taken as they are stored, isotropic);
    2. NIfTI only: reoriented to RAS (``Orientation``) and resampled to ``spacing`` mm
       (``Spacing``, bilinear; ``()``: not resampled);
    3. with ``crop_foreground``, cropped to the box of voxels above the volume's minimum
       (``CropForeground``);
    4. each channel's intensities scaled (``normalise``): ``percentile`` and ``ct`` and ``window``
       clip to ``[low, high]`` and scale to [0, 1] (``ScaleIntensityRange``; ``percentile``'s bounds
       per channel, ``bounds``, from the training split; ``ct`` and ``window``'s are ``window``),
       ``zscore`` to mean 0 and standard deviation 1 (``NormalizeIntensity``, population),
       ``minmax`` to [0, 1] per volume (``ScaleIntensity``; a constant volume gives 0);
    5. padded (or cropped) to a cube in millimetres about its centre (``ResizeWithPadOrCrop``, padded
       with each channel's minimum), then resized to ``size``³ (``Resize``, trilinear): physical
       proportions are kept;
    6. the channels of a sample's files are stacked in column order (``image``, ``image_2``, ...).
    """

    size: int
    channels: int
    normalise: str = "percentile"
    window: tuple[float, ...] = (0.0, 255.0)
    spacing: tuple[float, ...] = ()
    crop_foreground: bool = False
    bounds: tuple[tuple[float, float], ...] = ()  # "percentile": [low, high] per channel
    monai: str = ""  # the MONAI version that prepared the samples ("" = this one)
    # 1: a checkpoint from before geometry (each volume resized by its shape, then normalised), replayed so
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", tuple(float(v) for v in self.window))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "bounds", tuple((float(lo), float(hi)) for lo, hi in self.bounds))
        object.__setattr__(self, "monai", self.monai or monai_version())
        check_choice("normalise", self.normalise, NORMALISATIONS)

    def to_dict(self) -> dict[str, object]:
        return {"version": self.version, "size": self.size, "channels": self.channels,
                "normalise": self.normalise, "window": list(self.window), "spacing": list(self.spacing),
                "crop_foreground": self.crop_foreground, "bounds": [list(b) for b in self.bounds],
                "monai": self.monai}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Preprocessing:
        if data.get("version", 1) == 1:  # recorded before geometry and MONAI
            return cls(int(data["size"]), int(data["channels"]), str(data["normalise"]),  # type: ignore[call-overload]
                       tuple(data.get("window") or (0.0, 255.0)), monai="none", version=1)  # type: ignore[arg-type]
        return cls(**data)  # type: ignore[arg-type]

    def cache_key(self, file_hashes: tuple[str, ...]) -> str:
        """The cache entry of a sample whose volumes have these content hashes, prepared this way:
        every setting, the MONAI version and :data:`PREPROCESS_VERSION` are in it."""
        settings = {**self.to_dict(), "channels": None, "files": list(file_hashes)}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:40]

    def channel_bounds(self, channel: int) -> tuple[float, float]:
        """The ``[low, high]`` a channel is clipped to and scaled from (percentile, ct and window)."""
        if self.normalise != "percentile":
            return (self.window[0], self.window[1])
        if channel >= len(self.bounds):
            raise ManifestError(f"the preprocessing records percentile bounds for {len(self.bounds)} "
                                f"channel(s), but a sample has channel {channel + 1}")
        return self.bounds[channel]


def read_volume(path: Path) -> Volume:
    """A volume file as finite float32 channels ``(C, D, H, W)`` and its affine; ``ValueError`` saying
    what is wrong (what numpy or nibabel raise for a damaged file, else a message that completes
    "volume X ...")."""
    name = path.name.lower()
    affine = None
    if name.endswith((".nii", ".nii.gz")):
        from monai.data.image_reader import NibabelReader

        # LoadImage's reader, called directly: LoadImage would try every other reader on a damaged
        # file and log each failure, where one line naming the file is what the user needs.
        reader = NibabelReader()
        array, meta = reader.get_data(reader.read(str(path)))
        affine = np.asarray(meta["affine"], dtype=np.float64)
        array = np.asarray(array, dtype=np.float32)
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
    return Volume(array, affine)


def ras_spacing(path: Path) -> tuple[float, float, float] | None:
    """A NIfTI file's voxel spacing in mm along R, A and S (its header only), or None for NumPy files."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    import nibabel
    from nibabel.orientations import io_orientation

    image = nibabel.load(str(path))
    zooms = image.header.get_zooms()[:3]
    spacing = [1.0, 1.0, 1.0]
    for axis, (ras_axis, _flip) in enumerate(io_orientation(image.affine)):
        spacing[int(ras_axis)] = float(zooms[axis])
    return (spacing[0], spacing[1], spacing[2])


def median_spacing(paths: Sequence[Path]) -> tuple[float, ...]:
    """The median RAS spacing of the NIfTI files among ``paths`` (per axis, rounded to µm), ``()`` when
    there are none: the default target spacing of a manifest (``data.spacing``)."""
    found = []
    for path in paths:
        try:
            spacing = ras_spacing(path)
        except Exception:  # a missing or damaged file: named with its row when the samples are read
            continue
        if spacing is not None:
            found.append(spacing)
    if not found:
        return ()
    return tuple(round(float(v), 3) for v in np.median(np.array(found), axis=0))


def percentile_bounds(samples: Iterable[list[Volume]], seed: int = 0) -> tuple[tuple[float, float], ...]:
    """Per channel, the :data:`PERCENTILES` of the voxel values of ``samples`` (each a sample's volume
    files as read: the training split, as stored), from up to :data:`PERCENTILE_SAMPLES` voxels drawn
    from each volume and channel, seeded."""
    rng = np.random.default_rng(seed)
    drawn: list[list[np.ndarray]] = []
    for volumes in samples:
        channels = [channel.reshape(-1) for volume in volumes for channel in volume.array]
        while len(drawn) < len(channels):
            drawn.append([])
        for c, flat in enumerate(channels):
            if flat.size > PERCENTILE_SAMPLES:
                flat = flat[rng.choice(flat.size, PERCENTILE_SAMPLES, replace=False)]
            drawn[c].append(flat)
    out = []
    for values in drawn:
        low, high = (float(v) for v in np.percentile(np.concatenate(values), PERCENTILES))
        out.append((low, high if high > low else low + 1.0))  # a constant channel: any span maps it to 0
    return tuple(out)


def prepare_volume(volume: Volume | np.ndarray, pre: Preprocessing, *, first_channel: int = 0) -> np.ndarray:
    """One volume file's channels as the network sees them (see :class:`Preprocessing`): float32
    ``(C, S, S, S)``; ``first_channel`` is the index of its first channel in the sample."""
    return prepare_image(volume, pre, first_channel=first_channel).numpy()


def prepare_image(volume: Volume | np.ndarray, pre: Preprocessing, *, first_channel: int = 0):
    """:func:`prepare_volume` as a MONAI ``MetaTensor``, whose ``affine`` maps its voxels to RAS mm
    (what ``nas3d prepare`` writes beside the array)."""
    from monai.data import MetaTensor
    from monai.transforms import (
        CropForeground,
        NormalizeIntensity,
        Orientation,
        Resize,
        ResizeWithPadOrCrop,
        ScaleIntensity,
        ScaleIntensityRange,
        Spacing,
    )

    if not isinstance(volume, Volume):
        volume = Volume(np.asarray(volume, dtype=np.float32), None)
    array = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))
    if pre.version == 1:
        return MetaTensor(_by_shape(array, pre))
    if volume.affine is None:
        # NumPy: no affine; the voxels are taken as stored, each as wide as the target spacing's mean.
        side = float(np.mean(pre.spacing)) if pre.spacing else 1.0
        x = MetaTensor(array, affine=torch.diag(torch.tensor([side, side, side, 1.0], dtype=torch.float64)))
    else:
        x = MetaTensor(array, affine=torch.as_tensor(volume.affine, dtype=torch.float64))
        x = Orientation(axcodes="RAS", labels=None)(x)
        if pre.spacing:
            x = Spacing(pixdim=pre.spacing, mode="bilinear", padding_mode="border")(x)
    if pre.crop_foreground:
        minimum = float(x.min())
        x = CropForeground(select_fn=lambda v: v > minimum, allow_smaller=True)(x)
    channels = []
    for c in range(x.shape[0]):
        channel = x[c:c + 1]
        if pre.normalise in ("percentile", "ct", "window"):
            low, high = pre.channel_bounds(first_channel + c)
            channel = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(channel)
        elif pre.normalise == "zscore":
            channel = NormalizeIntensity()(channel)
        else:
            channel = ScaleIntensity(minv=0.0, maxv=1.0)(channel)
        channels.append(channel)
    x = torch.cat(channels) if len(channels) > 1 else channels[0]
    # A cube in millimetres about the centre: each axis padded to the longest extent, in its own voxels.
    pixdim = torch.linalg.norm(x.affine[:3, :3], dim=0).tolist()
    extent = max(n * d for n, d in zip(x.shape[1:], pixdim, strict=True))
    cube = [max(1, round(extent / d)) for d in pixdim]
    if list(x.shape[1:]) != cube:
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        # pad with each channel's minimum (the background: air, or the scanner's zero)
        x = ResizeWithPadOrCrop(cube, mode="constant", value=0.0)(x - low) + low
    return Resize((pre.size,) * 3, mode="trilinear", align_corners=False)(x)


def _by_shape(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Preprocessing version 1, replayed for its checkpoints: resized to ``size``³ by the voxel shape
    alone (trilinear), then each channel normalised (minmax, zscore or window)."""
    size = (pre.size,) * 3
    if tuple(x.shape[1:]) != size:
        x = torch.nn.functional.interpolate(x[None], size=size, mode="trilinear", align_corners=False)[0]
    flat, shape = x.reshape(x.shape[0], -1), (-1, 1, 1, 1)
    if pre.normalise == "minmax":
        low, high = flat.min(dim=1).values.view(shape), flat.max(dim=1).values.view(shape)
        return (x - low) / torch.where(high > low, high - low, torch.ones_like(high))
    if pre.normalise == "zscore":
        mean, std = flat.mean(dim=1).view(shape), flat.std(dim=1, correction=0).view(shape)
        return (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    low, high = pre.window
    return (x.clamp(low, high) - low) / (high - low)


def read_sample(images: tuple[Path, ...], *, where: str) -> list[Volume]:
    """One sample's volume files read (:func:`read_volume`); a one-line :class:`ManifestError`
    starting with ``where`` for a volume that cannot be read."""
    volumes = []
    for image in images:
        try:
            volumes.append(read_volume(image))
        except FileNotFoundError:
            raise ManifestError(f"{where}: volume {image} not found") from None
        except BadVolume as e:
            raise ManifestError(f"{where}: volume {image.name} {e}") from None
        except Exception as e:  # nibabel and numpy raise many kinds for a damaged file
            raise ManifestError(f"{where}: volume {image.name} is not readable ({type(e).__name__}: "
                                f"{one_line(e, 120)})") from None
    return volumes


def prepare_sample(images: tuple[Path, ...], pre: Preprocessing, *, where: str) -> np.ndarray:
    """One sample's volumes prepared and stacked into float32 ``(C, S, S, S)``; a one-line
    :class:`ManifestError` starting with ``where`` for a volume that cannot be read."""
    return prepare_volumes(read_sample(images, where=where), pre)


def prepare_volumes(volumes: list[Volume], pre: Preprocessing) -> np.ndarray:
    """One sample's volume files as read, prepared and stacked into float32 ``(C, S, S, S)``."""
    channels: list[np.ndarray] = []
    for volume in volumes:
        first = sum(len(c) for c in channels)
        channels.append(prepare_volume(volume, pre, first_channel=first))
    return np.concatenate(channels)


def prepare_for_model(
    samples: list[tuple[str, tuple[Path, ...]]], pre: Preprocessing
) -> np.ndarray:
    """Volumes to predict on (``(where, files)`` per sample) prepared as in training, float32
    ``(N, C, S, S, S)``; a one-line :class:`ManifestError` for a volume that is unreadable or has
    another channel count than ``pre.channels``."""
    if pre.monai not in ("none", monai_version()):
        logger.warning("the model's inputs were prepared with MONAI %s, this host has %s: predictions may "
                       "differ slightly; install MONAI %s to replay them exactly", pre.monai, monai_version(),
                       pre.monai)
    out = []
    for where, files in samples:
        sample = prepare_sample(files, pre, where=where)
        if sample.shape[0] != pre.channels:
            raise ManifestError(f"{where}: the sample has {sample.shape[0]} channel(s), but the model takes "
                                f"{pre.channels}")
        out.append(sample)
    return np.stack(out)
