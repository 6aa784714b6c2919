"""Resumable retraining: a run stopped or killed goes on from its saved progress and ends as the run
that was never interrupted (on the CPU, bit for bit); progress that is not the job's is never used."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nas3d.architecture import Architecture
from nas3d.checkpoint import load_checkpoint
from nas3d.data import DataConfig, load_splits
from nas3d.retrain import (
    FolderProgressStore,
    RetrainConfig,
    RetrainSource,
    SeedResult,
    load_results,
    progress_file_name,
    retrain,
    run_seed_job,
)
from nas3d.train import TrainConfig, TrainingStopped, TrainProgress, train_trial

REPO = Path(__file__).resolve().parent.parent
ARCH = Architecture(("conv3_in_relu", "relu_conv3"), ((0, 1), (1, 2), (2, 3)), 1, 1, 8)
SOURCE = RetrainSource.from_architecture("tiny", ARCH)
# Float32 (amp acts on CUDA only): bit-reproducible on the CPU, so resumed and uninterrupted runs compare
# equal.
EPOCHS = 5
TINY = RetrainConfig.of(epochs=EPOCHS, seeds=(0, 1), batch_size=16, amp=False)
#: SeedResult fields that time the run rather than describe it.
TIMINGS = ("train_seconds", "seconds")


def tiny_data(root: Path) -> DataConfig:
    # 64 training samples: 4 batches of 16 an epoch
    return DataConfig(dataset="synthetic", size=8, root=str(root), synthetic_samples=64)


def dropout_cnn(seed: int) -> nn.Module:
    """A tiny CNN with dropout, so the global torch generator matters as well as the batch order."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.3), nn.AdaptiveAvgPool3d(1),
                         nn.Flatten(), nn.Linear(4, 2))


def to_bytes(progress: TrainProgress) -> bytes:
    buffer = io.BytesIO()
    torch.save(progress.to_dict(), buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> TrainProgress:
    return TrainProgress.from_dict(torch.load(io.BytesIO(data), weights_only=True))


def saved_epoch(path: Path) -> int:
    """The epoch a retrain progress file records; 0 where there is none yet (files are replaced whole)."""
    try:
        return int(torch.load(path, weights_only=True)["train"]["epoch"])
    except FileNotFoundError:
        return 0


def described(result: SeedResult) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(result).items() if k not in TIMINGS}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Equal within float rounding: for weights trained partly in another process."""
    return a.keys() == b.keys() and all(
        torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-6) for k in a)


@pytest.mark.parametrize("recipe", ["paper", "small3d"])  # small3d: AdamW, cosine schedule, augmentation
def test_a_resumed_training_ends_as_the_uninterrupted_one(tmp_path: Path, recipe: str) -> None:
    data = load_splits(tiny_data(tmp_path), "cpu", for_search=False)
    config = TrainConfig(max_epochs=6, patience=6, batch_size=16, lr=0.02, recipe=recipe)
    saved: list[bytes] = []
    model = dropout_cnn(0)
    whole = train_trial(model, data, config, "cpu", save_progress=lambda p: saved.append(to_bytes(p)),
                        save_every=2)
    assert [from_bytes(b).epoch for b in saved] == [2, 4]  # every 2 epochs, not after the last
    for data_bytes in saved:
        resumed_model = dropout_cnn(seed=99)  # the saved weights replace whatever it starts with
        resumed = train_trial(resumed_model, data, config, "cpu", resume_from=from_bytes(data_bytes))
        assert resumed.history == whole.history and resumed.epochs_run == 6
        assert (resumed.best_epoch, resumed.val_auc, resumed.val_acc, resumed.val_loss) == (
            whole.best_epoch, whole.val_auc, whole.val_acc, whole.val_loss)
        assert same_weights(resumed_model.state_dict(), model.state_dict())


def test_without_the_rng_states_a_resumed_run_would_differ(tmp_path: Path) -> None:
    # What the test above relies on: the states matter (dropout and batch order are drawn afresh).
    data = load_splits(tiny_data(tmp_path), "cpu", for_search=False)
    config = TrainConfig(max_epochs=4, patience=4, batch_size=16, lr=0.02)
    saved: list[bytes] = []
    whole = train_trial(dropout_cnn(0), data, config, "cpu",
                        save_progress=lambda p: saved.append(to_bytes(p)), save_every=2)
    progress = from_bytes(saved[0])
    fresh = torch.Generator().manual_seed(12345)
    wrong = dataclasses.replace(progress, rng={"torch": fresh.get_state(), "batch_order": fresh.get_state()})
    assert train_trial(dropout_cnn(0), data, config, "cpu", resume_from=wrong).history != whole.history


def test_training_resumes_only_under_the_recipe_that_saved_it(tmp_path: Path) -> None:
    data = load_splits(tiny_data(tmp_path), "cpu", for_search=False)
    config = TrainConfig(max_epochs=3, patience=3, batch_size=16, lr=0.02)
    saved: list[bytes] = []
    train_trial(dropout_cnn(0), data, config, "cpu", save_progress=lambda p: saved.append(to_bytes(p)),
                save_every=1)
    other = dataclasses.replace(config, lr=0.01)
    with pytest.raises(ValueError, match=r"another training recipe \(train.lr 0.02 -> 0.01\)"):
        train_trial(dropout_cnn(0), data, other, "cpu", resume_from=from_bytes(saved[0]))
    with pytest.raises(ValueError, match="save_every must be an integer >= 1"):
        train_trial(dropout_cnn(0), data, config, "cpu", save_progress=lambda p: None, save_every=0)


def test_a_stop_at_the_end_of_an_epoch_is_saved_before_it_is_raised(tmp_path: Path) -> None:
    data = load_splits(tiny_data(tmp_path), "cpu", for_search=False)
    config = TrainConfig(max_epochs=4, patience=4, batch_size=16, lr=0.02)
    polls = 0

    def stop_after_the_first_epoch() -> bool:  # 4 polls before the batches of epoch 1, the 5th after it
        nonlocal polls
        polls += 1
        return polls >= 5

    saved: list[bytes] = []
    with pytest.raises(TrainingStopped, match="progress saved at epoch 1"):
        train_trial(dropout_cnn(0), data, config, "cpu", should_stop=stop_after_the_first_epoch,
                    save_progress=lambda p: saved.append(to_bytes(p)), save_every=10)
    assert [from_bytes(b).epoch for b in saved] == [1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, SeedResult]]:
    """Both seeds of TINY trained without progress: the data root (which holds their checkpoints,
    ``seed-{seed}.pt``) and each seed's result."""
    root = tmp_path_factory.mktemp("data")
    return root, {seed: run_seed_job(SOURCE, tiny_data(root), TINY, seed,
                                     checkpoint_path=root / f"seed-{seed}.pt") for seed in TINY.seeds}


def test_a_stopped_seed_job_resumes_where_it_stopped(uninterrupted: tuple, tmp_path: Path) -> None:
    root, reference = uninterrupted
    store = FolderProgressStore(tmp_path / "job" / "progress.pt")
    lines: list[str] = []

    def stop_once_epoch_2_is_saved() -> bool:
        return saved_epoch(store.path) >= 2

    with pytest.raises(TrainingStopped):
        run_seed_job(SOURCE, tiny_data(root), TINY, 1, progress_store=store, save_every=1, say=lines.append,
                     should_stop=stop_once_epoch_2_is_saved)
    assert saved_epoch(store.path) == 2 and lines == []
    result = run_seed_job(SOURCE, tiny_data(root), TINY, 1, progress_store=store, save_every=1,
                          say=lines.append, checkpoint_path=tmp_path / "seed-1.pt")
    assert lines == [f"seed 1: resuming from epoch 2 of {EPOCHS}"]
    assert described(result) == described(reference[1])
    assert result.epochs_run == EPOCHS and not store.path.exists()  # done: the progress is cleared
    assert load_checkpoint(tmp_path / "seed-1.pt").metadata["metrics"]["test_auc"] == result.test_auc


def _other_seeds_progress(root: Path, store: FolderProgressStore) -> None:
    def stop() -> bool:
        return saved_epoch(store.path) >= 1

    with pytest.raises(TrainingStopped):
        run_seed_job(SOURCE, tiny_data(root), TINY, 0, progress_store=store, save_every=1, should_stop=stop)


def _other_recipes_progress(root: Path, store: FolderProgressStore) -> None:
    other = RetrainConfig.of(epochs=EPOCHS, seeds=(0, 1), batch_size=16, amp=False, lr=0.01)

    def stop() -> bool:
        return saved_epoch(store.path) >= 1

    with pytest.raises(TrainingStopped):
        run_seed_job(SOURCE, tiny_data(root), other, 1, progress_store=store, save_every=1, should_stop=stop)


def _a_truncated_file(root: Path, store: FolderProgressStore) -> None:
    _other_recipes_progress(root, store)
    store.save(store.load()[:200])


def _a_checkpoint(root: Path, store: FolderProgressStore) -> None:
    run_seed_job(SOURCE, tiny_data(root), RetrainConfig.of(epochs=1, seeds=(1,), batch_size=16, amp=False), 1,
                 checkpoint_path=store.path)


@pytest.mark.parametrize(("make", "said"), [
    (_other_seeds_progress, "seed 1: the saved progress is of another run (train.seed differ); "
                            "starting from epoch 0"),
    (_other_recipes_progress, "seed 1: the saved progress is of another run (train.lr differ); "
                              "starting from epoch 0"),
    (_a_truncated_file, "seed 1: the saved progress is unreadable (RuntimeError: "),
    (_a_checkpoint, "seed 1: the saved progress is unreadable (ValueError: format 'nas3d-checkpoint/2', "
                    "expected 'nas3d-retrain-progress/1'); starting from epoch 0"),
], ids=["another seed", "another recipe", "truncated", "a checkpoint"])
def test_progress_that_is_not_the_jobs_is_said_and_set_aside(uninterrupted: tuple, tmp_path: Path, make: Any,
                                                             said: str) -> None:
    root, reference = uninterrupted
    store = FolderProgressStore(tmp_path / "progress.pt")
    make(root, store)
    assert store.load() is not None
    lines: list[str] = []
    result = run_seed_job(SOURCE, tiny_data(root), TINY, 1, progress_store=store, say=lines.append)
    assert len(lines) == 1 and lines[0].startswith(said) and lines[0].endswith("starting from epoch 0")
    # trained from epoch 0, as if no file were there
    assert described(result) == {**described(reference[1]), "checkpoint": None}
    assert not store.path.exists()


def run_until_killed(out: str, data_root: str) -> None:
    """The child of the kill test: ``retrain`` of TINY into ``out``, saving every epoch, held (not
    stopped) between two batches once seed 1's progress records epoch 2, so that the kill lands in the
    middle of a run; it gives up by itself after two minutes, so no failed test leaves it running."""
    progress, deadline = Path(out) / progress_file_name(1), time.monotonic() + 120

    def hold_once_epoch_2_is_saved() -> bool:
        while saved_epoch(progress) >= 2:
            if time.monotonic() > deadline:
                raise SystemExit("not killed within two minutes")
            time.sleep(0.05)
        return False

    retrain(SOURCE, tiny_data(Path(data_root)), TINY, "cpu", out, save_every=1,
            should_stop=hold_once_epoch_2_is_saved)


@pytest.mark.slow  # a Python subprocess: seconds of imports under load
def test_a_killed_retrain_rerun_into_its_folder_resumes_and_ends_as_an_uninterrupted_one(
        uninterrupted: tuple, tmp_path: Path) -> None:
    root, reference = uninterrupted
    out = tmp_path / "out"
    progress = out / progress_file_name(1)
    child = subprocess.Popen(
        [sys.executable, "-c", f"from tests.test_retrain_resume import run_until_killed; "
                               f"run_until_killed({str(out)!r}, {str(root)!r})"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while saved_epoch(progress) < 2:
            assert child.poll() is None, f"the child ended first: {child.stdout.read().decode()}"
            assert time.monotonic() < deadline, "no progress at epoch 2 within two minutes"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    killed_at = saved_epoch(progress)
    assert killed_at == 2
    interrupted = load_results(out)
    assert not interrupted["complete"] and [s["seed"] for s in interrupted["seeds"]] == [0]
    assert not (out / progress_file_name(0)).exists()  # seed 0 finished: its progress went with it

    lines: list[str] = []
    report = retrain(SOURCE, tiny_data(root), TINY, "cpu", out, save_every=1, say=lines.append)
    assert lines == [f"resuming {out}: seeds 0 finished before, 1 to train",
                     f"seed 1: resuming from epoch {killed_at} of {EPOCHS}"]
    assert report.results["complete"] and report.seeds[1].epochs_run == EPOCHS
    assert not list(out.glob("*.progress.pt"))
    # seed 0 ran in the child process: another process's torch threads round floats otherwise (1e-7)
    for seed, result in zip(TINY.seeds, report.seeds, strict=True):
        got, want = described(result), described(reference[seed])
        assert got.keys() == want.keys()
        for key, value in want.items():
            numbers = isinstance(value, float) or (isinstance(value, list) and value
                                                   and isinstance(value[0], float))
            assert got[key] == (pytest.approx(value, rel=1e-5, abs=1e-6) if numbers else value), key
    written = load_results(out)
    assert written["complete"] and [s["seed"] for s in written["seeds"]] == [0, 1]
    for seed in TINY.seeds:  # both trained (seed 1 in part) in the child: within rounding, as above
        assert close_weights(load_checkpoint(out / f"seed-{seed}.pt").state_dict,
                             load_checkpoint(root / f"seed-{seed}.pt").state_dict)
    # finished now: a rerun is refused as ever, unless --force
    with pytest.raises(ValueError, match="results.json exists; pass --force"):
        retrain(SOURCE, tiny_data(root), TINY, "cpu", out)


def test_an_unfinished_folder_resumes_only_its_own_setup_and_force_starts_over(uninterrupted: tuple,
                                                                               tmp_path: Path) -> None:
    root, _ = uninterrupted
    out = tmp_path / "out"
    progress = out / progress_file_name(1)
    two_epochs = RetrainConfig.of(epochs=2, seeds=(0, 1), batch_size=16, amp=False)
    with pytest.raises(TrainingStopped):  # in seed 1, after seed 0 is in results.json
        retrain(SOURCE, tiny_data(root), two_epochs, "cpu", out, save_every=1,
                should_stop=lambda: saved_epoch(progress) >= 1)
    assert saved_epoch(progress) == 1 and not load_results(out)["complete"]
    shorter = RetrainConfig.of(epochs=1, seeds=(0, 1), batch_size=16, amp=False)
    refused = (r"results.json is an unfinished run of another setup \(retrain.epochs differ\); rerun with "
               r"the arguments .* pass --force to start over")
    with pytest.raises(ValueError, match=refused):
        retrain(SOURCE, tiny_data(root), shorter, "cpu", out)
    assert saved_epoch(progress) == 1  # refused before anything was touched
    (out / "seed-0.pt").unlink()  # a kept seed needs its checkpoint: without it, it trains again
    lines: list[str] = []
    report = retrain(SOURCE, tiny_data(root), two_epochs, "cpu", out, save_every=1, say=lines.append)
    assert lines == [f"seed 0: its checkpoint {out / 'seed-0.pt'} is missing; training it again",
                     f"resuming {out}: seeds none finished before, 0, 1 to train",
                     "seed 1: resuming from epoch 1 of 2"]
    assert report.results["complete"] and (out / "seed-0.pt").is_file()
    lines.clear()
    report = retrain(SOURCE, tiny_data(root), shorter, "cpu", out, overwrite=True, say=lines.append)
    assert lines == [] and report.results["complete"]  # nothing resumed: started over
    assert [s.epochs_run for s in report.seeds] == [1, 1] and not progress.exists()
