"""Real geometry: NIfTI volumes reach the network by their affine and spacing (MONAI's Orientation,
Spacing, a cube in millimetres, Resize), so how a scanner stored a scan does not change what a model sees.

Tiny volumes (at most 32 voxels a side) and analytic objects, so the expected tensors are known."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch

from nas3d.checkpoint import checkpoint_data, load_checkpoint, save_checkpoint
from nas3d.data import DataConfig, Preprocessing, Volume, prepare_volume, read_volume, resolve_manifest
from nas3d.predict import write_predictions
from nas3d.registry import ModelRecipe
from nas3d.seeds import seed_architectures


def world_grid(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """The RAS millimetre coordinates ``(3, *shape)`` of every voxel centre of a grid with ``affine``."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:]).reshape(3, *shape)


def blob(points: np.ndarray, centre: tuple[float, ...], sigma: float, side: float = 60.0) -> np.ndarray:
    """A smooth Gaussian blob plus (``side`` > 0) a smaller one off to the right, front and top: not
    symmetric under any flip, so a mirrored volume would show."""
    c = np.array(centre)[:, None, None, None]
    main = np.exp(-((points - c) ** 2).sum(0) / (2 * sigma**2))
    off = np.exp(-((points - c - np.array([6.0, 4.0, 3.0])[:, None, None, None]) ** 2).sum(0) / 8.0)
    return (100.0 * main + side * off).astype(np.float32)


def stored(values_of: Callable[[np.ndarray], np.ndarray], shape: tuple[int, int, int],
           spacing: tuple[float, float, float], orientation: str = "RAS") -> Volume:
    """The object ``values_of(points)`` sampled on a grid of ``shape`` voxels of ``spacing`` mm covering
    the same field of view from 0, stored in RAS or LPS voxel order (as NIfTI's affine says)."""
    flips = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1)}[orientation]
    affine = np.eye(4)
    for axis, (flip, size, n) in enumerate(zip(flips, spacing, shape, strict=True)):
        affine[axis, axis] = flip * size
        # voxel centres at size/2, 3size/2, ... from 0 along each axis, whichever way it is stored
        affine[axis, 3] = size / 2 if flip > 0 else (n - 0.5) * size
    return Volume(values_of(world_grid(shape, affine))[None], affine)


def save_nifti(path: Path, volume: Volume) -> Path:
    nibabel.save(nibabel.Nifti1Image(volume.array[0], volume.affine), str(path))
    return path


ISO = Preprocessing(16, 1, "window", (0.0, 100.0), spacing=(1.0, 1.0, 1.0))


def test_the_same_object_stored_as_ras_and_as_lps_reaches_the_network_as_one_tensor(tmp_path: Path) -> None:
    obj = lambda p: blob(p, (12.0, 11.0, 10.0), 4.0)  # noqa: E731
    ras = stored(obj, (24, 22, 20), (1.0, 1.0, 1.0), "RAS")
    lps = stored(obj, (24, 22, 20), (1.0, 1.0, 1.0), "LPS")
    assert not np.allclose(ras.array, lps.array)  # stored mirrored...
    # ... read back from NIfTI files with their affines, and prepared the same
    a = prepare_volume(read_volume(save_nifti(tmp_path / "ras.nii.gz", ras)), ISO)
    b = prepare_volume(read_volume(save_nifti(tmp_path / "lps.nii.gz", lps)), ISO)
    assert np.abs(a - b).max() < 1e-5
    # and ignoring the affine would have mirrored it
    assert np.abs(prepare_volume(lps.array, ISO) - a).max() > 0.1


def test_the_same_object_at_isotropic_and_at_1x1x2_5_mm_spacing_reaches_the_network_alike() -> None:
    obj = lambda p: blob(p, (15.0, 15.0, 15.0), 5.0, side=0.0)  # noqa: E731 (smooth at 2.5 mm)
    iso = stored(obj, (30, 30, 30), (1.0, 1.0, 1.0))
    thick = stored(obj, (30, 30, 12), (1.0, 1.0, 2.5))  # the same 30 mm field of view in 12 slices
    a, b = prepare_volume(iso, ISO), prepare_volume(thick, ISO)
    assert np.abs(a - b).max() < 0.05 and np.abs(a - b).mean() < 0.005  # interpolation only


def test_a_sphere_in_a_non_cubic_field_of_view_stays_round(tmp_path: Path) -> None:
    radius = 10.0
    sphere = lambda p: (((p - np.array([30.0, 30.0, 15.0])[:, None, None, None]) ** 2).sum(0)  # noqa: E731
                        <= radius**2).astype(np.float32) * 100
    for spacing, shape in (((1.0, 1.0, 1.0), (60, 60, 30)), ((2.0, 2.0, 2.5), (30, 30, 12))):
        volume = read_volume(save_nifti(tmp_path / f"s{shape[2]}.nii.gz", stored(sphere, shape, spacing)))
        out = prepare_volume(volume, Preprocessing(30, 1, "window", (0.0, 100.0), spacing=spacing))[0]
        inside = out > 0.5
        # 60 mm across at 30 voxels: 2 mm each, so the sphere is 10 voxels across on every axis
        extents = [np.ptp(np.nonzero(inside.any(axis=tuple(a for a in range(3) if a != k)))[0]) + 1
                   for k in range(3)]
        assert max(extents) - min(extents) <= 1 and all(9 <= e <= 11 for e in extents), (spacing, extents)
        centre = np.array(np.nonzero(inside)).mean(1)
        assert np.allclose(centre, 14.5, atol=0.6)  # padded about the centre: the field of view's middle
    # resized by its voxel shape alone (as before), the 60 x 60 x 30 mm volume's sphere is twice as tall
    raw = torch.from_numpy(stored(sphere, (60, 60, 30), (1.0, 1.0, 1.0)).array)[None]
    by_shape = torch.nn.functional.interpolate(raw, size=(30,) * 3, mode="trilinear")[0, 0]
    assert np.ptp(np.nonzero((by_shape > 50).any(dim=(0, 1)).numpy())[0]) + 1 >= 19


def test_a_ct_window_keeps_hounsfield_units_comparable_across_volumes() -> None:
    # the same soft tissue (40 HU) beside air in one scan and beside bone in another
    tissue = np.full((1, 8, 8, 8), 40.0, np.float32)
    with_air, with_bone = tissue.copy(), tissue.copy()
    with_air[:, :2] = -1000.0
    with_bone[:, :2] = 1200.0
    ct = Preprocessing(8, 1, "ct", DataConfig(dataset="x.csv", normalise="ct").window)
    a, b = prepare_volume(with_air, ct), prepare_volume(with_bone, ct)
    assert np.allclose(a[:, 4:], 0.5) and np.allclose(b[:, 4:], 0.5)  # (40 + 160) / 400 in both
    assert a[:, 0].max() == 0 and b[:, 0].min() == 1  # air and bone clipped at the window's ends
    per_volume = Preprocessing(8, 1, "minmax")
    assert abs(float(prepare_volume(with_air, per_volume)[0, 6, 4, 4])
               - float(prepare_volume(with_bone, per_volume)[0, 6, 4, 4])) > 0.5  # what min-max loses


def test_crop_foreground_keeps_the_object_and_drops_the_empty_border() -> None:
    volume = np.zeros((1, 32, 32, 32), np.float32)
    volume[:, 12:20, 12:20, 12:20] = 100.0
    pre = Preprocessing(8, 1, "window", (0.0, 100.0), crop_foreground=True)
    out = prepare_volume(volume, pre)
    assert out.min() > 0.5  # the 8-voxel cube fills the whole input


def test_the_manifest_median_spacing_is_recorded_and_predict_on_a_reoriented_copy_agrees(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        spacing = (1.0, 1.0, 2.5) if i % 3 else (1.0, 1.0, 1.0)  # most at 2.5 mm: the median
        shape = (20, 20, 8) if i % 3 else (20, 20, 20)
        label = ("normal", "hyperplasia")[i % 2]
        sigma = 3.0 + 2.0 * (i % 2) + rng.uniform(-0.5, 0.5)
        volume = stored(lambda p, s=sigma: blob(p, (10.0, 10.0, 10.0), s), shape, spacing,
                        "LPS" if i % 2 else "RAS")
        save_nifti(tmp_path / f"case{i}.nii.gz", volume)
        rows.append({"image": f"case{i}.nii.gz", "label": label})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    resolved = resolve_manifest(DataConfig(dataset=str(tmp_path / "labels.csv"), size=12,
                                           search_fraction=1.0, normalise="zscore"))
    assert resolved.spacing == (1.0, 1.0, 2.5)
    assert resolved.classes == ("normal", "hyperplasia") and resolved.positive_class == "hyperplasia"
    architecture = seed_architectures()["adrenalmnist3d"]
    torch.manual_seed(0)
    model = ModelRecipe.of(architecture).build(1, 2)
    path = save_checkpoint(tmp_path / "m.pt", model, architecture, in_channels=1, num_classes=2,
                           input_size=12, metadata=checkpoint_data(resolved))
    assert load_checkpoint(path).preprocessing.spacing == (1.0, 1.0, 2.5)
    # a copy of case1 stored the other way round (RAS instead of LPS)
    original = read_volume(tmp_path / "case1.nii.gz")
    flipped = Volume(original.array[:, ::-1, ::-1].copy(), original.affine @ np.array(
        [[-1, 0, 0, 19], [0, -1, 0, 19], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float))
    save_nifti(tmp_path / "copy.nii.gz", flipped)
    write_predictions(path, tmp_path / "p.csv", volumes=[tmp_path / "case1.nii.gz", tmp_path / "copy.nii.gz"])
    a, b = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert abs(float(a["hyperplasia"]) - float(b["hyperplasia"])) < 1e-5


@pytest.mark.parametrize("name", ["ras", "lps"])
def test_nibabel_and_monai_agree_on_the_affine_read(tmp_path: Path, name: str) -> None:
    volume = stored(lambda p: blob(p, (5.0, 5.0, 5.0), 2.0), (10, 10, 4), (1.0, 1.0, 2.5), name.upper())
    read = read_volume(save_nifti(tmp_path / "v.nii.gz", volume))
    assert np.allclose(read.affine, volume.affine) and np.array_equal(read.array, volume.array)


@pytest.mark.parametrize("pre", [
    Preprocessing(12, 1, "percentile", spacing=(1.0, 1.0, 2.0), bounds=[(-50.0, 300.0)]),
    Preprocessing(12, 1, "zscore", spacing=(1.2, 1.0, 2.5), crop_foreground=True),
    Preprocessing(10, 1, "ct", (-160.0, 240.0)),
], ids=["percentile", "zscore-foreground", "ct-as-stored"])
def test_the_onnx_walk_through_of_the_docs_prepares_as_nas3d_does(tmp_path: Path, pre: Preprocessing) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "own-data.md").read_text()
    code = doc[doc.index("```python\nimport json, numpy"):]
    code = code[len("```python\n"):code.index("\n```")]
    steps = code[:code.index("session = ")] + code[code.index("x = LoadImage"):code.index("probabilities = ")]
    array = (np.random.default_rng(0).random((20, 18, 7)) * 500 - 100).astype(np.float32)
    affine = np.array([[-1.0, 0, 0, 19], [0, -1.2, 0, 20], [0, 0, 2.5, 0], [0, 0, 0, 1]])
    path = save_nifti(tmp_path / "scan.nii.gz", Volume(array[None], affine))
    namespace = {"pre": json.loads(json.dumps(pre.to_dict()))}  # as the ONNX file's metadata holds it
    steps = steps.replace('"scan.nii.gz"', repr(str(path))).replace(" onnxruntime,", "")  # the model aside
    exec(steps, namespace)
    assert np.array_equal(namespace["x"].numpy(), prepare_volume(read_volume(path), pre))
