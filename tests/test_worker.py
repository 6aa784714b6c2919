"""Workers as real processes on a real storage: exact budget, crash recovery, clean stops."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas3d.architecture import Architecture
from nas3d.budget import WORKER_ATTR, budget_state
from nas3d.records import NOT_TRAINED as NOT_TRAINED_ATTR
from nas3d.space import params_for
from nas3d.storages import make_storage
from nas3d.study import create_study
from nas3d.worker import run_worker
from tests.test_study import smoke_config

pytestmark = pytest.mark.slow

HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "3"]


def start_worker(storage_url: str, name: str, index: int = 0, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "nas3d", "worker", "--study-name", name, "--storage", storage_url,
               "--worker-index", str(index), *HEARTBEAT, *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def wait_for(predicate, timeout: float = 120, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that use budget: all but failed trials that were queued again, and duplicates."""
    trials = study.get_trials()
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return [t for t in trials if t.number not in retried and NOT_TRAINED_ATTR not in t.user_attrs]


def test_two_workers_finish_exactly_the_budget(storage_url: str, tmp_path: Path) -> None:
    config = smoke_config(tmp_path, **{"study.n_trials": 7, "study.name": "two-workers"})
    study = create_study(config, make_storage(storage_url))
    workers = [start_worker(storage_url, "two-workers", i) for i in range(2)]
    outputs = [finish(w) for w in workers]
    trials = study.get_trials()
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), outputs
    evaluated = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert len(evaluated) == 7 == budget_state(study).used


def long_trials_study(storage_url: str, tmp_path: Path, name: str,
                      ops: tuple[str, ...] = ("relu_conv3", "mish_conv3"), epochs: int = 60) -> optuna.Study:
    """One trial per op, long enough that a signal lands mid-training, each of a different architecture
    queued first, so that what is retried or trained does not depend on what the sampler would propose."""
    config = smoke_config(tmp_path, **{"study.n_trials": len(ops), "study.name": name,
                                       "train.max_epochs": epochs, "train.patience": epochs})
    study = create_study(config, make_storage(storage_url))
    for op in ops:
        arch = Architecture((op,), ((0, 1), (1, 2)), stacks=1, cells_per_stack=1, initial_filters=8)
        study.enqueue_trial(params_for(arch, config.space))
    return study


def wait_until_training(study: optuna.Study, claimed: int = 1) -> None:
    """Until a trial trains and ``claimed`` trials are RUNNING with their architecture and costs
    recorded (claimed, by a worker or its claim process)."""
    def ready() -> bool:
        running = [t for t in study.get_trials(deepcopy=False)
                   if t.state == TrialState.RUNNING and "params" in t.user_attrs]
        return len(running) >= claimed and any("device" in t.user_attrs for t in running)

    wait_for(ready)


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_killed_worker_trial_is_retried_and_budget_stays_exact(storage_url: str, tmp_path: Path) -> None:
    study = long_trials_study(storage_url, tmp_path, "crash")
    victim = start_worker(storage_url, "crash")
    wait_until_training(study)
    [claims] = children(victim.pid)  # the worker's claim process
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    wait_for(lambda: not Path(f"/proc/{claims}").exists() or _zombie(claims), timeout=30)  # it ends too
    killed = next(t for t in study.get_trials() if t.state == TrialState.RUNNING)
    finish(start_worker(storage_url, "crash"))
    trials = study.get_trials()
    assert trials[killed.number].state == TrialState.FAIL
    reason = trials[killed.number].user_attrs["failure_reason"]
    assert reason.startswith("stale heartbeat: no heartbeat for over 3 s")
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert len(counted(study)) == 2
    assert all(t.state == TrialState.COMPLETE for t in counted(study))


@pytest.mark.parametrize("claim_ahead", [True, False], ids=["claim-ahead", "in-turn"])
def test_sigterm_leaves_no_running_trial_and_requeues_it(tmp_path: Path, claim_ahead: bool) -> None:
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    ops = ("relu_conv3", "mish_conv3", "conv3_in_relu")
    study = long_trials_study(storage_url, tmp_path, "stop", ops)
    worker = start_worker(storage_url, "stop", 0, *([] if claim_ahead else ["--no-claim-ahead"]))
    # claiming ahead, the second queued trial is claimed while the first trains
    wait_until_training(study, claimed=2 if claim_ahead else 1)
    worker.send_signal(signal.SIGTERM)
    output = finish(worker, timeout=60)
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING], output
    interrupted = trials[:2] if claim_ahead else trials[:1]
    reasons = [t.user_attrs["failure_reason"] for t in interrupted]
    expected = ["interrupted: the worker received SIGTERM; re-queued",
                "interrupted before its training began: the worker received SIGTERM; re-queued"]
    assert reasons == expected[: len(reasons)]
    for trial in interrupted:
        assert trial.state == TrialState.FAIL
        [requeued] = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
        assert requeued.state == TrialState.WAITING and requeued.params == trial.params
        assert "failure_reason" not in requeued.user_attrs
    # the re-queued trials replace the interrupted ones: the budget stays the queued architectures
    assert budget_state(study).used == len(ops) and len(trials) == len(ops) + len(interrupted)


def test_the_last_trials_are_not_claimed_ahead(tmp_path: Path) -> None:
    """With as few trials left as workers running, a claim ahead would make one trial wait for a busy
    worker while another could go idle: the worker claims it after its trial instead."""
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    # two trials that outlast both workers' start-up, one worker at first
    study = long_trials_study(storage_url, tmp_path, "tail", epochs=5000)
    first = start_worker(storage_url, "tail", 0)
    wait_until_training(study)
    time.sleep(5)  # its claim process has long had time to claim ahead, and must not have
    assert budget_state(study).waiting == 1
    second = start_worker(storage_url, "tail", 1)
    wait_until_training(study, claimed=2)  # the second worker took the queued trial
    running = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert {t.system_attrs[WORKER_ATTR]["pid"] for t in running} == {first.pid, second.pid}
    for worker in (first, second):
        worker.send_signal(signal.SIGTERM)
        finish(worker, timeout=60)


def test_claiming_ahead_overlaps_training_and_changes_no_result(tmp_path: Path) -> None:
    """The next trial is claimed while the current one trains, and every trial scores as it does when
    the worker samples between trials: claiming draws no random numbers from training's generator."""
    results = {}
    for claim_ahead in (True, False):
        storage_url = f"sqlite:///{tmp_path / f'{claim_ahead}.sqlite'}"
        config = smoke_config(tmp_path, **{"study.n_trials": 4, "study.name": "ahead"})
        study = create_study(config, make_storage(storage_url))
        assert run_worker("ahead", storage_url, claim_ahead=claim_ahead) == 4
        trials = study.get_trials()
        assert all(t.state == TrialState.COMPLETE for t in trials)
        overlaps = [b.datetime_start < a.datetime_complete for a, b in itertools.pairwise(trials)]
        # the last trial is claimed in turn: with one trial left per running worker none is claimed ahead
        assert overlaps == [claim_ahead, claim_ahead, False]
        results[claim_ahead] = [(t.user_attrs["arch_hash"], t.values, t.user_attrs["val_acc"])
                                for t in trials]
    assert results[True] == results[False]


def test_duplicates_are_free_and_a_streak_of_them_stops_the_study(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    config = smoke_config(tmp_path, **{"study.n_trials": 3, "study.name": "dups"})
    study = create_study(config, make_storage(storage_url))
    arch = Architecture(("relu_conv3",), ((0, 1), (1, 2)), stacks=1, cells_per_stack=1, initial_filters=8)
    for _ in range(4):
        study.enqueue_trial(params_for(arch, config.space))
    # one trained, then three duplicates in a row: free, but a streak of three ends the study
    assert run_worker("dups", storage_url, max_free_streak=3) == 4
    state = budget_state(study)
    assert (state.used, state.duplicates, state.free_streak, state.waiting) == (1, 3, 3, 0)
    assert [t.user_attrs.get("duplicate_of") for t in study.trials] == [None, 0, 0, 0]
    # said by the worker's claim process, on the standard error it shares with the worker
    assert "the last 3 trials were all duplicates" in capfd.readouterr().err


def test_the_claim_process_waits_out_an_outage_its_worker_met(tmp_path: Path) -> None:
    """After an outage every live trial looks stale until its worker beats again, so stale trials are
    failed only a grace period later; an outage the worker met while its claim process sat idle
    counts for the claim process too."""
    import math

    from nas3d.claims import Claim, ClaimProcess, TrialSource
    from nas3d.heartbeat import StopFlag

    storage_url, storage, busy = _study_with_a_silent_trial(tmp_path, "outage-age")
    storage.last_outage = time.monotonic()  # the worker just met an outage (its heartbeat was skipped)
    study = optuna.load_study(study_name="outage-age", storage=storage)
    source = TrialSource(study, storage, None, None, config=None,
                         marker={"worker": 0, "host": "here", "pid": os.getpid()}, beats=True,
                         heartbeat_interval=1, grace=2, window=0, max_free_streak=100, stop=StopFlag())
    claims = ClaimProcess(source, {"study_name": "outage-age", "storage": storage_url, "worker_number": 0,
                                   "shape": {"in_channels": 1, "num_classes": 3, "size": 12},
                                   "log_level": "WARNING"})
    try:
        claims.request(wait=True)
        first = claims.result()
        assert isinstance(first, Claim)
        assert storage.get_trial(busy).state == TrialState.RUNNING  # within a grace period of the outage
        time.sleep(3)
        storage.last_outage = -math.inf  # nothing new: the claim process remembers the outage's time
        claims.request(wait=True)
        _assert_failed_as_stale(storage, busy, first, claims.result())
    finally:
        claims.close()


def _study_with_a_silent_trial(tmp_path: Path, name: str):
    """A study on SQLite (grace period 2 s) with another worker's RUNNING trial whose last beat is
    3 s old: stale, unless an outage was seen within a grace period."""
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = create_study(smoke_config(tmp_path, **{"study.name": name}), make_storage(storage_url))
    storage = make_storage(storage_url, heartbeat_interval=1, grace_period=2)
    busy = storage.create_new_trial(study._study_id)
    storage.set_trial_system_attr(busy, WORKER_ATTR, {"worker": 9, "host": "elsewhere", "pid": 1})
    storage.record_heartbeat(busy)
    time.sleep(3)
    return storage_url, storage, busy


def _assert_failed_as_stale(storage, busy: int, *claims) -> None:
    from nas3d.claims import Claim

    assert all(isinstance(claim, Claim) for claim in claims)
    failed = storage.get_trial(busy)
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["failure_reason"].startswith("stale heartbeat")
    for claim in claims:
        claim.stop_beating()


def test_an_outage_met_waiting_for_the_study_lock_holds_off_stale_failures(tmp_path: Path) -> None:
    """A claim that waited for the study lock through an outage made no storage call that noticed it;
    live trials whose workers have not beaten since the database came back are not stale yet."""
    from nas3d.claims import Claim, claim_source
    from nas3d.storages import StorageUnavailable

    storage_url, storage, busy = _study_with_a_silent_trial(tmp_path, "lock-outage")
    source = claim_source({"storage": storage_url, "study_name": "lock-outage", "worker_number": 0,
                           "shape": {"in_channels": 1, "num_classes": 3, "size": 12},
                           "marker": {"worker": 0, "host": "here", "pid": os.getpid()},
                           "heartbeat_interval": 1, "grace": 2, "retry_window": 30, "max_free_streak": 100,
                           "worker_pid": os.getppid()})  # as if this process were a claim process

    class LockBehindAnOutage:  # the study lock's connection, refused once (the server was down)
        def __init__(self, lock) -> None:
            self.lock, self.refusals = lock, 1

        def acquire(self) -> None:
            if self.refusals:
                self.refusals -= 1
                raise StorageUnavailable("connection refused")
            self.lock.acquire()

        def release(self) -> None:
            self.lock.release()

    source.lock = LockBehindAnOutage(source.lock)
    first = source.claim(wait=True)
    assert isinstance(first, Claim)
    assert storage.get_trial(busy).state == TrialState.RUNNING  # its worker may not have beaten yet
    time.sleep(2.5)  # a grace period after the outage: now it is stale
    _assert_failed_as_stale(storage, busy, first, source.claim(wait=True))


def test_a_claim_process_whose_worker_ended_claims_nothing(tmp_path: Path) -> None:
    """A worker killed while its claim process claims (launch has failed and queued its trials again
    by then) must not leave a trial claimed for nobody: the claim process stops claiming."""
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = create_study(smoke_config(tmp_path, **{"study.name": "orphaned"}), make_storage(storage_url))
    # A stand-in worker: starts its claim process, asks for a claim and dies before the reply.
    script = (
        "import os, sys, optuna\n"
        "from nas3d.storages import make_storage\n"
        "from nas3d.claims import ClaimProcess, TrialSource\n"
        "from nas3d.heartbeat import StopFlag\n"
        f"storage = make_storage({storage_url!r}, heartbeat_interval=1, grace_period=2)\n"
        "study = optuna.load_study(study_name='orphaned', storage=storage)\n"
        "source = TrialSource(study, storage, None, None, config=None, marker={'worker': 0, 'host': 'here',"
        " 'pid': os.getpid()}, beats=True, heartbeat_interval=1, grace=2, window=0, max_free_streak=100,"
        " stop=StopFlag())\n"
        "claims = ClaimProcess(source, {'study_name': 'orphaned', 'storage': %r, 'worker_number': 0,"
        " 'shape': {'in_channels': 1, 'num_classes': 3, 'size': 12}, 'log_level': 'WARNING'})\n"
        "claims.request(wait=True)\n"
        "print(claims._process.pid, flush=True)\n"
        "os._exit(0)\n"
    ) % storage_url
    worker = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert worker.returncode == 0, worker.stderr
    claim_process = int(worker.stdout.strip())
    wait_for(lambda: not Path(f"/proc/{claim_process}").exists() or _zombie(claim_process), timeout=60)
    assert study.get_trials() == []
