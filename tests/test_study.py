"""The study service in one process: objective, deduplication, constraints, warm start, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from nas3d import records
from nas3d.architecture import Architecture
from nas3d.checkpoint import load_checkpoint
from nas3d.config import StudyConfig, load_study_config
from nas3d.data import load_splits
from nas3d.objective import TrialObjective
from nas3d.seeds import seed_architectures
from nas3d.space import params_for, sample_architecture
from nas3d.storages import artifact_store_for, make_storage
from nas3d.study import allocate_worker_number, create_study, load_study
from tests.conftest import GRAPHVIZ_WHY, tool_available
from tests.test_drawing import without_dot

REPO = Path(__file__).resolve().parents[1]


def smoke_config(tmp_path: Path, **overrides: object) -> StudyConfig:
    """The smoke study with its data under ``tmp_path``."""
    return load_study_config(REPO / "studies" / "smoke.toml").with_overrides(
        {"data.root": str(tmp_path / "data"), **overrides}
    )


def make_objective(config: StudyConfig, storage_url: str) -> tuple[optuna.Study, TrialObjective]:
    storage = make_storage(storage_url)
    create_study(config, storage)
    study, config = load_study(config.study.name, storage)
    data = load_splits(config.data, "cpu", for_search=True)
    return study, TrialObjective(config, data, "cpu", artifact_store_for(storage_url))


def test_duplicate_architecture_is_not_retrained(tmp_path: Path) -> None:
    arch = seed_architectures()["adrenalmnist3d"]
    config = smoke_config(tmp_path, **{"space.ops": list(arch.ops)})
    study, objective = make_objective(config, f"sqlite:///{tmp_path / 'db.sqlite'}")
    # the same cell with its first two operation vertices swapped: an isomorphic relabelling
    twin = arch.__class__(
        (arch.ops[1], arch.ops[0], arch.ops[2]), ((0, 1), (0, 2), (2, 3), (1, 4), (3, 4)),
        arch.stacks, arch.cells_per_stack, arch.initial_filters,
    )
    assert twin.arch_hash() == arch.arch_hash() and twin != arch
    for a in (arch, arch, twin):
        study.enqueue_trial(params_for(a, config.space))
    study.optimize(objective, n_trials=3)
    trials = study.get_trials()
    assert objective.trainings == 1
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert [t.user_attrs.get("duplicate_of") for t in trials] == [None, 0, 0]
    copied = [t.user_attrs["duplicate_values"] for t in trials[1:]]
    assert copied == [trials[0].values] * 2
    assert trials[2].user_attrs["val_acc"] == trials[0].user_attrs["val_acc"]
    assert trials[1].user_attrs["failure_reason"].startswith("duplicate of trial 0")


def test_an_architecture_the_early_stopper_ended_is_not_trained_again(tmp_path: Path) -> None:
    arch = seed_architectures()["adrenalmnist3d"]
    config = smoke_config(tmp_path, **{"space.ops": list(arch.ops)})
    study, objective = make_objective(config, f"sqlite:///{tmp_path / 'db.sqlite'}")

    def stopped_at_a_rung(trial: optuna.Trial) -> tuple[float, float]:
        objective.claim(trial)  # as a trained trial: sampled and recorded, then ended at a rung
        trial.set_user_attr(records.EARLY_STOPPED, True)
        raise optuna.TrialPruned("stopped at a rung")

    study.enqueue_trial(params_for(arch, config.space))
    study.optimize(stopped_at_a_rung, n_trials=1)
    study.enqueue_trial(params_for(arch, config.space))
    study.optimize(objective, n_trials=1)
    stopped, again = study.get_trials()
    assert objective.trainings == 0
    assert again.state == TrialState.PRUNED and again.user_attrs["duplicate_of"] == stopped.number
    assert again.user_attrs[records.NOT_TRAINED] == "duplicate"
    assert "early stopper" in again.user_attrs["failure_reason"]


@pytest.mark.parametrize("broken", [False, True], ids=["missing", "failing"])
def test_a_picture_that_cannot_be_drawn_does_not_fail_a_trained_trial_and_is_warned_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, broken: bool
) -> None:
    from nas3d import objective as objective_module

    monkeypatch.setattr(objective_module, "_PICTURE_WARNINGS", set())  # once per process: this test's
    config = smoke_config(tmp_path)
    study, objective = make_objective(config, f"sqlite:///{tmp_path / 'db.sqlite'}")
    without_dot(tmp_path / "bin", monkeypatch, broken=broken)
    for op in ("relu_conv3", "mish_conv3"):  # two architectures: both train
        study.enqueue_trial(params_for(Architecture((op,), ((0, 1), (1, 2)), 1, 1, 8), config.space))
    study.optimize(objective, n_trials=2)
    assert objective.trainings == 2
    for trial in study.trials:
        assert trial.state == TrialState.COMPLETE and "picture_artifact" not in trial.user_attrs
        names = {m.filename for m in optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)}
        assert names == {f"trial-{trial.number}.pt"}
    warnings = [r.getMessage() for r in caplog.records if "no architecture picture" in r.getMessage()]
    assert len(warnings) == 1, warnings  # a search says it once, not once per trial
    assert warnings[0].startswith("no architecture picture for trial 0")
    expected = "no layout engine support" if broken else "install Graphviz (Debian: apt-get install graphviz)"
    assert expected in warnings[0]


def test_completed_trial_records_attrs_and_a_loadable_checkpoint(tmp_path: Path) -> None:
    config = smoke_config(tmp_path)
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study, objective = make_objective(config, storage_url)
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert study.metric_names == ["val_auc", "flops"]
    for key in ("val_acc", "params", "thop_macs", "arch", "arch_hash", "train_seconds", "epochs", "device"):
        assert key in trial.user_attrs, key
    assert 0.0 <= trial.values[0] <= 1.0 and trial.values[1] > 0
    metas = {m.filename: m for m in optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)}
    drawn = tool_available("dot", why=GRAPHVIZ_WHY)  # the architecture's picture needs Graphviz
    assert set(metas) == ({"trial-0.pt", "trial-0.svg"} if drawn else {"trial-0.pt"})
    assert not drawn or metas["trial-0.svg"].artifact_id == trial.user_attrs["picture_artifact"]
    path = tmp_path / "checkpoint.pt"
    optuna.artifacts.download_artifact(
        artifact_store=artifact_store_for(storage_url), file_path=str(path),
        artifact_id=metas["trial-0.pt"].artifact_id,
    )
    checkpoint = load_checkpoint(path)
    assert checkpoint.architecture.arch_hash() == trial.user_attrs["arch_hash"]
    assert checkpoint.metadata["trial"] == trial.number
    model = checkpoint.build()
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2)


def test_constraint_violations_are_pruned_with_a_reason_and_not_trained(tmp_path: Path) -> None:
    config = smoke_config(tmp_path, **{"constraints.max_params": 10.0})
    study, objective = make_objective(config, f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.optimize(objective, n_trials=2)
    assert objective.trainings == 0
    for trial in study.trials:
        assert trial.state == TrialState.PRUNED
        assert trial.user_attrs["failure_reason"].startswith("over budget: params")
        assert trial.system_attrs["constraints"][0] > 0  # where optuna-dashboard 0.21 reads it


def test_training_failure_fails_the_trial_with_its_reason(tmp_path: Path) -> None:
    config = smoke_config(tmp_path, **{"train.lr": 1e12})
    study, objective = make_objective(config, f"sqlite:///{tmp_path / 'db.sqlite'}")
    from nas3d.train import TrainingFailure

    study.optimize(objective, n_trials=1, catch=(TrainingFailure,))
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL and trial.values is None
    assert "NonFiniteLoss" in trial.user_attrs["failure_reason"]


def test_warm_start_enqueues_the_seed_architectures(tmp_path: Path) -> None:
    config = StudyConfig.from_dict(
        smoke_config(tmp_path).to_dict()
        | {"space": {}, "study": {"name": "warm", "n_trials": 8, "warm_start": "seed"}}
    )
    study = create_study(config, make_storage(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == len(seed_architectures())
    expected = {a.arch_hash() for a in seed_architectures().values()}
    from nas3d.space import sample_architecture

    got = {
        sample_architecture(optuna.trial.FixedTrial(t.system_attrs["fixed_params"]), config.space).arch_hash()
        for t in waiting
    }
    assert got == expected


def test_existing_study_with_another_config_is_refused(tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_study(smoke_config(tmp_path), storage)
    create_study(smoke_config(tmp_path), storage)  # same config: reused
    with pytest.raises(ValueError, match=r"different configuration \(train.max_epochs: stored 2, asked 3\)"):
        create_study(smoke_config(tmp_path, **{"train.max_epochs": 3}), storage)


def test_worker_numbers_are_unique_and_seed_distinct_reproducible_samplers(tmp_path: Path) -> None:
    config = smoke_config(tmp_path, **{"study.sampler": "random", "space.initial_filters": "[8, 16, 32]",
                                       "space.stacks": "[1, 2]", "space.cells_per_stack": "[1, 2]"})
    storage = make_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_study(config, storage)

    def first_proposal(study_storage: optuna.storages.BaseStorage) -> tuple[int, dict]:
        study, _ = load_study(config.study.name, study_storage)
        number = allocate_worker_number(study)  # what each worker does under the study lock
        study, loaded = load_study(config.study.name, study_storage, worker_number=number)
        trial = study.ask()
        params = dict(sample_architecture(trial, loaded.space).to_dict())
        study.tell(trial, state=TrialState.FAIL)
        return number, params

    # two workers started together, and a restarted one: three numbers, three different proposals
    proposals = [first_proposal(storage) for _ in range(3)]
    assert [n for n, _ in proposals] == [0, 1, 2]
    assert len({json.dumps(p, sort_keys=True) for _, p in proposals}) == 3
    # reproducible: the first worker of a fresh study proposes what the first worker proposed here
    twin_storage = make_storage(f"sqlite:///{tmp_path / 'twin.sqlite'}")
    create_study(config, twin_storage)
    assert first_proposal(twin_storage) == proposals[0]


def test_a_study_from_before_a_new_setting_still_matches_its_file(tmp_path: Path) -> None:
    config = smoke_config(tmp_path)
    storage = make_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = create_study(config, storage)
    older = config.to_dict()
    del older["train"]["cpu_bf16"]  # as stored by a nas3d without that setting
    study.set_user_attr("nas3d_config", older)
    assert create_study(config, storage).study_name == config.study.name
    with pytest.raises(ValueError, match=r"train.cpu_bf16: stored False, asked True"):
        create_study(config.with_overrides({"train.cpu_bf16": "true"}), storage)


def test_a_trained_trial_records_proxies_and_full_validation_curves(tmp_path: Path) -> None:
    config = smoke_config(tmp_path, **{"data.search_fraction": 0.5, "data.record_full_val": True,
                                       "study.proxies": True})
    study, objective = make_objective(config, f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.optimize(objective, n_trials=1)
    attrs = study.trials[0].user_attrs
    assert set(attrs["proxies"]) == {"naswot", "synflow", "grad_norm", "zico"}
    assert attrs["proxy_seconds"] > 0
    curve = attrs["learning_curve"]
    epochs = len(curve["epoch"])
    assert epochs >= 1 and all(len(curve[k]) == epochs for k in ("seconds", "full_val_auc", "full_val_acc"))
    # The objective is the search share's score; the whole split is scored beside it, not instead.
    assert study.trials[0].values[0] == max(curve["val_auc"])
    assert len(objective.data.full_val) == 2 * len(objective.data.val)


def test_without_record_full_val_no_full_validation_is_scored(tmp_path: Path) -> None:
    config = smoke_config(tmp_path, **{"data.search_fraction": 0.5})
    study, objective = make_objective(config, f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.optimize(objective, n_trials=1)
    assert objective.data.full_val is None
    assert "full_val_auc" not in study.trials[0].user_attrs["learning_curve"]


def test_the_cpu_profile_trains_on_a_quarter_and_scores_on_the_whole_val_split(tmp_path: Path) -> None:
    config = load_study_config(REPO / "studies" / "adrenalmnist3d-cpu.toml").with_overrides({
        "data.dataset": "synthetic", "data.size": 8, "data.root": str(tmp_path / "data"),
        "data.synthetic_samples": 64, "train.max_epochs": 1, "train.patience": 1,
    })
    study, objective = make_objective(config, f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.optimize(objective, n_trials=2)
    whole = load_splits(config.data, "cpu", for_search=False)
    assert len(objective.data.train) == len(whole.train) // 4
    assert torch.equal(objective.data.val.images, whole.val.images)
    trained = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert trained and all(t.values[1] <= 5e8 for t in trained)
