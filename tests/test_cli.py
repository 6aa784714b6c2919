"""The `nas3d` command end to end, as a user runs it (real processes, real storages)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas3d.budget import budget_state
from nas3d.storages import make_storage

REPO = Path(__file__).resolve().parents[1]
#: Marks every process a CLI test starts, so that a leftover can be found whoever its parent is now.
RUN_TAG = "NAS3D_TEST_RUN"


def tagged_processes(tag: str) -> list[str]:
    """Command lines of the live processes whose environment carries ``RUN_TAG=tag``: the command
    and everything it started, wherever they were reparented."""
    marker = f"{RUN_TAG}={tag}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@contextmanager
def nas3d_group(*args: str, cwd: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """``nas3d`` in a process group of its own; on the way out the whole group is killed (a search's
    workers included) and no process it started may be left."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env, RUN_TAG: tag}
    process = subprocess.Popen([sys.executable, "-m", "nas3d", *args], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield process
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is empty: every process in it has exited
            pass
        process.communicate()
        if Path("/proc").is_dir():
            deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
            while (left := tagged_processes(tag)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert left == [], f"processes left behind by `nas3d {' '.join(args)}`: {left}"


def nas3d(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``nas3d ARGS`` to the end; a run past ``timeout`` fails the test, and never leaves workers behind."""
    with nas3d_group(*args, cwd=cwd, env={}) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"`nas3d {' '.join(args)}` ran past {timeout} s; stderr: {stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_search_smoke_study_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = nas3d("search", "--study", str(REPO / "studies" / "smoke.toml"), "--data-root", str(data),
                   "--n-trials", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "study 'smoke' ready" in result.stdout
    assert "for a budget of 3" in result.stdout
    study = optuna.load_study(study_name="smoke", storage=make_storage(None))
    assert budget_state(study).used == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    status = nas3d("status", cwd=tmp_path)
    assert status.returncode == 0 and "val_auc" in status.stdout


@pytest.mark.slow  # a `nas3d` subprocess: seconds of imports under load
def test_missing_dataset_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    result = nas3d("search", "--dataset", "nodulemnist3d", "--data-root", str(empty),
                   "--set", "data.download=false", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "nodulemnist3d.npz not found in" in lines[0] and "zenodo" in lines[0].lower()
    assert optuna.get_all_study_summaries(make_storage(None)) == []


@pytest.mark.slow  # a `nas3d` subprocess: seconds of imports under load
def test_download_failure_offline_never_switches_data(tmp_path: Path) -> None:
    # With download on and no network the job stops with the same kind of one-line error. No network
    # on any machine: every URL goes through a proxy port that is bound but never listens (refused).
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
        offline = {name: proxy for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
        offline |= {"no_proxy": "", "NO_PROXY": ""}
        # Should the download get through all the same, this starts a 200-trial search: the time limit
        # and the group kill make sure that neither hangs the suite nor leaves workers running.
        with nas3d_group("search", "--dataset", "adrenalmnist3d", "--data-root", str(tmp_path / "d"),
                         cwd=tmp_path, env=offline) as process:
            try:
                stdout, stderr = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                stdout, stderr = process.communicate()
                if "ready in" in stdout:  # pragma: no cover - the proxy settings were not honoured
                    pytest.skip("the network is available here: medmnist downloaded the file and searched")
                pytest.fail(f"no answer in 120 s from a download that cannot connect: {stderr[-2000:]}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if result.returncode == 0:  # pragma: no cover - the proxy settings were not honoured
        pytest.skip("the network is available here: medmnist downloaded the file")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "adrenalmnist3d" in result.stderr
    assert optuna.get_all_study_summaries(make_storage(None)) == []


@pytest.mark.slow  # a `nas3d` subprocess: seconds of imports under load
def test_bad_study_file_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((REPO / "studies" / "smoke.toml").read_text().replace("max_epochs", "max_epoch"))
    result = nas3d("create-study", "--study", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "max_epoch" in result.stderr and "max_epochs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a `nas3d` subprocess: seconds of imports under load
def test_worker_for_unknown_study_says_how_to_create_it(tmp_path: Path) -> None:
    result = nas3d("worker", "--study-name", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert "no sqlite storage at" in result.stderr and "create-study" in result.stderr
    assert not (tmp_path / "nas3d-home").exists()  # a worker reads the storage; it never creates one


@pytest.mark.slow
def test_launch_runs_several_workers_against_postgresql(postgres_url: str, tmp_path: Path) -> None:
    name = "launch-pg"
    created = nas3d("create-study", "--study", str(REPO / "studies" / "smoke.toml"), "--name", name,
                    "--n-trials", "5", "--data-root", str(tmp_path / "data"), "--storage", postgres_url,
                    cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    result = nas3d("launch", "--study-name", name, "--storage", postgres_url, "--cpu", "--workers", "2",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("starting worker") == 2
    study = optuna.load_study(study_name=name, storage=make_storage(postgres_url))
    assert budget_state(study).used == 5
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]


# --- export, retrain, compare (in process: `main(argv)` returns the exit code the command exits with) --


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The smoke study with trial 0 COMPLETE (checkpoint stored) and trial 1 PRUNED as its duplicate."""
    from nas3d.config import load_study_config
    from nas3d.data import load_splits
    from nas3d.objective import TrialObjective
    from nas3d.storages import artifact_store_for
    from nas3d.study import create_study, load_study

    root = tmp_path_factory.mktemp("smoke")
    url = f"sqlite:///{root / 'db.sqlite'}"
    config = load_study_config(REPO / "studies" / "smoke.toml")
    config = config.with_overrides({"data.root": str(root / "data")})
    storage = make_storage(url)
    create_study(config, storage)
    study, config = load_study("smoke", storage)
    study.enqueue_trial({"stacks": 1}, skip_if_exists=False)
    objective = TrialObjective(config, load_splits(config.data, "cpu", for_search=True), "cpu",
                               artifact_store_for(url))
    study.optimize(objective, n_trials=1)
    study.enqueue_trial(study.trials[0].params)
    study.optimize(objective, n_trials=1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    return url, root


def run_main(*argv: str) -> int:
    from nas3d.cli import main

    return main(list(argv))


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("nas3d: error: ")
    return lines[0]


def test_export_gives_a_checkpoint_that_reproduces_the_trials_val_metrics(
    smoke_study: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from nas3d.checkpoint import load_checkpoint
    from nas3d.study import load_study
    from nas3d.train import evaluate

    url, _ = smoke_study
    out = tmp_path / "exported" / "trial0.pt"
    argv = ("export", "--storage", url, "--study-name", "smoke", "--trial", "0", "--out", str(out))
    assert run_main(*argv) == 0
    assert f"exported trial 0 of study 'smoke' to {out}" in capsys.readouterr().out
    checkpoint = load_checkpoint(out)
    study, config = load_study("smoke", make_storage(url))
    trial = study.trials[0]
    assert checkpoint.architecture.arch_hash() == trial.user_attrs["arch_hash"]
    from nas3d.data import load_splits

    data = load_splits(config.data, "cpu", for_search=True)
    model = checkpoint.build().to(memory_format=torch.channels_last_3d)
    val_auc, val_acc, _ = evaluate(model, data.val, "cpu", config.train.batch_size,
                                   channels_last=config.train.channels_last)
    assert (val_auc, val_acc) == (trial.values[0], trial.user_attrs["val_acc"])

    # an existing file is kept unless --force
    assert run_main(*argv) == 2
    assert "exists; pass --force" in one_line_error(capsys)
    assert run_main(*argv, "--force") == 0


@pytest.mark.parametrize("broken", [False, True], ids=["missing", "failing"])
def test_export_picture_without_a_working_dot_is_one_line_and_writes_nothing(
    smoke_study: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, broken: bool,
) -> None:
    from tests.test_drawing import without_dot

    url, _ = smoke_study
    without_dot(tmp_path / "bin", monkeypatch, broken=broken)
    out = tmp_path / "exported" / "best.pt"
    argv = ("export", "--storage", url, "--study-name", "smoke", "--trial", "0", "--out", str(out))
    assert run_main(*argv, "--picture") == 2
    line = one_line_error(capsys)
    assert line.startswith("nas3d: error: --picture: ") and line.endswith(", or drop --picture")
    assert ("no layout engine support" if broken else "Graphviz's `dot` is not on the PATH") in line
    assert not out.exists() and not out.with_suffix(".svg").exists()
    assert run_main(*argv) == 0 and out.exists()  # nothing left behind refuses the retry


@pytest.mark.parametrize(
    ("study_name", "trial", "expected"),
    [
        ("smoke", "1", "trial 1 of study 'smoke' has no checkpoint: it was pruned (duplicate of trial 0"),
        ("smoke", "7", "study 'smoke' has no trial 7 (its trials: numbered 0 to 1)"),
        ("nope", "0", "no study named 'nope'"),
    ],
)
def test_export_without_a_checkpoint_is_one_line_exit_2(
    smoke_study: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    study_name: str, trial: str, expected: str,
) -> None:
    url, _ = smoke_study
    out = tmp_path / "t.pt"
    assert run_main("export", "--storage", url, "--study-name", study_name, "--trial", trial,
                    "--out", str(out)) == 2
    assert expected in one_line_error(capsys)
    assert not out.exists()


def test_retrain_a_trial_on_its_studys_data(
    smoke_study: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nas3d.retrain import load_results

    url, root = smoke_study
    out = tmp_path / "trial0"
    code = run_main("retrain", "--storage", url, "--study-name", "smoke", "--trial", "0", "--epochs", "1",
                    "--seeds", "0,3", "--batch-size", "32", "--no-amp", "--out", str(out))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "retraining smoke-trial0" in printed and "mean±std over 2 of 2 seeds: test AUC" in printed
    results = load_results(out)
    # the study's recorded data (synthetic 12^3, 96 training samples), all of it
    assert results["data"]["root"] == str(root / "data") and results["size"] == 12
    assert results["samples"]["train"] == 96 and results["model"]["source"]["trial"] == 0


def test_retrain_from_a_checkpoint_and_a_baseline_then_compare(
    smoke_study: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from nas3d.checkpoint import FORMAT, load_checkpoint
    from nas3d.costs import measure_costs

    url, root = smoke_study
    exported = tmp_path / "trial0.pt"
    assert run_main("export", "--storage", url, "--study-name", "smoke", "--trial", "0", "--out",
                    str(exported)) == 0
    # the same tiny data for both: 4^3 keeps the ResNet fast on a CPU
    data = ("--size", "4", "--data-root", str(tmp_path / "data"), "--set", "data.synthetic_samples=32")
    common = ("--epochs", "1", "--seeds", "0", "--batch-size", "16", "--no-amp", *data)
    assert run_main("retrain", "--checkpoint", str(exported), *common, "--out", str(tmp_path / "nas")) == 0
    assert run_main("retrain", "--baseline", "resnet18", "--dataset", "synthetic", *common,
                    "--out", str(tmp_path / "r18")) == 0
    capsys.readouterr()
    raw = torch.load(tmp_path / "r18" / "seed-0.pt", weights_only=True)
    assert raw["format"] == FORMAT and raw["model"] == {"name": "resnet18", "args": {}}
    assert load_checkpoint(tmp_path / "r18" / "seed-0.pt").recipe.name == "resnet18"

    assert run_main("compare", str(tmp_path / "nas"), str(tmp_path / "r18")) == 0
    table = capsys.readouterr().out
    from nas3d.retrain import load_results

    nas_flops = load_results(tmp_path / "nas")["costs"]["flops"]
    nas_params = load_results(tmp_path / "nas")["costs"]["params"]
    r18 = measure_costs("resnet18", 1, 2, 4, with_thop=False)
    r18_flops, r18_params = r18.flops, r18.params
    assert "resnet18 FLOPs,params / run" in table
    assert f"{r18_flops / nas_flops:.1f}x, {r18_params / nas_params:.1f}x" in table
    assert "1.0x, 1.0x" in table  # the ResNet's own row
    assert "no published numbers for these datasets" in table


def test_retrain_with_failing_seeds_records_why_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from nas3d.architecture import Architecture
    from nas3d.model import build_model

    checkpoint = tmp_path / "tiny.pt"
    from nas3d.checkpoint import save_checkpoint

    arch = Architecture(("relu_conv3",), ((0, 1), (1, 2)), 1, 1, 8)
    save_checkpoint(checkpoint, build_model(arch), arch, in_channels=1, num_classes=2, input_size=8,
                    metadata={"dataset": "synthetic"})
    code = run_main("retrain", "--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "data"),
                    "--set", "data.synthetic_samples=32", "--lr", "1e12", "--epochs", "2", "--seeds", "0,1",
                    "--batch-size", "16", "--no-amp", "--out", str(tmp_path / "out"))
    captured = capsys.readouterr()
    assert code == 1
    assert "2 of 2 seeds failed" in captured.err and "NonFiniteLoss" in captured.err
    assert "no seed completed" in captured.out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [s["status"] for s in results["seeds"]] == ["failed", "failed"]
    assert all("NonFiniteLoss" in s["reason"] for s in results["seeds"])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--baseline", "resnet18"), "--baseline needs --dataset: one of organmnist3d"),
        (("--baseline", "resnet18", "--dataset", "synthetic", "--seeds", "0,x"), "--seeds expects"),
        (("--baseline", "resnet18", "--dataset", "synthetic", "--epochs", "0"), "epochs must be an integer"),
        (("--baseline", "resnet34", "--dataset", "synthetic"), "unknown baseline 'resnet34'"),
        (("--baseline", "resnet18", "--dataset", "synthetic", "--set", "study.name=x"), "takes data.KEY"),
        (("--baseline", "resnet18", "--dataset", "synthetic", "--set", "train.lr=1"), "by its flag --lr"),
        (("--study-name", "smoke"), "--study-name needs --trial N"),
        (("--checkpoint", "missing.pt"), "checkpoint missing.pt not found"),
    ],
)
def test_retrain_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], expected: str
) -> None:
    assert run_main("retrain", *argv, "--out", str(tmp_path / "out")) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_compare_prints_the_published_numbers_for_the_runs_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from nas3d.architecture import Architecture
    from nas3d.data import DataConfig
    from nas3d.retrain import RetrainConfig, RetrainSource, retrain

    arch = Architecture(("relu_conv3",), ((0, 1), (1, 2)), 1, 1, 8)
    data = DataConfig(dataset="synthetic", size=8, root=str(tmp_path / "data"), synthetic_samples=32)
    config = RetrainConfig.of(epochs=1, seeds=(0,), batch_size=16, amp=False)
    retrain(RetrainSource.from_architecture("tiny", arch), data, config, "cpu", tmp_path / "run")
    # As if the run had been on OrganMNIST3D at 28^3 (not available offline): compare only reads the file.
    path = tmp_path / "run" / "results.json"
    results = json.loads(path.read_text())
    path.write_text(json.dumps(results | {"dataset": "organmnist3d", "size": 28}))
    assert run_main("compare", str(tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "ResNet-18+3D" in out and "ResNet-50+3D" in out and "auto-sklearn" in out and "AutoKeras" in out
    assert "0.996/0.907" in out and "0.994/0.883" in out and "0.977/0.814" in out and "0.979/0.804" in out
    assert "test AUC 0.915, ACC 0.847" in out
    run_row = out.splitlines()[1]  # the run's row: its own numbers beside the published ResNets'
    assert "organmnist3d" in run_row and "0.996/0.907" in run_row and "0.994/0.883" in run_row
    assert "0.977/0.814" not in run_row
    # No ResNet retrained beside it: their costs on the run's data are counted (not trained) for the ratios.
    from nas3d.costs import measure_costs

    for name in ("resnet18", "resnet50"):
        ref = measure_costs(name, results["in_channels"], results["num_classes"], 28, with_thop=False)
        costs = results["costs"]
        ratio = f"{ref.flops / costs['flops']:.1f}x, {ref.params / costs['params']:.1f}x"
        assert f"{name} FLOPs,params / run" in out and ratio in run_row

    # the headline: nas3d's best run per dataset, averaged, beside the published means over the same
    # datasets; a second, better OrganMNIST3D run replaces the first, and a NoduleMNIST3D run joins
    runs = (("run", "organmnist3d", 0.95), ("better", "organmnist3d", 0.99),
            ("nodule", "nodulemnist3d", 0.91))
    for name, dataset, test_auc in runs:
        (tmp_path / name).mkdir(exist_ok=True)
        summary = results["summary"] | {"test_auc": {"mean": test_auc, "std": 0.0},
                                        "test_acc": {"mean": 0.8, "std": 0.0}}
        (tmp_path / name / "results.json").write_text(
            json.dumps(results | {"dataset": dataset, "size": 28, "summary": summary})
        )
    assert run_main("compare", *(str(tmp_path / n) for n in ("run", "better", "nodule"))) == 0
    out = capsys.readouterr().out
    assert ("nas3d, best run per dataset over 2 of 6 datasets (nodulemnist3d, organmnist3d; missing "
            "fracturemnist3d, adrenalmnist3d, vesselmnist3d, synapsemnist3d): mean test AUC 0.950, ACC 0.800"
            ) in out
    assert "ResNet-18+3D 0.929/0.875" in out  # (0.996 + 0.863) / 2, (0.907 + 0.844) / 2

    assert run_main("compare", str(tmp_path / "nothing-here")) == 2
    assert "nothing-here not found; give a folder written by `nas3d retrain`" in one_line_error(capsys)
