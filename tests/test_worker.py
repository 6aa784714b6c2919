"""Workers as real processes on a real storage: exact budget, crash recovery, clean stops."""

from __future__ import annotations

import itertools
import logging
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
from nas3d.budget import budget_state
from nas3d.records import NOT_TRAINED, WORKER
from nas3d.space import params_for
from nas3d.storages import make_storage
from nas3d.study import create_study
from nas3d.worker import run_worker
from tests.test_study import smoke_config

pytestmark = pytest.mark.slow

HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "3"]


def start_worker(storage_url: str, name: str, index: int = 0, *extra: str, log: Path | None = None,
                 command: str = "worker") -> subprocess.Popen:
    """``nas3d worker`` (or ``launch``) as a process; with ``log``, its output goes there, debug lines
    included, to be read while it runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    flags = ["--worker-index", str(index)] if command == "worker" else ["--cpu", "--workers", "1"]
    command_line = [sys.executable, "-m", "nas3d", *(["-v"] if log else []), command, "--study-name", name,
                    "--storage", storage_url, *flags, *HEARTBEAT, *extra]
    if log is None:
        return subprocess.Popen(command_line, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    with log.open("w") as output:  # the child has its own copy
        return subprocess.Popen(command_line, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 240, log: Path | None = None) -> str:
    output, _ = process.communicate(timeout=timeout)
    output = log.read_text() if log else output
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
    return [t for t in trials if t.number not in retried and NOT_TRAINED not in t.user_attrs]


def test_two_workers_finish_exactly_the_budget(storage_url: str, tmp_path: Path) -> None:
    config = smoke_config(tmp_path, **{"study.n_trials": 7, "study.name": "two-workers"})
    study = create_study(config, make_storage(storage_url))
    # 30 s of grace: a heartbeat lagging 3 s on a loaded machine would fail a trial as stale (recovery,
    # tested below), which is not what this test is about
    workers = [start_worker(storage_url, "two-workers", i, "--grace-period", "30") for i in range(2)]
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


def claim_process_of(worker: int) -> int:
    """The claim process of worker process ``worker`` (its other child: multiprocessing's resource
    tracker)."""
    [claims] = [pid for pid in children(worker) if b"spawn_main" in _cmdline(pid)]
    return claims


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _ended(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_killed_worker_trial_is_retried_and_budget_stays_exact(storage_url: str, tmp_path: Path) -> None:
    study = long_trials_study(storage_url, tmp_path, "crash")
    victim = start_worker(storage_url, "crash")
    wait_until_training(study)
    claims = claim_process_of(victim.pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    wait_for(lambda: _ended(claims), timeout=30)  # it ends too
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
    assert "worker stopped by SIGTERM after 0 trials" in output  # the interrupted one did not finish
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
    log = tmp_path / "first.log"
    first = start_worker(storage_url, "tail", 0, log=log)
    wait_until_training(study)
    wait_for(lambda: "nothing claimed ahead: 1 trials left for 1 busy workers" in log.read_text())
    assert budget_state(study).waiting == 1
    second = start_worker(storage_url, "tail", 1)
    wait_until_training(study, claimed=2)  # the second worker took the queued trial
    running = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert {t.system_attrs[WORKER]["pid"] for t in running} == {first.pid, second.pid}
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

    from nas3d.claim_process import ClaimProcess
    from nas3d.claims import Claim, TrialSource
    from nas3d.heartbeat import StopFlag

    storage_url, storage, busy = _study_with_a_silent_trial(tmp_path, "outage-age")
    storage.last_outage = time.monotonic()  # the worker just met an outage (its heartbeat was skipped)
    study = optuna.load_study(study_name="outage-age", storage=storage)
    settings = _settings(storage_url, "outage-age")
    claims = ClaimProcess(TrialSource(settings, study, storage, None, None, StopFlag()))
    try:
        claims.request(wait=True)
        first = claims.result()
        received = time.monotonic()
        assert isinstance(first, Claim)
        assert storage.get_trial(busy).state == TrialState.RUNNING  # within a grace period of the outage
        wait_for(lambda: not storage.recovering(), interval=0.1)
        # The claim process dated the outage when it read the request, after its spawn start (seconds
        # on a loaded machine), so its window can outlast this process's: it ends a grace period after
        # that read, which came before the first claim was received here.
        wait_for(lambda: time.monotonic() - received > settings.grace_period, interval=0.1)
        storage.last_outage = -math.inf  # nothing new: the claim process remembers the outage's time
        claims.request(wait=True)
        _assert_failed_as_stale(storage, busy, first, claims.result())
    finally:
        claims.close()


def _settings(storage_url: str, name: str, **overrides):
    """A worker's settings for the smoke study: heartbeats every second, a grace period of 2 s."""
    from nas3d.claims import WorkerSettings
    from nas3d.data import DataShape

    values = dict(study_name=name, storage_url=storage_url, worker_number=0, heartbeat_interval=1,
                  grace_period=2, retry_window=0, max_free_streak=100,
                  shape=DataShape(in_channels=1, num_classes=3, size=12), log_level=logging.WARNING)
    return WorkerSettings(**{**values, **overrides})


def _study_with_a_silent_trial(tmp_path: Path, name: str):
    """A study on SQLite (grace period 2 s) with another worker's RUNNING trial whose last beat is
    3 s old: stale, unless an outage was seen within a grace period."""
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = create_study(smoke_config(tmp_path, **{"study.name": name}), make_storage(storage_url))
    storage = make_storage(storage_url, heartbeat_interval=1, grace_period=2)
    busy = storage.create_new_trial(study._study_id)
    storage.set_trial_system_attr(busy, WORKER, {"worker": 9, "host": "elsewhere", "pid": 1})
    storage.record_heartbeat(busy)
    # until its last beat is older than the grace period (Optuna's own staleness query, read only)
    wait_for(lambda: busy in optuna.storages.RDBStorage._get_stale_trial_ids(storage, study._study_id),
             interval=0.1)
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
    # as if this process were a claim process (its worker: this process's parent)
    source = claim_source(_settings(storage_url, "lock-outage", retry_window=30, pid=os.getppid()))

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
    wait_for(lambda: not source.storage.recovering(), interval=0.1)  # a grace period later: stale now
    _assert_failed_as_stale(storage, busy, first, source.claim(wait=True))


def test_a_claim_process_whose_worker_ended_claims_nothing(tmp_path: Path) -> None:
    """A worker killed while its claim process claims (launch has failed and queued its trials again
    by then) must not leave a trial claimed for nobody: the claim process stops claiming."""
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = create_study(smoke_config(tmp_path, **{"study.name": "orphaned"}), make_storage(storage_url))
    # A stand-in worker: starts its claim process, asks for a claim and dies before the reply.
    script = (
        "import os, optuna\n"
        "from nas3d.claim_process import ClaimProcess\n"
        "from nas3d.claims import TrialSource\n"
        "from nas3d.heartbeat import StopFlag\n"
        "from tests.test_worker import _settings\n"
        f"settings = _settings({storage_url!r}, 'orphaned')\n"
        "storage = settings.open_storage()\n"
        "study = optuna.load_study(study_name='orphaned', storage=storage)\n"
        "claims = ClaimProcess(TrialSource(settings, study, storage, None, None, StopFlag()))\n"
        "claims.request(wait=True)\n"
        "print(claims._process.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    worker = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert worker.returncode == 0, worker.stderr
    claim_process = int(worker.stdout.strip())
    wait_for(lambda: not Path(f"/proc/{claim_process}").exists() or _zombie(claim_process), timeout=60)
    assert study.get_trials() == []


# --- a claim process killed, a trial claimed ahead lost, a worker stopped past the grace period -------


def kill_children(pid: int) -> list[int]:
    """``kill -9`` of every child of ``pid`` (``ps --ppid``), as an operator or the OOM killer would."""
    killed = children(pid)
    for child in killed:
        os.kill(child, signal.SIGKILL)
    return killed


@pytest.mark.parametrize("command", ["worker", "launch"])
def test_a_killed_claim_process_is_replaced_and_its_trial_queued_again(
    storage_url: str, tmp_path: Path, command: str
) -> None:
    """kill -9 of the worker's children (``ps --ppid``), once while its claim process claims (a trial
    asked and marked, not yet handed over) and once while a trial trains: the worker starts another
    claim process each time, the trial claimed for nobody is failed and queued again, the budget is met
    exactly, and the worker ends cleanly (``launch`` restarts nothing)."""
    ops = ("relu_conv3", "mish_conv3", "conv3_in_relu")
    study = long_trials_study(storage_url, tmp_path, "killed-claims", ops, epochs=30)
    log = tmp_path / "worker.log"
    process = start_worker(storage_url, "killed-claims", log=log, command=command)
    worker = process.pid
    if command == "launch":
        wait_for(lambda: any(b"worker" in _cmdline(pid) for pid in children(process.pid)))
        [worker] = [pid for pid in children(process.pid) if b"worker" in _cmdline(pid)]

    def claiming() -> bool:  # asked and marked under the lock; its costs (seconds, a process's first) not yet
        return any(t.state == TrialState.RUNNING and WORKER in t.system_attrs and "params" not in t.user_attrs
                   for t in study.get_trials(deepcopy=False))

    wait_for(claiming, interval=0.02)
    kill_children(worker)
    wait_until_training(study, claimed=2)  # a new claim process: one trial trains, the next is claimed
    kill_children(worker)
    output = finish(process, timeout=600, log=log)
    assert output.count("the claim process of this worker ended (status -9); starting another") == 2, output
    trials = study.get_trials()
    # The first kill always loses the trial being claimed. The second may lose one too: the claim made
    # ahead records its architecture a moment before its reply is sent, and a kill in that moment
    # (seen on a loaded CI machine) leaves it claimed for nobody as well.
    lost = [t for t in trials if (t.user_attrs.get("failure_reason") or "").startswith("claimed by its")]
    assert 1 <= len(lost) <= 2, output
    for trial in lost:
        assert trial.state == TrialState.FAIL and "device" not in trial.user_attrs  # never trained
        reason = trial.user_attrs["failure_reason"]
        assert reason.endswith("ended (status -9) before handing it over; re-queued")
        [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
        # the retry keeps what the lost trial had sampled when its claim process died
        assert retry.state == TrialState.COMPLETE and retry.params.items() >= trial.params.items()
    assert not [t for t in trials if t.state == TrialState.RUNNING], output
    assert len(counted(study)) == budget_state(study).used == len(ops), output
    assert all(t.state == TrialState.COMPLETE for t in counted(study)), output
    assert "Traceback" not in output
    if command == "launch":
        assert "restarting" not in output and output.count("starting worker") == 1


def test_a_trial_claimed_ahead_then_failed_as_stale_is_not_trained(tmp_path: Path) -> None:
    """A claim process stopped past the grace period (SIGSTOP) while it holds a trial: another worker
    fails that trial as stale and queues it again; the worker checks before training, and claims again."""
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    ops = ("relu_conv3", "mish_conv3", "conv3_in_relu")
    # trial 0 must still train when trial 1 is failed (3 s grace after the stop, then a poll): at 30
    # epochs a fast CPU finished it in 3 s and began trial 1, which took the after-training path instead
    study = long_trials_study(storage_url, tmp_path, "stale-ahead", ops, epochs=100)
    log = tmp_path / "worker.log"
    worker = start_worker(storage_url, "stale-ahead", log=log)
    wait_until_training(study, claimed=2)
    claims = claim_process_of(worker.pid)
    os.kill(claims, signal.SIGSTOP)
    try:
        # another worker's claim: the held trial's beats stopped a grace period ago (3 s)
        other = optuna.load_study(study_name="stale-ahead",
                                  storage=make_storage(storage_url, heartbeat_interval=1, grace_period=3))
        wait_for(lambda: (optuna.storages.fail_stale_trials(other),
                          other.trials[1].state == TrialState.FAIL)[1])
    finally:
        os.kill(claims, signal.SIGCONT)
    output = finish(worker, timeout=600, log=log)
    assert "trial 1, claimed ahead, was finished by another worker meanwhile (stale heartbeat)" in output
    trials = study.get_trials()
    assert trials[1].user_attrs["failure_reason"].startswith("stale heartbeat")
    assert "device" not in trials[1].user_attrs  # not trained
    assert not [t for t in trials if t.state == TrialState.RUNNING], output
    assert len(counted(study)) == budget_state(study).used == len(ops)
    assert all(t.state == TrialState.COMPLETE for t in counted(study)), output


def test_a_worker_woken_past_the_grace_period_discards_its_result_in_one_line(tmp_path: Path) -> None:
    """A worker stopped (SIGSTOP) past the grace period while it trains: its trial is failed as stale
    and queued again; woken, it says in one line that its result is discarded, and goes on."""
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = long_trials_study(storage_url, tmp_path, "zombie", ("relu_conv3",), epochs=30)
    log = tmp_path / "worker.log"
    worker = start_worker(storage_url, "zombie", 0, "--no-claim-ahead", log=log)
    wait_until_training(study)
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        other = optuna.load_study(study_name="zombie",
                                  storage=make_storage(storage_url, heartbeat_interval=1, grace_period=3))
        wait_for(lambda: (optuna.storages.fail_stale_trials(other),
                          other.trials[0].state == TrialState.FAIL)[1])
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    output = finish(worker, timeout=600, log=log)
    assert ("trial 0 was already finished by another worker (stale heartbeat: this worker was silent past "
            "the grace period); the result of this run is discarded") in output
    assert "UpdateFinishedTrialError" not in output
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # its retry trained here
    assert "worker 0 ran 1 trials" in output  # the discarded one is not counted
