"""Many workers, many hosts: nothing trained twice, capped budgets, trial-owned failures, retries that
reproduce, SIGKILL escalation, and two hosts sharing one PostgreSQL study and one S3 store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from nas3d.architecture import Architecture
from nas3d.budget import budget_state
from nas3d.checkpoint import load_checkpoint
from nas3d.records import NOT_TRAINED as NOT_TRAINED_ATTR
from nas3d.records import WORKER as WORKER_ATTR
from nas3d.records import WORKERS as WORKERS_ATTR
from nas3d.space import params_for
from nas3d.storages import make_storage
from nas3d.study import create_study
from nas3d.testing.storages import temporary_database
from nas3d.worker import run_worker
from tests.test_study import smoke_config
from tests.test_worker import HEARTBEAT, finish, long_trials_study, start_worker, wait_until_training

pytestmark = pytest.mark.slow

#: One operation vertex, input -> op -> output, 8 or 16 filters: exactly two architectures.
TWO_ARCHITECTURES = {"space.ops": ["relu_conv3"], "space.max_op_vertices": 1, "space.max_edges": 2,
                     "space.initial_filters": "[8, 16]"}


def trained(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials whose architecture was trained (or is training): all but those decided untrained."""
    return [t for t in study.get_trials() if t.state != TrialState.WAITING
            and NOT_TRAINED_ATTR not in t.user_attrs and "duplicate_of" not in t.user_attrs]


def assert_each_architecture_trained_once(study: optuna.Study, budget: int) -> None:
    hashes = [t.user_attrs["arch_hash"] for t in trained(study)]
    assert len(hashes) == budget and len(set(hashes)) == budget, hashes
    assert all(t.state == TrialState.COMPLETE for t in trained(study))
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]


def test_two_bare_workers_never_train_an_architecture_twice(storage_url: str, tmp_path: Path) -> None:
    config = smoke_config(tmp_path, **{**TWO_ARCHITECTURES, "study.n_trials": 2, "study.name": "race"})
    study = create_study(config, make_storage(storage_url))
    workers = [start_worker(storage_url, "race", 0) for _ in range(2)]  # same index: as on two hosts
    for w in workers:
        finish(w)
    assert_each_architecture_trained_once(study, 2)
    # each worker got its own number (and so its own sampler seed) from the storage
    assert study._storage.get_study_system_attrs(study._study_id)[WORKERS_ATTR] == 2


def test_two_launch_workers_never_train_an_architecture_twice(postgres_server: str, tmp_path: Path) -> None:
    with temporary_database(postgres_server, "nas3d_launch") as url:
        config = smoke_config(tmp_path, **{**TWO_ARCHITECTURES, "study.n_trials": 2, "study.name": "race"})
        study = create_study(config, make_storage(url))
        launch = subprocess.run(
            [sys.executable, "-m", "nas3d", "launch", "--study-name", "race", "--storage", url, "--cpu",
             "--workers", "2", *HEARTBEAT],
            capture_output=True, text=True, timeout=300,
        )
        assert launch.returncode == 0, launch.stderr[-3000:]
        assert_each_architecture_trained_once(study, 2)


def test_a_cap_that_rules_out_most_of_the_space_still_trains_the_budget(tmp_path: Path) -> None:
    # At 12³, about nine in ten architectures of the smoke space are over 15 MFLOPs.
    config = smoke_config(tmp_path, **{"study.n_trials": 4, "study.name": "capped",
                                       "constraints.max_flops": 15e6})
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = create_study(config, make_storage(storage_url))
    run_worker("capped", storage_url)
    done = trained(study)
    assert len(done) == 4 and budget_state(study).used == 4
    assert all(t.state == TrialState.COMPLETE and t.values[1] <= 15e6 for t in done)
    over = [t for t in study.get_trials() if t.user_attrs.get(NOT_TRAINED_ATTR) == "over_constraints"]
    assert over and all(t.state == TrialState.PRUNED for t in over)
    assert all(t.user_attrs["failure_reason"].startswith("over budget: flops") for t in over)


def test_a_torch_error_fails_only_its_trial(tmp_path: Path) -> None:
    # At 4³ a third stack sees 1³ volumes, where InstanceNorm3d raises ValueError while training.
    config = smoke_config(tmp_path, **{"study.n_trials": 2, "study.name": "torch-error", "data.size": 4,
                                       "space.stacks": "[1, 3]"})
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = create_study(config, make_storage(storage_url))
    edges = ((0, 1), (1, 2))
    broken = Architecture(("conv3_in_relu",), edges, stacks=3, cells_per_stack=1, initial_filters=8)
    fine = Architecture(("relu_conv3",), edges, stacks=1, cells_per_stack=1, initial_filters=8)
    for arch in (broken, fine):
        study.enqueue_trial(params_for(arch, config.space))
    output = finish(start_worker(storage_url, "torch-error"))  # exit 0: the worker went on
    first, *others = study.get_trials()
    assert first.state == TrialState.FAIL, output
    assert first.user_attrs["failure_reason"].startswith("ValueError: Expected more than 1 spatial element")
    # it failed before its training began (counting its FLOPs runs the network), so it is free
    assert first.user_attrs[NOT_TRAINED_ATTR] == "error"
    assert [t.state for t in others] == [TrialState.COMPLETE] * 2 and budget_state(study).used == 2


def test_a_retried_trial_reproduces_the_original_on_the_cpu(tmp_path: Path) -> None:
    arch = Architecture(("conv3_in_relu",), ((0, 1), (1, 2)), stacks=1, cells_per_stack=1, initial_filters=8)
    results = []
    # The retry of a trial runs in another worker, whose random generators are wherever its earlier
    # trials left them: here, deliberately different states.
    for name, state in (("original", 1), ("retry", 2)):
        config = smoke_config(tmp_path, **{"study.n_trials": 1, "study.name": name})
        storage_url = f"sqlite:///{tmp_path / f'{name}.sqlite'}"
        study = create_study(config, make_storage(storage_url))
        study.enqueue_trial(params_for(arch, config.space))
        torch.manual_seed(state)
        run_worker(name, storage_url)
        [trial] = study.get_trials()
        assert trial.state == TrialState.COMPLETE
        results.append((trial.values, trial.user_attrs["val_acc"], trial.user_attrs["best_epoch"]))
    assert results[0] == results[1]


def test_launch_kills_a_worker_that_ignores_the_stop_and_leaves_nothing_running(tmp_path: Path) -> None:
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = long_trials_study(storage_url, tmp_path, "kill")
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO)\n"
        "from nas3d.launch import launch, plan_slots\n"
        f"sys.exit(launch('kill', {storage_url!r}, plan_slots(gpus=None, cpu_workers=1), {HEARTBEAT!r}, "
        "kill_grace=1.0))\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    wait_until_training(study)
    [running] = study.get_trials(states=(TrialState.RUNNING,))
    worker_pid = running.system_attrs[WORKER_ATTR]["pid"]
    os.kill(worker_pid, signal.SIGSTOP)  # a worker hung in a CUDA call or a syscall cannot stop itself
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, output  # a killed worker is not a clean end
    assert "killing it" in output
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING], output
    killed = trials[running.number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["failure_reason"].startswith("killed")
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.state == TrialState.WAITING and retry.params == killed.params


def test_two_hosts_share_one_postgresql_study_and_one_s3_store(
    postgres_server: str, s3_server: dict[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    with temporary_database(postgres_server, "nas3d_hosts") as url:
        config = smoke_config(tmp_path, **{"study.n_trials": 2, "study.name": "hosts"})
        study = create_study(config, make_storage(url), artifacts=f"s3://{s3_bucket}/nas3d/hosts")
        hosts = [tmp_path / "host-a", tmp_path / "host-b"]
        envs = []
        for host in hosts:
            host.mkdir()
            # Each host has its own working directory and nas3d home; only the database and the S3
            # endpoint and keys are shared.
            envs.append({**os.environ, **s3_server, "NAS3D_HOME": str(host / "storage"),
                         "OMP_NUM_THREADS": "1"})
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "nas3d", "worker", "--study-name", "hosts", "--storage", url,
                 *HEARTBEAT],
                cwd=host, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for host, env in zip(hosts, envs, strict=True)
        ]
        for w in workers:
            finish(w)
        assert_each_architecture_trained_once(study, 2)
        for trial in trained(study):
            exported = []
            for host, env in zip(hosts, envs, strict=True):
                out = host / f"trial-{trial.number}.pt"
                result = subprocess.run(
                    [sys.executable, "-m", "nas3d", "export", "--storage", url, "--study-name", "hosts",
                     "--trial", str(trial.number), "--out", out.name],
                    cwd=host, env=env, capture_output=True, text=True, timeout=120,
                )
                assert result.returncode == 0, result.stderr
                checkpoint = load_checkpoint(out)
                assert checkpoint.metadata["trial"] == trial.number
                assert checkpoint.architecture.arch_hash() == trial.user_attrs["arch_hash"]
                exported.append(out.read_bytes())
            assert exported[0] == exported[1]
        for host in hosts:  # nothing scattered into a host's own folder
            assert not (host / "storage" / "artifacts").exists()
