from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from nas3d.config import (
    ConfigError,
    Constraints,
    StudyConfig,
    StudySettings,
    default_study_config,
    load_study_config,
)
from nas3d.data import DATASETS, DataConfig
from nas3d.samplers import make_sampler
from nas3d.space import SearchSpace
from nas3d.train import TrainConfig

STUDIES = Path(__file__).resolve().parents[1] / "studies"
MEDMNIST3D = list(DATASETS)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def _one_line_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_study_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


# --- the shipped study files ------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_study_file_loads(path: Path) -> None:
    config = load_study_config(path)
    assert StudyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_there_is_a_study_per_dataset_plus_smoke() -> None:
    assert {p.stem for p in STUDIES.glob("*.toml")} >= {*MEDMNIST3D, "smoke"}


@pytest.mark.parametrize("dataset", MEDMNIST3D)
def test_dataset_studies_reproduce_the_seed_setup(dataset: str) -> None:
    config = load_study_config(STUDIES / f"{dataset}.toml")
    seed = default_study_config(dataset)
    assert config.data == seed.data and config.train == seed.train and config.space == seed.space
    assert (config.data.search_fraction, config.train.max_epochs, config.train.patience) == (0.25, 50, 5)
    assert (config.train.batch_size, config.train.lr, config.study.n_trials) == (128, 1e-3, 200)
    assert config.study.name == f"{dataset}-28"


def test_the_cpu_profile_follows_the_architecture_table() -> None:
    """studies/adrenalmnist3d-cpu.toml says it uses the table's protocol and range; hold it to that."""
    config = load_study_config(STUDIES / "adrenalmnist3d-cpu.toml")
    table = json.loads((STUDIES.parent / "bench" / "data" / "arch_table_adrenalmnist3d_28.json").read_text())
    protocol = table["protocol"]
    assert (config.data.dataset, config.data.size) == (protocol["dataset"], protocol["size"])
    train = config.train
    assert (config.data.search_fraction, train.batch_size, train.lr) == (
        protocol["search_fraction"], protocol["batch_size"], protocol["lr"])
    assert train.max_epochs <= protocol["epochs"]  # the table's curves tell what fewer epochs rank
    assert config.data.search_val_fraction == 1.0 and config.train.patience >= config.train.max_epochs
    assert all(op.replace("conv3", "") != op for op in config.space.ops)  # kernel 3 only
    assert config.space.initial_filters == (8, 16) and config.constraints.max_flops == 5e8
    assert max(row["flops"] for row in table["rows"]) <= config.constraints.max_flops
    assert config.early_stopping.kind == "none"


def test_smoke_study_is_tiny() -> None:
    config = load_study_config(STUDIES / "smoke.toml")
    assert config.data.dataset == "synthetic" and config.space.initial_filters == (8,)
    assert config.study.n_trials <= 10 and config.train.max_epochs <= 2


def test_default_study_config() -> None:
    config = default_study_config("nodulemnist3d", size=64)
    assert config.study.name == "nodulemnist3d-64"
    assert (config.data.dataset, config.data.size) == ("nodulemnist3d", 64)
    assert (
        config.train == TrainConfig()
        and config.space == SearchSpace()
        and config.constraints == Constraints()
    )


# --- loading errors -----------------------------------------------------------------------------------


def test_minimal_file_takes_defaults(tmp_path: Path) -> None:
    config = load_study_config(_write(tmp_path, '[study]\nname = "x"\n'))
    assert config == StudyConfig(study=StudySettings(name="x"))
    assert config.data == DataConfig()


def test_unknown_key_names_key_table_and_suggests(tmp_path: Path) -> None:
    message = _one_line_error(_write(tmp_path, '[study]\nname = "x"\n[train]\nmax_epoch = 3\n'))
    assert "'max_epoch'" in message and "[train]" in message
    assert "did you mean 'max_epochs'?" in message and "patience" in message


def test_unknown_table_suggests(tmp_path: Path) -> None:
    message = _one_line_error(_write(tmp_path, '[study]\nname = "x"\n[constraint]\nmax_flops = 1e9\n'))
    assert "unknown table 'constraint'" in message and "did you mean 'constraints'?" in message


@pytest.mark.parametrize(
    ("line", "table", "expected"),
    [
        ('max_epochs = "50"', "train", "expected int, got '50'"),
        ("max_epochs = 2.5", "train", "expected int, got 2.5"),
        ("max_epochs = true", "train", "expected int, got True"),
        ("amp = 1", "train", "expected bool, got 1"),
        ("initial_filters = 8", "space", "expected list of int, got 8"),
        ('initial_filters = [8, "16"]', "space", "expected list of int"),
        ('max_flops = "1e9"', "constraints", "expected float or none, got '1e9'"),
    ],
)
def test_type_errors_name_table_key_and_value(tmp_path: Path, line: str, table: str, expected: str) -> None:
    message = _one_line_error(_write(tmp_path, f'[study]\nname = "x"\n[{table}]\n{line}\n'))
    assert f"[{table}] {line.split(' =')[0]}: {expected}" in message


def test_int_accepted_for_float_and_lists_become_tuples(tmp_path: Path) -> None:
    text = (
        '[study]\nname = "x"\n[train]\nlr = 1\n[space]\nstacks = [1]\n[constraints]\nmax_params = 1000000\n'
    )
    config = load_study_config(_write(tmp_path, text))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.space.stacks == (1,)
    assert config.constraints.max_params == 1e6


def test_missing_required_name(tmp_path: Path) -> None:
    assert "missing required key 'name'" in _one_line_error(_write(tmp_path, "[study]\nn_trials = 3\n"))
    assert "missing required table [study]" in _one_line_error(_write(tmp_path, "[train]\nlr = 0.1\n"))


def test_table_that_is_not_a_table(tmp_path: Path) -> None:
    assert "[train] must be a table" in _one_line_error(_write(tmp_path, 'train = 3\n[study]\nname = "x"\n'))


def test_bad_sampler_lists_valid_names(tmp_path: Path) -> None:
    message = _one_line_error(_write(tmp_path, '[study]\nname = "x"\nsampler = "nsgaii"\n'))
    assert "[study]" in message and "tpe, nsga2, random" in message and "did you mean 'nsga2'?" in message


def test_value_validation_is_reported_with_location(tmp_path: Path) -> None:
    message = _one_line_error(_write(tmp_path, '[study]\nname = "x"\nn_trials = 0\n'))
    assert "[study]" in message and "n_trials must be >= 1" in message


def test_bad_toml_reports_line(tmp_path: Path) -> None:
    message = _one_line_error(_write(tmp_path, '[study]\nname = "x"\nn_trials 3\n'))
    assert "invalid TOML" in message and "line 3" in message


def test_missing_file(tmp_path: Path) -> None:
    assert "study file not found" in _one_line_error(tmp_path / "nope.toml")


# --- overrides and round trip -------------------------------------------------------------------------


def test_overrides_replace_values_and_validate() -> None:
    config = load_study_config(STUDIES / "smoke.toml")
    changed = config.with_overrides(
        {"train.max_epochs": 3, "study.n_trials": 10, "constraints.max_flops": 1e8}
    )
    assert (changed.train.max_epochs, changed.study.n_trials, changed.constraints.max_flops) == (3, 10, 1e8)
    assert changed.data == config.data and config.train.max_epochs == 2  # original untouched


def test_overrides_parse_strings_for_typed_fields() -> None:
    config = default_study_config("organmnist3d").with_overrides(
        {"train.lr": "3e-4", "train.amp": "false", "space.initial_filters": "[8, 16]", "study.name": "run-2"}
    )
    assert config.train.lr == 3e-4 and config.train.amp is False
    assert config.space.initial_filters == (8, 16) and config.study.name == "run-2"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.max_epoch", 3, "did you mean 'max_epochs'?"),
        ("trian.max_epochs", 3, "did you mean 'train'?"),
        ("max_epochs", 3, "unknown table 'max_epochs'"),
        ("train.max_epochs", "many", "[train] max_epochs: expected int, got 'many'"),
    ],
)
def test_bad_overrides(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError, match="override") as info:
        default_study_config("organmnist3d").with_overrides({key: value})
    assert expected in str(info.value)


def test_to_dict_is_json_and_round_trips() -> None:
    config = default_study_config("vesselmnist3d").with_overrides({"constraints.max_params": 5e5})
    data = json.loads(json.dumps(config.to_dict()))
    assert data["space"]["stacks"] == [1, 2] and data["constraints"]["max_flops"] is None
    assert StudyConfig.from_dict(data) == config


def test_from_dict_rejects_unknown_keys() -> None:
    data = default_study_config("vesselmnist3d").to_dict()
    data["train"]["epochs"] = 3
    with pytest.raises(ConfigError, match=r"<dict>: unknown key 'epochs' in \[train\]"):
        StudyConfig.from_dict(data)


# --- constraints and samplers -------------------------------------------------------------------------


def test_constraints_evaluate_relative_excess() -> None:
    assert Constraints().evaluate(flops=1e9, params=1e6) == {}
    caps = Constraints(max_flops=1e8, max_params=1e6)
    assert caps.evaluate(flops=2e8, params=5e5) == {"flops": 1.0, "params": -0.5}
    with pytest.raises(ValueError, match="max_flops must be > 0"):
        Constraints(max_flops=0)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
        ("random", optuna.samplers.RandomSampler),
    ],
)
def test_make_sampler_runs_a_constrained_multi_objective_study(name: str, cls: type) -> None:
    sampler = make_sampler(StudySettings(name="x", sampler=name, sampler_seed=0))
    assert isinstance(sampler, cls)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        f = trial.suggest_categorical("f", [8, 16, 32])
        op = trial.suggest_categorical("op", ["a", "b"])
        if op == "a":  # a conditional parameter, as in the cell search space
            trial.suggest_int("k", 3, 7, step=2)
        trial.set_constraint("params", f / 16 - 1)
        return f / 32, float(f)

    study.optimize(objective, n_trials=14)  # past TPE's 10 startup trials
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(t.params["f"] <= 16 for t in study.best_trials)


def test_unknown_sampler_lists_valid_names() -> None:
    settings = StudySettings(name="x")
    object.__setattr__(settings, "sampler", "cmaes")  # bypass validation to reach make_sampler's check
    with pytest.raises(ValueError, match="tpe, nsga2, random"):
        make_sampler(settings)
