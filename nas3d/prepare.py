"""``nas3d prepare``: a manifest's samples written as the network sees them, to check the preprocessing
in any viewer.

Each sample becomes ``<name>.npy`` (float32 ``(C, S, S, S)``, exactly the model's input) and
``<name>.nii.gz`` (the same voxels, channels last, with the affine that places them in RAS millimetres),
named after the row's first image file (``-line<N>`` added where two rows share a name), and
``preprocessing.json`` holds the settings used. The settings are a study's (``--study-name``: as
recorded, the percentile bounds and spacing included, the very steps ``nas3d predict`` replays), or
those a study would record for this manifest (``--study FILE``, ``--size``, ``--set data.KEY=VALUE``).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas3d.config import resolve_study_config
from nas3d.data import DataConfig, Preprocessing, prepare_image, read_manifest, read_sample, resolve_manifest
from nas3d.util import atomic_write

__all__ = ["PlannedSample", "planned_files", "prepare_command", "write_prepared"]


def planned_files(manifest: str | Path, out: str | Path, *, overwrite: bool = False) -> list[PlannedSample]:
    """Where each sample of ``manifest`` goes in the folder ``out``, checked before anything is prepared:
    an existing file is replaced only with ``overwrite``."""
    table = read_manifest(manifest, labels=False)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the prepared samples")
    names: set[str] = set()
    planned = []
    for row in table.rows:
        name = Path(row.cells[0]).name.split(".")[0] or f"line{row.line}"
        if name in names:
            name = f"{name}-line{row.line}"
        names.add(name)
        planned.append(PlannedSample(table.where(row), row.images, out / f"{name}.npy",
                                     out / f"{name}.nii.gz"))
    existing = [path for sample in planned for path in (sample.array, sample.nifti) if path.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} exists; pass --force to overwrite, or choose another --out")
    return planned


@dataclass(frozen=True)
class PlannedSample:
    where: str  # the manifest's line, for errors
    images: tuple[Path, ...]
    array: Path
    nifti: Path


def write_prepared(planned: list[PlannedSample], pre: Preprocessing, out: str | Path) -> int:
    """Write each planned sample prepared by ``pre`` (see this module's docstring), and the settings
    as ``out/preprocessing.json``; returns the sample count."""
    import nibabel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for sample in planned:
        images, first = [], 0
        for volume in read_sample(sample.images, where=sample.where):
            images.append(prepare_image(volume, pre, first_channel=first))
            first += volume.array.shape[0]
        array = torch.cat([image.as_tensor() for image in images]).numpy().astype(np.float32)
        atomic_write(sample.array, lambda file, array=array: np.save(file, array, allow_pickle=False))
        voxels = np.moveaxis(array, 0, -1)  # NIfTI keeps channels last
        picture = nibabel.Nifti1Image(voxels[..., 0] if voxels.shape[-1] == 1 else voxels,
                                      images[0].affine.numpy())
        packed = gzip.compress(picture.to_bytes())
        atomic_write(sample.nifti, lambda file, packed=packed: file.write(packed))
    settings = json.dumps(pre.to_dict(), indent=2).encode()
    atomic_write(out / "preprocessing.json", lambda file: file.write(settings))
    return len(planned)


def _study_data(flags: Mapping[str, Any], storage: Any) -> DataConfig:
    """The data settings of ``--study-name`` in ``storage``, as recorded."""
    from nas3d.storages import make_storage, resolve_storage
    from nas3d.study import load_study

    _, config = load_study(flags["study_name"], make_storage(resolve_storage(storage), must_exist=True))
    if not config.data.is_manifest:
        raise ValueError(f"study {flags['study_name']!r} trains on {config.data.dataset}, not a manifest; "
                         "nas3d prepare shows how a manifest's volumes are prepared")
    return config.data


def prepare_command(flags: Mapping[str, Any], storage: Any) -> str:
    """``nas3d prepare`` by its flags; what to tell the user."""
    manifest = flags.get("manifest")
    if manifest:  # checked before the (slow) preparation
        planned = planned_files(manifest, flags["out"], overwrite=flags.get("force", False))
    if flags.get("study_name"):
        if flags.get("study") or flags.get("set") or flags.get("size"):
            raise ValueError("--study-name uses the study's recorded preprocessing; drop --study, --size and "
                             "--set, or drop --study-name")
        data = _study_data(flags, storage)
        pre = data.preprocessing
        if not manifest:
            manifest = data.dataset
            planned = planned_files(manifest, flags["out"], overwrite=flags.get("force", False))
    else:
        if not flags.get("manifest"):
            raise ValueError("prepare needs --manifest labels.csv (or --study-name of a manifest study)")
        config = resolve_study_config(flags.get("study"), manifest, flags, flags.get("set") or ())
        data = dataclasses.replace(config.data, dataset=str(Path(manifest).expanduser().absolute()))
        data = resolve_manifest(data)  # what a study would record: classes, spacing, percentile bounds
        pre = data.preprocessing
    count = write_prepared(planned, pre, flags["out"])
    spacing = "x".join(f"{v:g}" for v in pre.spacing) + " mm" if pre.spacing else "as stored"
    return (f"prepared {count} sample{'s' if count != 1 else ''} of {manifest} into {flags['out']} "
            f"({pre.size}^3, spacing {spacing}, normalise {pre.normalise}): a .npy and a .nii.gz each")
