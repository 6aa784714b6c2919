"""Faults that must not cost results: an artifact store that is read-only or full, a budget used up, a
cap below the whole space at the study's size, a search that trains nothing, a size change at retrain
or predict. The store faults use real mounts (a read-only bind mount, a 8 KiB tmpfs) where this host
allows them."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from nas3d import records
from nas3d.architecture import Architecture
from nas3d.budget import budget_state
from nas3d.checkpoint import load_checkpoint, save_checkpoint
from nas3d.cli import main
from nas3d.config import load_study_config
from nas3d.export import export_checkpoint
from nas3d.model import build_model
from nas3d.predict import size_note
from nas3d.report import trial_report
from nas3d.retrain import plan_retrain
from nas3d.storages import FolderArtifactStore, make_storage
from nas3d.study import NothingTrained, create_study, load_study, require_trained
from nas3d.worker import MAX_STORE_FAILURES, run_worker
from tests.conftest import unavailable
from tests.test_study import REPO, make_objective, smoke_config
from tests.test_worker import HEARTBEAT, wait_for

RELU = Architecture(("relu_conv3",), ((0, 1), (1, 2)), 1, 1, 8)


@contextlib.contextmanager
def mounted(folder: Path, kind: str) -> Iterator[None]:
    """``folder`` made ``"read-only"`` (a read-only bind mount of itself) or ``"full"`` (an 8 KiB tmpfs
    over it) for the block; skips the test where this host refuses mounts."""
    commands = {
        "read-only": [["mount", "--bind", str(folder), str(folder)],
                      ["mount", "-o", "remount,ro,bind", str(folder)]],
        "full": [["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(folder)]],
    }[kind]
    done = 0
    try:
        for command in commands:
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                unavailable(f"cannot make a {kind} store on this host ({' '.join(command[:2])}: "
                            f"{result.stderr.strip()}); run the tests as root where mounts are allowed")
            done += 1
        yield
    finally:
        if done:
            subprocess.run(["umount", str(folder)], check=True)


def store_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- the store's writes ---------------------------------------------------------------------------


class BrokenReader(io.BytesIO):
    """Content that stops after its first chunk with the error a full disk gives (the write half-done)."""

    def read(self, size: int = -1) -> bytes:
        if self.tell() > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().read(min(size if size > 0 else 1024, 1024))


def test_a_failed_write_leaves_no_file_and_names_the_path(tmp_path: Path) -> None:
    store = FolderArtifactStore(tmp_path)
    with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device: '.*/artifact-1'") as caught:
        store.write("artifact-1", BrokenReader(b"x" * 4096))
    assert caught.value.errno == errno.ENOSPC
    assert store_files(tmp_path) == []  # neither the artifact nor its temporary name
    store.write("artifact-2", io.BytesIO(b"whole"))
    assert (tmp_path / "artifact-2").read_bytes() == b"whole" and store_files(tmp_path) == ["artifact-2"]


def test_a_store_folder_replaced_by_a_file_fails_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "store").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"store/\.artifact-1\.\d+\.tmp|store/artifact-1"):
        FolderArtifactStore(tmp_path / "store").write("artifact-1", io.BytesIO(b"x"))


def test_a_full_store_keeps_no_partial_file(tmp_path: Path) -> None:
    folder = tmp_path / "full"
    folder.mkdir()
    with mounted(folder, "full"):
        with pytest.raises(OSError, match=r"No space left on device: '.*/full/big'"):
            FolderArtifactStore(folder).write("big", io.BytesIO(b"x" * 64 * 1024))
        assert store_files(folder) == []


# -- a trained trial whose checkpoint is refused ----------------------------------------------------


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_a_refused_checkpoint_keeps_the_trials_scores_marked_checkpoint_missing(
    tmp_path: Path, kind: str
) -> None:
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    config = smoke_config(tmp_path, **{"space.ops": '["relu_conv3", "mish_conv3"]'})
    study, objective = make_objective(config, storage_url)
    folder = tmp_path / "artifacts"
    with mounted(folder, kind):
        study.optimize(objective, n_trials=2)
        assert store_files(folder) == []  # no 0-byte or cut file
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    error = "Read-only file system" if kind == "read-only" else "No space left on device"
    for trial in trials:
        assert 0.0 <= trial.values[0] <= 1.0 and trial.values[1] > 0
        missing = trial.user_attrs[records.CHECKPOINT_MISSING]
        assert str(folder) in missing and error in missing
        assert records.CHECKPOINT_ARTIFACT not in trial.user_attrs
        assert records.FAILURE_REASON not in trial.user_attrs  # a completed trial carries no failure
    assert objective.store_failures_in_row == 2 and budget_state(study).used == 2
    with pytest.raises(LookupError, match=r"its scores stand, but the artifact store did not take its "
                                          r"checkpoint .*nas3d retrain --study-name smoke --trial 0$"):
        export_checkpoint(storage_url, objective.artifact_store, "smoke", 0, tmp_path / "out.pt")
    shown = trial_report(storage_url, "smoke", 0)
    assert f"checkpoint missing: the artifact store {folder} refused" in shown
    # A store that works again takes the next checkpoint and resets the count.
    study.optimize(objective, n_trials=1)
    assert objective.store_failures_in_row == 0
    assert records.CHECKPOINT_ARTIFACT in study.get_trials()[-1].user_attrs


# -- the budget -------------------------------------------------------------------------------------


def test_a_failed_trial_costs_no_budget(tmp_path: Path) -> None:
    study = create_study(smoke_config(tmp_path), make_storage(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    trained = study.ask()
    study.tell(trained, [0.7, 1e6])
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)  # its training raised: no result exists
    state = budget_state(study)
    assert (state.used, state.free, state.free_streak) == (1, 1, 1)


Capture = pytest.CaptureFixture[str]


def _create(tmp_path: Path, storage_url: str, n_trials: int, capsys: Capture) -> tuple[int, str]:
    code = main(["create-study", "--storage", storage_url, "--study", str(REPO / "studies" / "smoke.toml"),
                 "--data-root", str(tmp_path / "data"), "--n-trials", str(n_trials)])
    return code, capsys.readouterr().err


def test_a_used_up_budget_is_extended_by_create_study(tmp_path: Path, capsys: Capture) -> None:
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert _create(tmp_path, storage_url, 2, capsys)[0] == 0
    assert run_worker("smoke", storage_url, claim_ahead=False) == 2
    assert run_worker("smoke", storage_url, claim_ahead=False) == 0  # used up
    assert _create(tmp_path, storage_url, 4, capsys)[0] == 0  # today refused ("stored 2, asked 4")
    study, config = load_study("smoke", make_storage(storage_url))
    assert config.study.n_trials == 4
    assert run_worker("smoke", storage_url, claim_ahead=False) == 2
    assert budget_state(study).used == 4 and len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    code, err = _create(tmp_path, storage_url, 3, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "has a budget of 4 trials; a budget can be raised, not lowered: give --n-trials 4 or more" in err


# -- sizes checked before anything runs -------------------------------------------------------------


def test_the_cpu_profile_at_64_is_refused_in_one_line(tmp_path: Path, capsys: Capture) -> None:
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    profile = str(REPO / "studies" / "adrenalmnist3d-cpu.toml")
    code = main(["create-study", "--storage", storage_url, "--study", profile, "--size", "64",
                 "--data-root", str(tmp_path / "no-data")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "max_flops 5e+08 is below the smallest architecture of the space at 64³ (1.02 GFLOPs" in err
    assert not (tmp_path / "no-data").exists()  # refused before any download
    assert make_storage(storage_url).get_all_studies() == []
    # At its own size the cap fits (only the data is missing here).
    config = load_study_config(REPO / "studies" / "adrenalmnist3d-cpu.toml")
    from nas3d.study import check_cap_fits_space, smallest_flops
    check_cap_fits_space(config)
    assert smallest_flops(config)[0] < 5e8


def test_a_search_that_trained_nothing_says_why(tmp_path: Path) -> None:
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    # every architecture over a params cap (FLOPs caps are refused at create-study already)
    create_study(smoke_config(tmp_path, **{"constraints.max_params": 10.0}), make_storage(storage_url))
    assert run_worker("smoke", storage_url, claim_ahead=False, max_free_streak=3) == 3
    with pytest.raises(NothingTrained, match=r"study 'smoke' trained nothing: of its 3 trials, 3 over "
                                             r"constraints \(e\.g\. over budget: params .*\); fix that"):
        require_trained(storage_url, "smoke")


def test_retrain_says_when_the_size_differs_from_the_searched_one(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "relu.pt", build_model(RELU), RELU, in_channels=1, num_classes=2,
                           input_size=12, metadata={"dataset": "synthetic"})
    options = {"checkpoint": str(path), "epochs": 1, "seeds": "0", "batch_size": 8, "lr": 1e-3,
               "data_root": str(tmp_path / "data"), "out": str(tmp_path / "out")}
    assert plan_retrain(options, None).size_note() is None
    note = plan_retrain({**options, "size": 24}, None).size_note()
    assert note is not None and "\n" not in note
    before, after = (int(x.replace(",", "")) for x in
                     note.split("its FLOPs go from ")[1].removesuffix(" M a volume").split(" M to "))
    assert note.startswith("the data is 24³ but the model was searched at 12³") and after > 4 * before


def test_predict_says_when_the_volumes_are_another_size(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "relu.pt", build_model(RELU), RELU, in_channels=1, num_classes=2,
                           input_size=12)
    checkpoint = load_checkpoint(path)
    np.save(tmp_path / "small.npy", np.zeros((6, 6, 6), np.float32))
    np.save(tmp_path / "same.npy", np.zeros((12, 12, 12), np.float32))
    note = size_note(checkpoint, ("volume small.npy", (tmp_path / "small.npy",)))
    assert note is not None and note.startswith("volume small.npy is 6³ but the model was searched at 12³: "
                                                "the volumes are resized to 12³")
    assert size_note(checkpoint, ("volume same.npy", (tmp_path / "same.npy",))) is None


def test_proxies_are_off_by_default_and_recorded_when_on(tmp_path: Path) -> None:
    for on in (False, True):
        config = smoke_config(tmp_path, **{"study.name": f"proxies-{on}", "study.proxies": on})
        study, objective = make_objective(config, f"sqlite:///{tmp_path / 'db.sqlite'}")
        study.optimize(objective, n_trials=1)
        assert (records.PROXIES in study.trials[0].user_attrs) is on


def test_status_trial_shows_a_reason_apart_from_the_learning_curve(tmp_path: Path) -> None:
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = create_study(smoke_config(tmp_path), make_storage(storage_url))
    curve = {"epoch": [1, 2], "train_loss": [0.7, 0.6], "val_loss": [0.7, 0.65], "val_auc": [0.6, 0.7],
             "val_acc": [0.5, 0.6]}
    reason = "NonFiniteLoss: training loss became nan in epoch 3"
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={
        records.FAILURE_REASON: reason, records.CURVE: curve, records.ARCH: RELU.short_str()}))
    lines = trial_report(storage_url, "smoke", 0).splitlines()
    assert [line for line in lines if "NonFiniteLoss" in line] == [f"  reason: {reason}"]
    at = lines.index("  learning curve:")
    assert lines[at + 1].split()[0] == "epoch" and lines[at + 2].split()[0] == "1", lines[at:]


# -- workers ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command", ["worker", "launch"])
def test_two_workers_stop_on_a_store_made_read_only_mid_run_without_losing_results(
    storage_url: str, tmp_path: Path, command: str
) -> None:
    config = smoke_config(tmp_path, **{"study.n_trials": 30, "study.name": "read-only-store",
                                       "space.initial_filters": "[8, 16, 32]", "study.sampler": "random"})
    folder = tmp_path / "artifacts"
    study = create_study(config, make_storage(storage_url), artifacts=str(folder))
    lines = []
    for index in range(1 if command == "launch" else 2):  # one launch runs both workers
        extra = ["--cpu", "--workers", "2"] if command == "launch" else ["--worker-index", str(index)]
        lines.append([sys.executable, "-m", "nas3d", command, "--study-name", "read-only-store", "--storage",
                      storage_url, *extra, *HEARTBEAT])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(line, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for line in lines]
    # Writable when the workers start (they check it); read-only once they train.
    wait_for(lambda: study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), timeout=180)
    with mounted(folder, "read-only"):
        outputs = [p.communicate(timeout=400)[0] for p in processes]
    codes = [p.returncode for p in processes]
    assert codes == ([74, 74] if command == "worker" else [1]), outputs
    stops = [line for out in outputs for line in out.splitlines() if "not restarted" in line]
    assert len(stops) == 2, outputs
    assert all(f"{MAX_STORE_FAILURES} checkpoints in a row were not stored" in s and str(folder) in s
               and "Read-only file system" in s for s in stops)
    assert not any("restarting" in out for out in outputs)  # launch does not restart a store failure
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    missing = [t for t in complete if records.CHECKPOINT_MISSING in t.user_attrs]
    assert len(missing) == 2 * MAX_STORE_FAILURES and all(t.values for t in missing)
    stored = {t.user_attrs[records.CHECKPOINT_ARTIFACT] for t in complete if t not in missing}
    pictures = {t.user_attrs.get(records.PICTURE_ARTIFACT) for t in complete} - {None}
    assert set(store_files(folder)) == stored | pictures  # no 0-byte, cut or temporary file
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    retried = {n for t in trials for n in records.retry_of(t)}
    assert not [t for t in trials if t.state == TrialState.FAIL and t.number not in retried]
    state = budget_state(study)
    assert state.used == len(complete) + state.waiting  # results that exist, and the trials queued again
