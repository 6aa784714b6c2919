"""Every bad input a user can give, through ``nas3d.cli.main``, and a few through the real `nas3d`
command in a subprocess.

Each row of ``ROWS`` is one command line that must fail with exit code 2 and one line on stderr that
names the problem (``expected`` is part of that line), and must write nothing: the workspace (the
storage folder with its database and artifacts, the data roots, the current folder) holds the same
files and folders, with the same sizes and modification times, before and after. The next case is
one line in ``ROWS``.

Every row runs in this process, as the entry point would run it: the workspace as the current
folder, the environment the subprocess would get, and on "stderr" whatever the process would have
printed there (the CLI's own lines, log records, warnings). A subprocess imports torch, optuna and
medmnist anew (seconds a row), so only ``ENTRY_POINT_ROWS``, one of each kind of failure, also run
through ``python -m nas3d``.
"""

from __future__ import annotations

import gc
import logging
import os
import shlex
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "studies" / "smoke.toml")
STUDY = f"--study {SMOKE} --data-root data --name fresh"  # a new study from the smoke file, data present
UNREACHABLE_PG = "postgresql://postgres:secret@127.0.0.1:1/nas3d"

# The workspace trains a smoke trial first (tens of seconds): `make test`, not `make test-fast`.
pytestmark = pytest.mark.slow

#: Rows that also run through the real entry point: a flag refused before anything opens, a storage
#: that cannot be reached (its password never echoed), data refused while reading it, an output
#: file that exists.
ENTRY_POINT_ROWS = ("search-gpus-abc", "unreachable-postgres", "corrupt-synthetic-data", "export-out-exists")
#: The environment of a row: no NAS3D_* of the caller's, downloads that fail at once (with or without
#: a network).
CLOSED_PORT = "http://127.0.0.1:9"
PROXIES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")
#: Warnings Python does not print by default (outside __main__), so a subprocess would not show them.
SILENT_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)

# (id, the command line after `nas3d`, a part of the one-line message). Paths are relative to the
# workspace (see `workspace`): storage/ (NAS3D_HOME, holding study "smoke": trial 0 complete with a
# checkpoint, trial 1 failed), data/ (the smoke data), corrupt/ (a damaged smoke data file), outdir/
# (a folder), existing.pt (a file), bad-utf8.toml, binary.toml, bad-key.toml, swapped.pt (a checkpoint
# whose recipe was swapped for another architecture with the same weight shapes).
ROWS: list[tuple[str, str, str]] = [
    # devices and worker counts
    ("launch-missing-gpu", "launch --study-name smoke --gpus 64", "--gpus 64: "),
    ("launch-repeated-gpu", "launch --study-name smoke --gpus 0,0", "an index is repeated"),
    ("search-gpus-abc", f"search {STUDY} --gpus abc", "--gpus expects comma-separated GPU indices"),
    ("search-zero-workers", f"search {STUDY} --cpu --workers 0", "--workers must be >= 1"),
    ("worker-missing-gpu", "worker --study-name smoke --device cuda:63", "--device cuda:63: "),
    ("worker-tpu", "worker --study-name smoke --device tpu", "--device must be cpu, cuda or cuda:N"),
    ("retrain-tpu", "retrain --baseline resnet18 --dataset synthetic --device tpu", "--device must be cpu"),
    # storage strings and storages that are not there
    ("sqlite-two-slashes", "status --storage sqlite://nas3d.db", "three slashes"),
    ("sqlite-two-slashes-search", f"search {STUDY} --storage sqlite://nas3d.db", "three slashes"),
    ("garbled-postgres-port", "status --storage postgresql://u@127.0.0.1:54x32/db", "is not a PostgreSQL URL"),
    ("postgres-no-database", "status --storage postgresql://u@127.0.0.1:5432", "has no database name"),
    ("unreachable-postgres", f"status --storage {UNREACHABLE_PG}", "cannot connect to PostgreSQL at 127.0.0.1:1"),
    ("status-typo-sqlite", "status --storage sqlite:///typo/dir/nas3d.db", "no sqlite storage at"),
    ("status-typo-journal", "status --storage journal:typo/j.log", "no journal storage at"),
    ("export-typo-sqlite", "export --storage sqlite:///typo/dir/nas3d.db --study-name smoke --trial 0 --out t.pt",
     "no sqlite storage at"),
    ("worker-typo-sqlite", "worker --storage sqlite:///typo/nas3d.db --study-name smoke", "no sqlite storage at"),
    # studies and trials that are not there
    ("status-unknown-study", "status --study-name smok", "no study named 'smok' in this storage (did you mean"),
    ("worker-unknown-study", "worker --study-name nope", "no study named 'nope'"),
    ("export-unknown-trial", "export --study-name smoke --trial 7 --out t.pt", "has no trial 7"),
    ("export-failed-trial", "export --study-name smoke --trial 1 --out t.pt", "no checkpoint: it failed ("),
    ("export-out-is-folder", "export --study-name smoke --trial 0 --out outdir --force", "is a folder"),
    ("export-out-exists", "export --study-name smoke --trial 0 --out existing.pt", "exists; pass --force"),
    # study files and values
    ("set-nan", f"create-study {STUDY} --set constraints.max_flops=nan", "must be a finite number"),
    ("set-inf", f"create-study {STUDY} --set train.lr=inf", "must be a finite number"),
    ("study-not-utf8", "create-study --study bad-utf8.toml", "bad-utf8.toml: not a UTF-8 text file"),
    ("study-binary", "create-study --study binary.toml", "binary.toml: a binary file"),
    ("study-unknown-key", "create-study --study bad-key.toml", "'max_epoch' in [train]; did you mean 'max_epochs'"),
    ("study-changed-config", f"create-study --study {SMOKE} --data-root data --n-trials 7",
     "already exists with a different configuration"),
    # data
    ("corrupt-synthetic-data", f"search --study {SMOKE} --data-root corrupt --name fresh", "is not a readable MedMNIST npz"),
    ("typo-data-root-download", "search --dataset adrenalmnist3d --data-root typo/medmnist", "could not download"),
    ("missing-dataset-no-download", "search --dataset nodulemnist3d --data-root typo --set data.download=false",
     "nodulemnist3d.npz not found in"),
    # your own data: a manifest (labels CSV) and its volumes
    ("manifest-missing-volume", "search --dataset missing/labels.csv --size 6 --cpu", "labels.csv line 4: volume 'volumes/case002_0.nii.gz' not found"),
    ("manifest-unreadable-volume", "search --dataset unreadable/labels.csv --size 6 --cpu", "labels.csv line 4: volume case002_0.nii.gz is not readable"),
    ("manifest-missing-columns", "search --dataset no-label.csv --size 6", "needs the columns 'image', 'label'"),
    ("manifest-single-class", "search --dataset single/labels.csv --size 6", "every row has label 'benign'; a classifier needs at least two"),
    ("manifest-class-not-in-train", "search --dataset val-only/labels.csv --size 6", "class 'malignant' is in the val split but not in train"),
    ("manifest-channel-counts", "search --dataset channels/labels.csv --size 6", "line 4: the sample has 2 channel(s), but line 2's has 1"),
    ("manifest-empty-split", "search --dataset no-test/labels.csv --size 6", "the test split is empty"),
    ("manifest-nan-volume", "search --dataset nan/labels.csv --size 6", "line 4: volume case002_0.nii.gz holds 216 NaN or infinite values"),
    ("manifest-changed-under-study", "worker --study-name own", "changed since the study was created"),
    ("predict-wrong-channels", "predict --checkpoint own.pt two-channels.npy --out p.csv", "volume two-channels.npy: the sample has 2 channel(s), but the model takes 1"),
    ("predict-out-exists", "predict --checkpoint own.pt one-channel.npy --out existing.pt", "exists; pass --force"),
    ("export-checkpoint-needs-format", "export --checkpoint own.pt --out m.onnx", "add --format onnx"),
    # retrain
    ("retrain-needs-dataset", "retrain --baseline resnet18", "--baseline needs --dataset"),
    ("retrain-bad-seeds", "retrain --baseline resnet18 --dataset synthetic --seeds 0,x", "--seeds expects"),
    ("retrain-zero-epochs", "retrain --baseline resnet18 --dataset synthetic --epochs 0", "epochs must be"),
    ("retrain-unknown-baseline", "retrain --baseline resnet34 --dataset synthetic", "unknown baseline 'resnet34'"),
    ("retrain-set-not-data", "retrain --baseline resnet18 --dataset synthetic --set study.n_trials=3", "retrain --set takes data.KEY=VALUE or train.KEY=VALUE"),
    ("retrain-set-by-flag", "retrain --baseline resnet18 --dataset synthetic --set train.lr=1", "retrain sets train.lr by its flag --lr"),
    ("retrain-keep", "retrain --baseline resnet18 --dataset synthetic --keep val_loss", "--keep must be one of"),
    ("retrain-trial-needs-study", "retrain --study-name smoke", "--study-name needs --trial N"),
    ("retrain-missing-checkpoint", "retrain --checkpoint missing.pt", "checkpoint missing.pt not found"),
    ("retrain-swapped-checkpoint", "retrain --checkpoint swapped.pt --dataset synthetic",
     "does not match the file: it records arch_hash"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as a user's: storage/ with study "smoke" (trial 0 complete, trial 1 failed), its data,
    and the bad files the rows point at."""
    from optuna.trial import TrialState

    from nas3d.architecture import Architecture
    from nas3d.checkpoint import save_checkpoint
    from nas3d.config import load_study_config
    from nas3d.data import load_splits
    from nas3d.model import build_model
    from nas3d.objective import TrialObjective
    from nas3d.storages import artifact_store_for, make_storage
    from nas3d.study import create_study, load_study

    ws = tmp_path_factory.mktemp("workspace")
    url = f"sqlite:///{ws / 'storage' / 'nas3d.db'}"
    config = load_study_config(SMOKE).with_overrides({"data.root": str(ws / "data")})
    storage = make_storage(url)
    create_study(config, storage)
    study, config = load_study("smoke", storage)
    study.enqueue_trial({"stacks": 1})
    objective = TrialObjective(config, load_splits(config.data, "cpu", for_search=True), "cpu",
                               artifact_store_for(url))
    study.optimize(objective, n_trials=1)
    failed = study.ask()
    failed.set_user_attr("failure_reason", "NonFiniteLoss: training loss became nan in epoch 1")
    study.tell(failed, state=TrialState.FAIL)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    _own_data(ws, storage)
    # Nothing of this process may hold the database open while the rows run: a session left behind by
    # the trial's threads closes whenever the garbage collector finds it, and SQLite then checkpoints
    # the WAL into nas3d.db and deletes -wal and -shm, in the middle of a row's snapshot.
    storage.engine.dispose()
    gc.collect()
    assert not (ws / "storage" / "nas3d.db-shm").exists()

    (ws / "corrupt").mkdir()
    (ws / "corrupt" / config.data.file_name).write_bytes(b"PK\x03\x04 not really a zip file")
    (ws / "outdir").mkdir()
    (ws / "existing.pt").write_bytes(b"keep me")
    (ws / "bad-utf8.toml").write_bytes(b'[study]\nname = "caf\xe9"\n')
    (ws / "binary.toml").write_bytes(b"\x00\x01\x02\x03binary\x00")
    (ws / "bad-key.toml").write_text(Path(SMOKE).read_text().replace("max_epochs", "max_epoch"))
    relu = Architecture(("relu_conv3",), ((0, 1), (1, 2)), 1, 1, 8)
    save_checkpoint(ws / "swapped.pt", build_model(relu), relu, in_channels=1, num_classes=2, input_size=12,
                    metadata={"dataset": "synthetic"})
    raw = torch.load(ws / "swapped.pt", weights_only=True)
    mish = Architecture(("mish_conv3",), ((0, 1), (1, 2)), 1, 1, 8)  # the same weight shapes and FLOPs
    raw["model"]["args"]["architecture"] = mish.to_dict()
    torch.save(raw, ws / "swapped.pt")
    return ws


def _own_data(ws: Path, storage) -> None:
    """Manifests for the own-data rows: each folder a small NIfTI set spoiled one way; study "own" made
    from own/labels.csv, whose volume then changed; a one-channel checkpoint own.pt."""
    import csv
    import dataclasses

    import numpy as np

    from nas3d.architecture import Architecture
    from nas3d.checkpoint import save_checkpoint
    from nas3d.config import load_study_config
    from nas3d.data import prepare_data
    from nas3d.model import build_model
    from nas3d.study import create_study
    from tests.test_own_data import nifti_folder, write_volume

    def folder(name: str, **kwargs: object) -> Path:
        nifti_folder(ws / name, n=9, shape=(6, 6, 6), **kwargs)
        return ws / name

    def rewrite(path: Path, edit) -> None:
        rows = list(csv.DictReader(open(path)))
        edit(rows)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    case = "volumes/case002_0.nii.gz"  # the third row: line 4 of the CSV
    (folder("missing") / case).unlink()
    (folder("unreadable") / case).write_bytes(b"not a NIfTI file")
    write_volume(folder("nan") / case, np.full((6, 6, 6), np.nan, np.float32))
    write_volume(folder("channels") / case, np.zeros((6, 6, 6, 2), np.float32))
    rewrite(folder("single") / "labels.csv", lambda rows: [r.update(label="benign") for r in rows])
    splits = ["train", "val", "test"]
    rewrite(folder("val-only") / "labels.csv", lambda rows: [
        r.update(split="val" if r["label"] == "malignant" else splits[i % 3]) for i, r in enumerate(rows)])
    rewrite(folder("no-test") / "labels.csv", lambda rows: [r.update(split=splits[i % 2]) for i, r in enumerate(rows)])
    (ws / "no-label.csv").write_text("image,diagnosis\nmissing/volumes/case000_0.npy,benign\n")

    config = load_study_config(SMOKE).with_overrides({"study.name": "own", "data.size": 6,
                                                      "data.dataset": str(folder("own") / "labels.csv")})
    create_study(dataclasses.replace(config, data=prepare_data(config.data)), storage)  # as prepare_study
    write_volume(ws / "own" / case, np.ones((6, 6, 6), np.float32))  # changed under the study
    relu = Architecture(("relu_conv3",), ((0, 1), (1, 2)), 1, 1, 8)
    save_checkpoint(ws / "own.pt", build_model(relu), relu, in_channels=1, num_classes=2, input_size=6)
    np.save(ws / "two-channels.npy", np.zeros((2, 6, 6, 6), np.float32))
    np.save(ws / "one-channel.npy", np.zeros((6, 6, 6), np.float32))


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file (size, mtime) and folder (None) under ``root``."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


def check_refused(workspace: Path, before: dict, code: int | None, stderr: str, expected: str) -> None:
    """Exit code 2, one line naming the problem, no password echoed, nothing written."""
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("nas3d: error: "), stderr
    assert expected in lines[0]
    assert "secret" not in lines[0]  # passwords are never echoed
    assert snapshot(workspace) == before


@pytest.mark.parametrize(("command", "expected"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    workspace: Path, command: str, expected: str, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    from nas3d.cli import main

    for name in [k for k in os.environ if k.startswith("NAS3D_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NAS3D_HOME", str(workspace / "storage"))
    for name in PROXIES:
        monkeypatch.setenv(name, CLOSED_PORT)
    # urlopen builds its global opener, proxies included, at its first call: made in a row (a download
    # that fails), it would outlive the row and send every later test's local HTTP request to the closed
    # port (the dashboard tests' requests to their own server were refused).
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.chdir(workspace)
    # What the process would print besides the CLI's lines: log records at INFO and above (the CLI's
    # logging level), Optuna's too (its own handler writes to stderr), and the warnings Python shows.
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(logging.getLogger("optuna"), "propagate", True)
    before = snapshot(workspace)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(shlex.split(command))
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    gc.collect()  # a storage left to the garbage collector must close its SQLite files before the snapshot
    shown = [w for w in caught if not issubclass(w.category, SILENT_WARNINGS)]
    stderr = "\n".join([capfd.readouterr().err.strip(), *(r.getMessage() for r in caplog.records),
                        *(str(w.message) for w in shown)])
    check_refused(workspace, before, code, stderr, expected)


@pytest.mark.parametrize(("command", "expected"), [row[1:] for row in ROWS if row[0] in ENTRY_POINT_ROWS],
                         ids=[row[0] for row in ROWS if row[0] in ENTRY_POINT_ROWS])
def test_bad_input_through_the_nas3d_command(workspace: Path, command: str, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NAS3D_")}
    env.update(NAS3D_HOME=str(workspace / "storage"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               **dict.fromkeys(PROXIES, CLOSED_PORT))
    before = snapshot(workspace)
    result = subprocess.run([sys.executable, "-m", "nas3d", *shlex.split(command)], cwd=workspace, env=env,
                            capture_output=True, text=True, timeout=300)
    check_refused(workspace, before, result.returncode, result.stderr, expected)


def test_the_entry_point_rows_are_rows() -> None:
    assert set(ENTRY_POINT_ROWS) <= {row[0] for row in ROWS}
