"""nas3d.data: the synthetic npz format, loading through medmnist, errors, subsets, device splits."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import medmnist
import numpy as np
import pytest
import torch
from medmnist.info import INFO

from nas3d.data import (
    DATASETS,
    DataConfig,
    DatasetCorrupt,
    DatasetUnavailable,
    load_splits,
    medmnist_file,
    read_arrays,
    stratified_subset,
    write_synthetic_npz,
)


def _write_as_medmnist(root: Path, flag: str = "organmnist3d", size: int = 28, n: int = 33) -> Path:
    """A small synthetic file under the real file name medmnist's class for ``flag`` reads."""
    classes = len(INFO[flag]["label"])
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    return write_synthetic_npz(
        root / name, num_classes=classes, n_train=n, n_val=n, n_test=n, size=size, seed=1
    )


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def test_dataset_table_is_medmnist3d() -> None:
    assert set(DATASETS) == {
        "organmnist3d",
        "nodulemnist3d",
        "fracturemnist3d",
        "adrenalmnist3d",
        "vesselmnist3d",
        "synapsemnist3d",
    }
    assert {flag: DataConfig(dataset=flag).num_classes for flag in DATASETS} == {
        "organmnist3d": 11,
        "nodulemnist3d": 2,
        "fracturemnist3d": 3,
        "adrenalmnist3d": 2,
        "vesselmnist3d": 2,
        "synapsemnist3d": 2,
    }
    assert DataConfig(dataset="fracturemnist3d").task == "multi-class"
    assert DataConfig(dataset="vesselmnist3d").task == "binary-class"


@pytest.mark.parametrize("classes", [2, 5])
def test_synthetic_npz_has_the_medmnist_format(tmp_path: Path, classes: int) -> None:
    path = write_synthetic_npz(
        tmp_path / "s.npz", num_classes=classes, n_train=20, n_val=10, n_test=7, size=9, seed=0
    )
    with np.load(path) as npz:
        assert set(npz.files) == {f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")}
        for split, n in (("train", 20), ("val", 10), ("test", 7)):
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            assert images.dtype == np.uint8 and images.shape == (n, 9, 9, 9)
            assert labels.dtype == np.uint8 and labels.shape == (n, 1)
            assert set(np.unique(labels)) == set(range(classes))  # every class in every split


def test_synthetic_file_reads_through_medmnist_class(tmp_path: Path) -> None:
    path = _write_as_medmnist(tmp_path)
    ds = medmnist.OrganMNIST3D(split="val", root=str(tmp_path), size=28, download=False)
    with np.load(path) as npz:
        np.testing.assert_array_equal(ds.imgs, npz["val_images"])
        np.testing.assert_array_equal(ds.labels, npz["val_labels"])
    image, target = ds[0]
    assert image.shape == (1, 28, 28, 28) and 0.0 <= image.min() and image.max() <= 1.0


def test_real_dataset_path_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the md5 made to match, a real flag loads through medmnist's class onto the device."""
    path = _write_as_medmnist(tmp_path, "fracturemnist3d", size=64, n=6)
    monkeypatch.setitem(INFO["fracturemnist3d"], "MD5_64", _md5(path))
    cfg = DataConfig(dataset="fracturemnist3d", size=64, root=str(tmp_path), download=False)
    data = load_splits(cfg, "cpu", for_search=False)
    assert (data.name, data.task, data.num_classes, data.in_channels, data.size) == (
        "fracturemnist3d",
        "multi-class",
        3,
        1,
        64,
    )
    assert data.test is not None
    with np.load(path) as npz:
        np.testing.assert_array_equal(data.test.images[:, 0].numpy(), npz["test_images"])
        np.testing.assert_array_equal(data.test.labels.numpy(), npz["test_labels"][:, 0])
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64


@pytest.mark.parametrize(("size", "name"), [(28, "nodulemnist3d.npz"), (64, "nodulemnist3d_64.npz")])
def test_missing_file_offline_says_what_and_how(tmp_path: Path, size: int, name: str) -> None:
    cfg = DataConfig(dataset="nodulemnist3d", size=size, root=str(tmp_path), download=False)
    with pytest.raises(DatasetUnavailable) as info:
        load_splits(cfg, "cpu", for_search=True)
    message = str(info.value)
    assert "\n" not in message
    assert name in message and str(tmp_path) in message
    assert INFO["nodulemnist3d"]["url" if size == 28 else "url_64"] in message
    assert "--data-root" in message and "download" in message


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A URL whose server accepts connections and never answers: a download there can only time out."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/adrenalmnist3d.npz"


def test_failed_download_is_bounded_and_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, silent_server: str
) -> None:
    monkeypatch.setitem(INFO["adrenalmnist3d"], "url", silent_server)
    monkeypatch.setattr(medmnist_file, "DOWNLOAD_TIMEOUT_S", 0.5)
    root = tmp_path / "fresh" / "er"  # does not exist yet: the download creates it, and removes it again
    cfg = DataConfig(dataset="adrenalmnist3d", root=str(root), download=True)
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailable) as info:
        load_splits(cfg, "cpu", for_search=True)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message and "could not download adrenalmnist3d.npz" in message
    assert silent_server in message and "--data-root" in message
    assert not (tmp_path / "fresh").exists()  # no partial file, nor the folders the download made
    assert socket.getdefaulttimeout() is None  # the process-wide timeout is restored


def test_md5_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    path = _write_as_medmnist(tmp_path, "organmnist3d")
    cfg = DataConfig(dataset="organmnist3d", root=str(tmp_path), download=False)
    with pytest.raises(DatasetCorrupt) as info:
        load_splits(cfg, "cpu", for_search=True)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert _md5(path) in message and INFO["organmnist3d"]["MD5"] in message


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="synthetic", size=8, synthetic_samples=16, root=str(tmp_path))
    path = tmp_path / cfg.file_name
    write_synthetic_npz(path, num_classes=2, n_train=16, n_val=4, n_test=4, size=8, seed=0)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetCorrupt, match="not a readable MedMNIST npz") as info:
        load_splits(cfg, "cpu", for_search=True)
    assert "\n" not in str(info.value)


def test_damaged_file_read_by_medmnist_is_wrapped(tmp_path: Path) -> None:
    """A damaged file that reaches medmnist's class (no md5 check there): its np.load error is wrapped."""
    path = _write_as_medmnist(tmp_path, "vesselmnist3d", n=4)
    path.write_bytes(path.read_bytes()[:-100])
    cfg = DataConfig(dataset="vesselmnist3d", root=str(tmp_path), download=False)
    with pytest.raises(DatasetCorrupt, match="BadZipFile"):
        read_arrays(cfg, path)


def test_wrong_arrays_are_rejected(tmp_path: Path) -> None:
    cfg = DataConfig(
        dataset="synthetic", size=8, synthetic_classes=2, synthetic_samples=16, root=str(tmp_path)
    )
    good = np.zeros((4, 8, 8, 8), np.uint8), np.zeros((4, 1), np.uint8)
    np.savez(
        tmp_path / cfg.file_name,
        train_images=good[0],
        train_labels=np.full((4, 1), 7, np.uint8),  # only classes 0 and 1 exist
        val_images=good[0],
        val_labels=good[1],
        test_images=good[0],
        test_labels=good[1],
    )
    with pytest.raises(DatasetCorrupt, match=r"train_labels range over \[7, 7\], expected \[0, 1\]"):
        load_splits(cfg, "cpu", for_search=False)


def test_unknown_dataset_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="Did you mean 'organmnist3d'") as info:
        DataConfig(dataset="organmnist")
    assert all(flag in str(info.value) for flag in (*DATASETS, "synthetic"))
    with pytest.raises(ValueError, match="size"):
        DataConfig(dataset="organmnist3d", size=32)


def test_search_subset_is_deterministic_and_stratified(tmp_path: Path) -> None:
    cfg = DataConfig(
        dataset="synthetic", size=6, synthetic_classes=3, synthetic_samples=120, root=str(tmp_path)
    )
    first = load_splits(cfg, "cpu", for_search=True)
    again = load_splits(cfg, "cpu", for_search=True)
    other = load_splits(DataConfig(**{**cfg.__dict__, "subset_seed": 1}), "cpu", for_search=True)
    full = load_splits(cfg, "cpu", for_search=False)
    assert first.test is None and full.test is not None
    assert len(first.train) == 30 and len(first.val) == 9  # a quarter of 120 and of 30, per class
    for split in ("train", "val"):
        a, b, c = (getattr(d, split) for d in (first, again, other))
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert not torch.equal(a.images, c.images)
        assert set(a.labels.tolist()) == {0, 1, 2}
    # a tiny fraction still keeps one sample of every class
    assert len(stratified_subset(np.arange(10) % 5, 0.01, seed=0)) == 5


def test_search_val_fraction_scores_on_another_share_of_val(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="synthetic", size=6, synthetic_classes=3, synthetic_samples=120,
                     root=str(tmp_path), search_fraction=0.25, search_val_fraction=1.0, record_full_val=True)
    data = load_splits(cfg, "cpu", for_search=True)
    whole = load_splits(cfg, "cpu", for_search=False)
    assert len(data.train) == 30  # train keeps search_fraction
    assert torch.equal(data.val.images, whole.val.images)  # val is the whole split
    assert data.full_val is None  # nothing beside it to record
    half = load_splits(DataConfig(**{**cfg.__dict__, "search_val_fraction": 0.5}), "cpu", for_search=True)
    assert len(half.val) == 15 and len(half.full_val) == 30 and len(half.train) == 30
    assert cfg.fraction("train") == 0.25 and DataConfig(search_fraction=0.5).fraction("val") == 0.5


@pytest.mark.parametrize("value", [0.0, 1.5, -0.25])
def test_search_val_fraction_out_of_range_is_named(value: float) -> None:
    with pytest.raises(ValueError, match=r"data.search_val_fraction must be in \(0, 1\]"):
        DataConfig(search_val_fraction=value)


def test_split_batches_cover_the_split_once(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="synthetic", size=5, synthetic_samples=40, root=str(tmp_path))
    split = load_splits(cfg, "cpu", for_search=False).train
    indices = list(split.batches(16, torch.Generator().manual_seed(0)))
    assert [len(i) for i in indices] == [16, 16, 8]
    assert sorted(torch.cat(indices).tolist()) == list(range(40))
    images, labels = split.batch(indices[0])
    assert images.dtype == torch.float32 and images.shape == (16, 1, 5, 5, 5)
    assert 0.0 <= images.min() and images.max() <= 1.0
    torch.testing.assert_close(images, split.images[indices[0]].float() / 255.0, rtol=0, atol=0)
    assert torch.equal(labels, split.labels[indices[0]])


def test_synthetic_file_is_written_once(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="synthetic", size=5, synthetic_samples=16, root=str(tmp_path))
    load_splits(cfg, "cpu", for_search=True)
    path = tmp_path / cfg.file_name
    stamp = path.stat().st_mtime_ns
    load_splits(cfg, "cpu", for_search=True)
    assert path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [cfg.file_name]  # no temp files left behind
