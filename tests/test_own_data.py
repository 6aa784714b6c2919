"""Your own volumes in (a labels CSV naming NIfTI and NumPy files), a deployable model out: manifests,
their cache, splits and checks, `nas3d predict`, ONNX export, and the walk-through of docs/own-data.md."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch

from nas3d import data as data_module
from nas3d.baselines import BASELINES
from nas3d.checkpoint import load_checkpoint, save_checkpoint
from nas3d.data import (
    CACHE_DIR,
    CT_WINDOWS,
    DataConfig,
    Manifest,
    ManifestChanged,
    ManifestError,
    Preprocessing,
    class_order,
    hashes,
    load_splits,
    manifest_source,
    prepare_manifest,
    prepare_volume,
    preprocessing,
    read_manifest,
    resolve_manifest,
    write_synthetic_npz,
)
from nas3d.export import export_onnx
from nas3d.predict import write_predictions
from nas3d.registry import ModelRecipe
from nas3d.seeds import seed_architectures
from nas3d.space import SearchSpace, sample_architecture

REPO = Path(__file__).resolve().parents[1]
REAL_ADRENAL = REPO.parent / "shared" / "data" / "adrenalmnist3d.npz"


def write_volume(path: Path, array: np.ndarray) -> Path:
    """``array`` as NIfTI (``.nii``/``.nii.gz``, identity affine) or NumPy (``.npy``), by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".nii", ".nii.gz")):
        nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(path))
    else:
        np.save(path, array)
    return path


def write_manifest(folder: Path, rows: list[dict[str, str]], name: str = "labels.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def nifti_folder(folder: Path, *, n: int = 24, classes: tuple[str, ...] = ("benign", "malignant"),
                 shape: tuple[int, int, int] = (10, 11, 9), seed: int = 0, channels: int = 1) -> Path:
    """A folder of small NIfTI and .npy volumes (every third one .npy) whose class shifts their
    brightness, and its labels CSV (``channels`` > 1: image, image_2, ... columns)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = classes[i % len(classes)]
        row = {}
        for c in range(channels):
            vol = (rng.normal(size=shape) + 2.0 * classes.index(label) + c).astype(np.float32)
            name = f"case{i:03d}_{c}.{'npy' if i % 3 == 0 else 'nii.gz'}"
            write_volume(folder / "volumes" / name, vol)
            row["image" if c == 0 else f"image_{c + 1}"] = f"volumes/{name}"
        rows.append({**row, "label": label})
    return write_manifest(folder, rows)


def medmnist_as_nifti(npz: Path, folder: Path) -> Path:
    """A MedMNIST-format npz written out as one NIfTI per volume plus a CSV with its official splits."""
    rows = []
    with np.load(npz) as arrays:
        for split in ("train", "val", "test"):
            for i, (image, label) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"],
                                                   strict=True)):
                name = f"{split}/{i:05d}.nii"
                write_volume(folder / name, image)
                rows.append({"image": name, "label": str(int(label[0])), "split": split})
    return write_manifest(folder, rows)


def manifest_config(csv_path: Path, **changes: object) -> DataConfig:
    return DataConfig(**{"dataset": str(csv_path), "size": 8, "search_fraction": 1.0, **changes})


# --- manifests -------------------------------------------------------------------------------------


def test_a_manifest_resolves_to_classes_channels_and_a_content_hash(tmp_path: Path) -> None:
    csv_path = nifti_folder(tmp_path / "own", channels=2)
    resolved = resolve_manifest(manifest_config(csv_path))
    assert resolved.classes == ("benign", "malignant") and resolved.channels == 2
    assert resolved.task == "binary-class" and resolved.num_classes == 2 and resolved.in_channels == 2
    assert len(resolved.manifest_hash) == 64 and Path(resolved.dataset).is_absolute()
    data = load_splits(resolved, "cpu", for_search=False)
    assert data.train.images.dtype == torch.float32 and tuple(data.train.images.shape[1:]) == (2, 8, 8, 8)
    assert len(data.train) + len(data.val) + len(data.test) == 24
    images, _ = data.train.batch(slice(None))
    assert images.min() >= 0 and images.max() <= 1  # minmax, the default
    assert len(list((csv_path.parent / CACHE_DIR).glob("*.npy"))) == 24


def test_a_manifest_search_records_the_whole_val_split_beside_its_share(tmp_path: Path) -> None:
    csv_path = nifti_folder(tmp_path, n=40)
    resolved = resolve_manifest(manifest_config(csv_path, search_fraction=0.5, record_full_val=True))
    search = load_splits(resolved, "cpu", for_search=True)
    whole = load_splits(resolved, "cpu", for_search=False)
    assert torch.equal(search.full_val.images, whole.val.images)
    assert 0 < len(search.val) < len(whole.val) and 0 < len(search.train) < len(whole.train)
    scored_whole = load_splits(dataclasses.replace(resolved, search_val_fraction=1.0), "cpu", for_search=True)
    assert torch.equal(scored_whole.val.images, whole.val.images) and scored_whole.full_val is None


def test_integer_labels_keep_their_numbers_and_multi_class_works(tmp_path: Path) -> None:
    csv_path = nifti_folder(tmp_path, n=30, classes=("2", "0", "1"))
    resolved = resolve_manifest(manifest_config(csv_path))
    assert resolved.classes == ("0", "1", "2") and resolved.task == "multi-class"


def _labels_only(folder: Path, labels: list[str], **extra: str) -> Manifest:
    """A manifest of these labels (its volumes are never read: class_order looks at labels only)."""
    rows = [{"image": f"v{i}.npy", "label": label, **extra} for i, label in enumerate(labels)]
    return read_manifest(write_manifest(folder, rows))


@pytest.mark.parametrize(
    ("labels", "classes", "positive", "expected", "why"),
    [
        # alphabetical order would make "normal" positive; a negative-sounding name is the negative class
        (["normal"] * 6 + ["hyperplasia"] * 6, (), "", ("normal", "hyperplasia"), "'normal' reads as"),
        (["Healthy"] * 6 + ["tumour"] * 6, (), "", ("Healthy", "tumour"), "'Healthy' reads as the negative"),
        (["b"] * 4 + ["a"] * 8, (), "", ("a", "b"), "the rarer class: 4 rows against 8"),
        (["0"] * 6 + ["1"] * 6, (), "", ("0", "1"), "of integer labels, the higher is positive"),
        (["normal"] * 6 + ["hyperplasia"] * 6, (), "normal", ("hyperplasia", "normal"), ""),
        (["normal"] * 6 + ["hyperplasia"] * 6, ("hyperplasia", "normal"), "", ("hyperplasia", "normal"), ""),
    ],
    ids=["negative-name", "negative-name-case", "rarer", "integers", "positive_class", "classes"],
)
def test_the_positive_class_of_a_binary_manifest_is_set_or_chosen_by_a_stated_rule(
    tmp_path: Path, labels, classes, positive, expected, why
) -> None:
    order, chosen, reason = class_order(_labels_only(tmp_path, labels), classes, positive)
    assert order == expected and chosen == expected[1] and why in reason and bool(reason) == bool(why)


@pytest.mark.parametrize(
    ("labels", "classes", "positive", "expected"),
    [
        (["normal"] * 6 + ["hyperplasia"] * 5 + ["hyperplsia"], (), "",
         "line 13: label 'hyperplsia' is on 1 row(s) only (a class needs 3); did you mean 'hyperplasia'?"),
        (["normal"] * 6 + ["hyperplsia"] * 6, ("normal", "hyperplasia"), "",
         "line 8: label 'hyperplsia' is not one of the classes ['normal', 'hyperplasia'] (data.classes); "
         "did you mean 'hyperplasia'?"),
        (["normal"] * 6 + ["hyperplasia"] * 6, (), "hyperplasi", "did you mean 'hyperplasia'?"),
        (["normal"] * 6 + ["hyperplasia"] * 6, ("hyperplasia", "normal"), "hyperplasia", "swap them"),
        (["a", "b", "c"] * 4, (), "a", "data.positive_class is for a binary task"),
    ],
    ids=["typo", "typo-of-a-given-class", "positive-typo", "positive-first", "multi-class"],
)
def test_a_label_typo_or_a_bad_positive_class_is_one_line_naming_the_fix(
    tmp_path: Path, labels, classes, positive, expected
) -> None:
    with pytest.raises(ManifestError) as info:
        class_order(_labels_only(tmp_path, labels), classes, positive)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_study_creation_says_which_class_is_positive_and_the_split_sizes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from nas3d.config import StudyConfig, StudySettings
    from nas3d.report import status_report
    from nas3d.study import prepare_study

    csv_path = nifti_folder(tmp_path / "own", classes=("normal", "hyperplasia"))
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with caplog.at_level("INFO", logger="nas3d.data"):
        prepare_study(StudyConfig(study=StudySettings(name="mine"), data=manifest_config(csv_path)), url)
    said = caplog.text
    assert "positive class 'hyperplasia' ('normal' reads as the negative class); set data.positive" in said
    assert "no split column: split stratified by class" in said and "into 16 train, 4 val, 4 test" in said
    status = status_report(url, "mine")
    assert status.startswith("study mine: 0 trials for a budget of 200\n")
    assert "positive class 'hyperplasia'" in status


def test_the_status_line_counts_free_trials_apart_from_the_budget() -> None:
    import optuna

    from nas3d import records
    from nas3d.config import StudyConfig, StudySettings
    from nas3d.report import format_status

    study = optuna.create_study(study_name="s", directions=["maximize", "minimize"])
    study.set_user_attr(records.CONFIG, StudyConfig(study=StudySettings(name="s", n_trials=3)).to_dict())
    for number in range(5):  # three trained, two decided without training
        if number < 3:
            study.add_trial(optuna.trial.create_trial(values=[0.6, 1e6]))
        else:
            study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                                      user_attrs={records.NOT_TRAINED: "duplicate"}))
    assert format_status(study).startswith("study s: 5 trials for a budget of 3 (2 free); complete 3, fail 2")


def test_the_second_read_comes_from_the_cache_and_a_changed_volume_misses_only_its_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv_path = nifti_folder(tmp_path)
    cfg = manifest_config(csv_path, normalise="zscore")  # per volume: one volume's change is its own
    first = prepare_manifest(cfg)
    read = []
    original = preprocessing.read_volume
    monkeypatch.setattr(preprocessing, "read_volume", lambda path: read.append(path.name) or original(path))
    again = prepare_manifest(cfg)
    assert read == [] and np.array_equal(first.images, again.images)
    write_volume(tmp_path / "volumes" / "case001_0.nii.gz", np.ones((10, 11, 9), np.float32))
    changed = prepare_manifest(cfg)
    assert read == ["case001_0.nii.gz"] and changed.config.manifest_hash != first.config.manifest_hash
    # other preprocessing settings are other entries
    prepare_manifest(dataclasses.replace(cfg, normalise="minmax"))
    assert len(read) == 25
    prepare_manifest(dataclasses.replace(cfg, normalise="minmax", spacing=(1.0, 1.0, 2.0)))
    assert len(read) == 49


def test_percentile_bounds_come_from_the_training_split_once_and_a_changed_one_prepares_all_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv_path = nifti_folder(tmp_path)
    first = prepare_manifest(manifest_config(csv_path))  # percentile, the default
    (low, high), = first.config.percentile_bounds
    rows = list(csv.DictReader(open(csv_path)))
    files = [tmp_path / rows[i]["image"] for i in first.splits["train"]]
    values = np.concatenate([(np.load(f) if f.suffix == ".npy" else nibabel.load(f).get_fdata()).reshape(-1)
                             for f in files])
    assert np.allclose((low, high), np.percentile(values, (0.5, 99.5)), atol=1e-4)
    read = []
    original = preprocessing.read_volume
    monkeypatch.setattr(preprocessing, "read_volume", lambda path: read.append(path.name) or original(path))
    again = prepare_manifest(manifest_config(csv_path))
    assert read == [] and again.config.percentile_bounds == first.config.percentile_bounds
    assert np.array_equal(again.images, first.images)
    train_row = rows[int(first.splits["train"][0])]["image"]
    write_volume(tmp_path / train_row, np.full((10, 11, 9), 50.0, np.float32))
    changed = prepare_manifest(manifest_config(csv_path))
    assert changed.config.percentile_bounds != first.config.percentile_bounds
    assert len(read) >= 24  # the bounds changed: every sample is prepared again, none mixed


def test_a_recorded_hash_the_files_no_longer_have_is_refused(tmp_path: Path) -> None:
    csv_path = nifti_folder(tmp_path)
    resolved = resolve_manifest(manifest_config(csv_path))
    data_module.check_manifest_unchanged(resolved)
    write_volume(tmp_path / "volumes" / "case002_0.nii.gz", np.zeros((10, 11, 9), np.float32))
    with pytest.raises(ManifestChanged, match="changed since the study was created") as info:
        load_splits(resolved, "cpu", for_search=True)
    assert "\n" not in str(info.value)


def test_file_hashes_are_kept_across_processes_and_a_touched_file_is_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv_path = nifti_folder(tmp_path)
    resolved = resolve_manifest(manifest_config(csv_path))
    assert (tmp_path / CACHE_DIR / hashes.HASHES_FILE).is_file()
    # a new process: no in-process cache in front of the hashing, only the file in the cache folder
    hashed: list[str] = []
    uncached = hashes._sha256.__wrapped__
    monkeypatch.setattr(hashes, "_sha256",
                        lambda path, *key: hashed.append(Path(path).name) or uncached(path, *key))
    data_module.check_manifest_unchanged(resolved)
    assert hashed == []
    volume = tmp_path / "volumes" / "case004_0.nii.gz"
    os.utime(volume, ns=(volume.stat().st_atime_ns, volume.stat().st_mtime_ns + 10**9))
    data_module.check_manifest_unchanged(resolved)  # the same bytes: hashed again, and still the same
    assert hashed == ["case004_0.nii.gz"]
    data_module.check_manifest_unchanged(resolved)
    assert hashed == ["case004_0.nii.gz"]  # its new size and mtime were kept
    (tmp_path / CACHE_DIR / hashes.HASHES_FILE).write_text("{not json")  # damaged: hashed again, no error
    data_module.check_manifest_unchanged(resolved)
    assert len(hashed) == 1 + 25  # every volume and the CSV


def test_a_manifest_resolved_then_loaded_in_one_process_is_prepared_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a study created and searched in one process (nas3d search), or a retrain: resolve, then load
    csv_path = nifti_folder(tmp_path)
    resolved = resolve_manifest(manifest_config(csv_path))
    entries: list[Path] = []
    original = manifest_source._read_cache_entry
    monkeypatch.setattr(manifest_source, "_read_cache_entry",
                        lambda entry, size: entries.append(entry) or original(entry, size))
    data = load_splits(resolved, "cpu", for_search=False)
    assert entries == [] and len(data.train) + len(data.val) + len(data.test or ()) == 24
    load_splits(resolved, "cpu", for_search=False)  # not held once on the device: read from the cache
    assert len(entries) == 24
    # a recorded manifest (a retrain of a study's model) is checked by its hashes; only the load prepares
    assert resolve_manifest(resolved) == resolved and len(entries) == 24
    load_splits(resolved, "cpu", for_search=False)
    assert len(entries) == 48


def test_a_study_made_again_from_changed_files_is_refused(tmp_path: Path) -> None:
    from nas3d.config import StudyConfig, StudySettings
    from nas3d.study import prepare_study

    csv_path = nifti_folder(tmp_path / "own")
    config = StudyConfig(study=StudySettings(name="mine"), data=manifest_config(csv_path))
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    prepare_study(config, url)
    prepare_study(config, url)  # the same files: the same study
    write_volume(tmp_path / "own" / "volumes" / "case001_0.nii.gz", np.ones((10, 11, 9), np.float32))
    with pytest.raises(ValueError, match="was created from other contents of manifest"):
        prepare_study(config, url)


def test_without_a_split_column_the_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    csv_path = nifti_folder(tmp_path, n=40)
    cfg = manifest_config(csv_path, split_fractions=(0.5, 0.25, 0.25))
    a, b = prepare_manifest(cfg), prepare_manifest(cfg)
    assert all(np.array_equal(a.splits[s], b.splits[s]) for s in ("train", "val", "test"))
    assert [len(a.splits[s]) for s in ("train", "val", "test")] == [20, 10, 10]
    for split in a.splits.values():  # each class half of each split
        assert np.bincount(a.labels[split]).tolist() == [len(split) // 2] * 2
    other = prepare_manifest(dataclasses.replace(cfg, split_seed=1))
    assert not np.array_equal(a.splits["val"], other.splits["val"])


def test_a_split_column_is_followed(tmp_path: Path) -> None:
    rows = [{"image": f"v{i}.npy", "label": str(i % 2), "split": ("train", "val", "test")[i % 3]}
            for i in range(18)]
    for i in range(18):
        write_volume(tmp_path / f"v{i}.npy", np.full((6, 6, 6), float(i), np.float32))
    prepared = prepare_manifest(manifest_config(write_manifest(tmp_path, rows), size=6))
    assert prepared.splits["val"].tolist() == [1, 4, 7, 10, 13, 16]


@pytest.mark.parametrize("normalise", ["minmax", "zscore", "window", "ct", "percentile"])
def test_normalisations(normalise: str) -> None:
    volume = np.arange(4 * 4 * 4, dtype=np.float32).reshape(1, 4, 4, 4) * 10
    out = prepare_volume(volume, Preprocessing(4, 1, normalise, (0.0, 100.0), bounds=[(0.0, 100.0)]))
    if normalise == "minmax":
        assert out.min() == 0 and out.max() == 1
    elif normalise == "zscore":
        assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-5
    else:  # clipped to [0, 100] and scaled to [0, 1]: the window's, or the recorded percentile bounds
        assert out.min() == 0 and out.max() == 1 and np.count_nonzero(out == 1) == 64 - 10


def test_a_named_ct_window_is_its_hounsfield_bounds() -> None:
    assert CT_WINDOWS == {"soft_tissue": (-160.0, 240.0), "lung": (-1350.0, 150.0), "bone": (-450.0, 1050.0)}
    assert DataConfig(dataset="x.csv", normalise="ct").window == (-160.0, 240.0)  # the default window
    assert DataConfig(dataset="x.csv", normalise="ct", window="lung").window == (-1350.0, 150.0)
    assert DataConfig(dataset="x.csv", normalise="ct", window=[-100, 300]).window == (-100.0, 300.0)
    assert DataConfig(dataset="x.csv", normalise="window").window == (0.0, 255.0)
    with pytest.raises(ValueError, match="unknown CT window 'lungs'. Did you mean 'lung'"):
        DataConfig(dataset="x.csv", normalise="ct", window="lungs")


def test_a_numpy_volume_is_taken_as_stored_padded_to_a_cube_and_resized_trilinearly() -> None:
    volume = np.random.default_rng(0).random((1, 10, 7, 13)).astype(np.float32)
    out = prepare_volume(volume, Preprocessing(6, 1, "window", (0.0, 1.0)))
    # no affine: the voxels as stored, padded about the centre to 13³ with the minimum, then resized
    low = volume.min()
    cube = np.pad(volume[0], ((1, 2), (3, 3), (0, 0)), constant_values=low)
    expected = torch.nn.functional.interpolate(torch.from_numpy(cube)[None, None], size=(6, 6, 6),
                                               mode="trilinear", align_corners=False)[0]
    assert np.allclose(out, expected.numpy(), atol=1e-6)


def _medmnist_equivalence(npz: Path, medmnist_cfg: DataConfig, tmp_path: Path) -> None:
    csv_path = medmnist_as_nifti(npz, tmp_path / "nifti")
    own = DataConfig(dataset=str(csv_path), size=medmnist_cfg.size, normalise="window", window=(0.0, 255.0),
                     search_fraction=1.0)
    mine = load_splits(own, "cpu", for_search=False)
    theirs = load_splits(medmnist_cfg, "cpu", for_search=False)
    assert mine.num_classes == theirs.num_classes and mine.in_channels == theirs.in_channels
    for split in ("train", "val", "test"):
        a, b = getattr(mine, split).batch(slice(None)), getattr(theirs, split).batch(slice(None))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), split


def test_a_medmnist_npz_as_a_nifti_folder_gives_the_same_tensors(tmp_path: Path) -> None:
    npz = write_synthetic_npz(tmp_path / "data" / "synthetic.npz", num_classes=3, n_train=18, n_val=9,
                              n_test=9, size=10, seed=3)
    cfg = DataConfig(dataset="synthetic", size=10, root=str(tmp_path / "data"), synthetic_classes=3,
                     synthetic_samples=36, search_fraction=1.0)
    npz.rename(cfg.data_root / cfg.file_name)
    _medmnist_equivalence(cfg.data_root / cfg.file_name, cfg, tmp_path)


@pytest.mark.skipif(not REAL_ADRENAL.parent.is_dir(), reason="no ../shared/data beside the repo")
def test_the_real_adrenalmnist3d_as_a_nifti_folder_gives_the_same_tensors(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="adrenalmnist3d", size=28, root=str(REAL_ADRENAL.parent), download=False,
                     search_fraction=1.0)
    _medmnist_equivalence(REAL_ADRENAL, cfg, tmp_path)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda folder: (folder / "volumes" / "case004_0.nii.gz").unlink(), "line 6: volume 'volumes/case"),
        (lambda folder: (folder / "volumes" / "case004_0.nii.gz").write_bytes(b"garbage"), "line 6: volume "),
        (lambda folder: write_volume(folder / "volumes" / "case004_0.nii.gz",
                                     np.full((4, 4, 4), np.nan, np.float32)), "NaN or infinite"),
        (lambda folder: write_volume(folder / "volumes" / "case004_0.nii.gz",
                                     np.zeros((4, 4, 4, 2), np.float32)), "has 2 channel(s), but line 2"),
    ],
    ids=["missing", "unreadable", "nan", "channels"],
)
def test_a_bad_volume_is_one_line_naming_its_row_and_caches_nothing(tmp_path: Path, edit, expected) -> None:
    csv_path = nifti_folder(tmp_path)
    edit(tmp_path)
    with pytest.raises(ManifestError) as info:
        resolve_manifest(manifest_config(csv_path))
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / CACHE_DIR).exists()


def test_prepare_writes_what_the_network_sees_with_its_affine(tmp_path: Path) -> None:
    from nas3d.cli import main
    from nas3d.config import StudyConfig, StudySettings
    from nas3d.study import prepare_study

    csv_path = nifti_folder(tmp_path / "own", n=12)
    out = tmp_path / "seen"
    assert main(["prepare", "--manifest", str(csv_path), "--size", "8", "--out", str(out)]) == 0
    trained = prepare_manifest(manifest_config(csv_path))  # what a search of the same settings trains on
    rows = list(csv.DictReader(open(csv_path)))
    for i, row in enumerate(rows):
        name = Path(row["image"]).name.split(".")[0]
        array = np.load(out / f"{name}.npy")
        assert array.dtype == np.float32 and array.shape == (1, 8, 8, 8)
        assert np.allclose(array, trained.images[i], atol=1e-6), name
    picture = nibabel.load(out / "case001_0.nii.gz")
    assert np.allclose(picture.get_fdata(), np.load(out / "case001_0.npy")[0], atol=1e-6)
    # (10, 11, 9) voxels of 1 mm padded to an 11 mm cube, 8 voxels across: 11/8 mm each; the odd voxel
    # of padding along R goes after, so the cube's centre is the volume's (4.5, 5, 4) but for half a voxel
    assert np.allclose(np.diag(picture.affine)[:3], 11 / 8)
    centre = picture.affine @ np.array([3.5, 3.5, 3.5, 1.0])
    assert np.allclose(centre[:3], [5.0, 5.0, 4.0])
    settings = json.loads((out / "preprocessing.json").read_text())
    assert settings["normalise"] == "percentile" and settings["bounds"] == [list(b) for b in
                                                                             trained.config.percentile_bounds]
    assert main(["prepare", "--manifest", str(csv_path), "--size", "8", "--out", str(out)]) == 2  # exists
    # a study's recorded preprocessing, as predict replays it
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    zscore = manifest_config(csv_path, normalise="zscore")
    prepare_study(StudyConfig(study=StudySettings(name="mine"), data=zscore), url)
    assert main(["prepare", "--study-name", "mine", "--storage", url, "--out", str(out), "--force"]) == 0
    zscored = prepare_manifest(zscore)
    assert np.allclose(np.load(out / "case000_0.npy"), zscored.images[0], atol=1e-6)


# --- checkpoints, predict, ONNX --------------------------------------------------------------------

TINY = seed_architectures()["adrenalmnist3d"]


def _checkpoint(path: Path, recipe, data: DataConfig, size: int = 8, in_channels: int = 1) -> Path:
    from nas3d.checkpoint import checkpoint_data

    torch.manual_seed(0)
    model = ModelRecipe.of(recipe).build(in_channels, data.num_classes)
    return save_checkpoint(path, model, recipe, in_channels=in_channels, num_classes=data.num_classes,
                           input_size=size, metadata={"dataset": data.name, **checkpoint_data(data)})


def test_predict_writes_a_row_per_volume_with_class_columns(tmp_path: Path) -> None:
    csv_path = nifti_folder(tmp_path / "own")
    resolved = resolve_manifest(manifest_config(csv_path))
    checkpoint = load_checkpoint(_checkpoint(tmp_path / "m.pt", TINY, resolved))
    assert checkpoint.class_names == ("benign", "malignant")
    assert checkpoint.preprocessing == Preprocessing(8, 1, "percentile", (0.0, 255.0), (1.0, 1.0, 1.0),
                                                     bounds=resolved.percentile_bounds)
    out, rows = write_predictions(tmp_path / "m.pt", tmp_path / "p.csv", manifest=csv_path)
    table = list(csv.DictReader(open(out)))
    assert rows == 24 and list(table[0])[:5] == ["image", "label", "benign", "malignant", "predicted"]
    # the same probabilities as the model on the training tensors of those volumes
    prepared = prepare_manifest(resolved)
    expected = torch.softmax(checkpoint.build()(torch.from_numpy(prepared.images)), 1).detach().numpy()
    got = np.array([[float(r["benign"]), float(r["malignant"])] for r in table])
    assert np.allclose(got, expected, atol=1e-5)
    assert [r["predicted"] for r in table] == [("benign", "malignant")[i] for i in expected.argmax(1)]
    volumes = [str(tmp_path / "own" / "volumes" / "case000_0.npy")]
    write_predictions(tmp_path / "m.pt", tmp_path / "one.csv", volumes=volumes)
    assert list(csv.DictReader(open(tmp_path / "one.csv")))[0]["image"] == volumes[0]


def test_retrain_on_a_manifest_tests_on_its_test_split_and_its_checkpoint_predicts(tmp_path: Path) -> None:
    from nas3d.retrain import RetrainConfig, RetrainSource, retrain

    csv_path = nifti_folder(tmp_path / "own")
    source = RetrainSource.from_architecture("tiny", TINY)
    report = retrain(source, manifest_config(csv_path), RetrainConfig.of(epochs=1, seeds=(0,), batch_size=8),
                     "cpu", tmp_path / "out")
    assert report.results["samples"] == {"train": 16, "val": 4, "test": 4} and not report.failed
    checkpoint = load_checkpoint(tmp_path / "out" / "seed-0.pt")
    assert checkpoint.class_names == ("benign", "malignant") and checkpoint.preprocessing.channels == 1
    _, rows = write_predictions(tmp_path / "out" / "seed-0.pt", tmp_path / "p.csv", manifest=csv_path)
    assert rows == 24


def test_a_medmnist_checkpoint_predicts_with_medmnist_class_names(tmp_path: Path) -> None:
    data = DataConfig(dataset="adrenalmnist3d", size=28)
    path = _checkpoint(tmp_path / "m.pt", TINY, data, size=28)
    raw = torch.load(path, weights_only=True)
    for key in ("classes", "preprocessing", "data"):  # as written before these were recorded
        raw["metadata"].pop(key)
    torch.save(raw, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.class_names == ("normal", "hyperplasia")
    assert checkpoint.preprocessing == Preprocessing(28, 1, "window", (0.0, 255.0))


def test_predict_and_export_refuse_an_onnx_or_foreign_file_in_one_line_of_their_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nas3d.cli import main

    data = DataConfig(dataset="synthetic", size=8)
    export_onnx(load_checkpoint(_checkpoint(tmp_path / "m.pt", TINY, data)), tmp_path / "model.onnx")
    (tmp_path / "model.bin").write_bytes((tmp_path / "model.onnx").read_bytes())  # an ONNX file by content
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")  # a whole module: unpickling would run code
    (tmp_path / "notes.pt").write_text("not a model")
    write_volume(tmp_path / "v.npy", np.zeros((8, 8, 8), np.float32))
    expected = {"model.onnx": "is an ONNX model (run it with onnxruntime", "model.bin": "is an ONNX model",
                "pickled.pt": "is a PyTorch file holding Python objects", "notes.pt": "is not a PyTorch file"}
    for name, says in expected.items():
        for argv in (["predict", "--checkpoint", str(tmp_path / name), str(tmp_path / "v.npy"),
                      "--out", str(tmp_path / "p.csv")],
                     ["export", "--checkpoint", str(tmp_path / name), "--format", "onnx",
                      "--out", str(tmp_path / "again.onnx")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert says in err and "not a nas3d checkpoint" in err and err.count("\n") == 1, err
            assert "weights_only" not in err and "torch.load" not in err


def test_a_checkpoint_goes_into_the_artifact_store_as_octet_stream(tmp_path: Path) -> None:
    import optuna
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact

    import nas3d.storages  # noqa: F401 (registers the type of .pt files)

    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    (tmp_path / "artifacts").mkdir()
    study = optuna.create_study()
    trial = study.ask()
    (tmp_path / "trial-0.pt").write_bytes(b"PK")
    upload_artifact(artifact_store=store, file_path=str(tmp_path / "trial-0.pt"), study_or_trial=trial)
    assert [meta.mimetype for meta in get_all_artifact_meta(trial)] == ["application/octet-stream"]


def _random_architectures(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)

    class RandomTrial:
        def suggest_categorical(self, name, choices):
            return choices[int(rng.integers(len(choices)))]

    found = []
    while len(found) < count:
        try:
            found.append(sample_architecture(RandomTrial(), SearchSpace()))
        except ValueError:
            continue
    return found


ONNX_MODELS = ([pytest.param(a, id=f"seed-{k}") for k, a in seed_architectures().items()]
               + [pytest.param(a, id=f"random-{i}") for i, a in enumerate(_random_architectures(3))]
               + [pytest.param(name, id=name) for name in BASELINES])


@pytest.mark.parametrize("recipe", ONNX_MODELS)
def test_the_onnx_export_matches_torch(tmp_path: Path, recipe) -> None:
    import onnxruntime

    data = DataConfig(dataset="synthetic", size=12, synthetic_classes=3, synthetic_samples=12)
    checkpoint = load_checkpoint(_checkpoint(tmp_path / "m.pt", recipe, data, size=12))
    path = export_onnx(checkpoint, tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, 1, 12, 12, 12), dtype=np.float32)  # batch 3: the axis is dynamic
    logits, probabilities = session.run(None, {"input": x})
    with torch.no_grad():
        expected = checkpoint.build()(torch.from_numpy(x)).numpy()
    assert np.abs(logits - expected).max() < 1e-4
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["nas3d.classes"] == '["0", "1", "2"]'


# --- the walk-through of docs/own-data.md ----------------------------------------------------------


def nas3d(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    import os

    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "nas3d", *args], cwd=cwd, env=full, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


SMALL_SPACE = ["--set", "space.ops=['relu_conv3', 'conv3_in_relu']", "--set", "space.stacks=[1]",
               "--set", "space.cells_per_stack=[1]", "--set", "space.initial_filters=[8]",
               "--set", "data.search_fraction=1.0", "--set", "train.batch_size=16"]


def _walk_through(folder: Path, storage: str, workers: list[str]) -> None:
    nas3d("search", "--dataset", "labels.csv", "--size", "8", "--n-trials", "3", "--max-epochs", "2",
          "--name", "mine", "--storage", storage, *workers, *SMALL_SPACE, cwd=folder)
    status = nas3d("status", "--study-name", "mine", "--storage", storage, cwd=folder)
    trial = int(status.split("architecture\n")[1].split()[0])  # the first row of the front
    nas3d("export", "--study-name", "mine", "--trial", str(trial), "--out", "best.pt", "--storage", storage,
          cwd=folder)
    nas3d("predict", "--checkpoint", "best.pt", "--manifest", "labels.csv", "--out", "predictions.csv",
          cwd=folder)
    nas3d("export", "--checkpoint", "best.pt", "--format", "onnx", "--out", "model.onnx", cwd=folder)
    rows = list(csv.DictReader(open(folder / "predictions.csv")))
    assert len(rows) == 24 and {r["predicted"] for r in rows} <= {"benign", "malignant"}
    assert (folder / "model.onnx").stat().st_size > 0


@pytest.mark.slow
def test_the_walk_through_on_sqlite(tmp_path: Path) -> None:
    nifti_folder(tmp_path)
    _walk_through(tmp_path, f"sqlite:///{tmp_path / 'nas3d.db'}", ["--cpu"])


@pytest.mark.slow
def test_the_walk_through_on_postgresql_with_two_workers(postgres_server: str, tmp_path: Path) -> None:
    from nas3d.testing.storages import temporary_database

    nifti_folder(tmp_path)
    with temporary_database(postgres_server, "nas3d_own_data") as url:
        _walk_through(tmp_path, url, ["--cpu", "--workers", "2"])


def test_predict_and_onnx_use_the_threshold_the_checkpoint_records(tmp_path: Path) -> None:
    import onnx
    import onnxruntime

    csv_path = nifti_folder(tmp_path / "own")
    resolved = resolve_manifest(manifest_config(csv_path))
    path = _checkpoint(tmp_path / "m.pt", TINY, resolved)
    assert load_checkpoint(path).threshold == 0.5  # none recorded (an older file): MedMNIST's 0.5
    write_predictions(path, tmp_path / "half.csv", manifest=csv_path)
    half = list(csv.DictReader(open(tmp_path / "half.csv")))
    malignant = np.array([float(r["malignant"]) for r in half])
    threshold = float(np.median(malignant))  # a threshold that splits these volumes in two
    raw = torch.load(path, weights_only=True)
    raw["metadata"]["threshold"] = threshold
    torch.save(raw, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.threshold == threshold
    write_predictions(path, tmp_path / "p.csv", manifest=csv_path)
    table = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert {r["threshold"] for r in half} == {"0.5"}
    assert {r["threshold"] for r in table} == {f"{threshold:.6g}"}
    assert [r["predicted"] for r in table] == ["malignant" if p > threshold else "benign" for p in malignant]
    assert {r["predicted"] for r in table} == {"benign", "malignant"}
    export_onnx(checkpoint, tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert float(props["nas3d.threshold"]) == threshold
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert float(session.get_modelmeta().custom_metadata_map["nas3d.threshold"]) == threshold
