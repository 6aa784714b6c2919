"""A newcomer's first hour (issue #26, items 4 and 6): the CPU profile a `--cpu` search on a manifest
takes, a study file on your own data, a line per finished trial, a study whose models have not learned
yet, the only study taken when --study-name is left out, and reference architectures drawn only at the
size they were chosen at."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from nas3d import records
from nas3d.config import (
    PROFILES,
    ConfigError,
    StudyConfig,
    StudySettings,
    default_study_config,
    load_study_config,
    resolve_study_config,
)
from nas3d.front import SEED_STUDY_SIZE, front_figure, study_front, write_front_png
from nas3d.report import format_status
from tests.test_own_data import nifti_folder

REPO = Path(__file__).resolve().parents[1]
CPU_FILE = REPO / "studies" / "adrenalmnist3d-cpu.toml"
KERNEL_3 = ("conv3_in_relu", "conv3_in_mish", "in_mish_conv3", "relu_conv3", "mish_conv3")


def resolve(study: str | Path | None, dataset: str | None, *sets: str, **flags: object) -> tuple[StudyConfig,
                                                                                                   list[str]]:
    said: list[str] = []
    return resolve_study_config(study, dataset, flags, sets, say=said.append), said


def is_cpu_profile(config: StudyConfig) -> bool:
    space, train, data = config.space, config.train, config.data
    return (space.ops == KERNEL_3 and space.initial_filters == (8, 16)
            and config.constraints.max_flops == 5e8 and data.search_val_fraction == 1.0
            and data.search_fraction == 0.25 and (train.max_epochs, train.batch_size) == (8, 32)
            and config.study.profile == "cpu")


# --- item 4: a default that finishes on a CPU ----------------------------------------------------------


def test_cpu_on_a_manifest_takes_the_cpu_profile_and_says_so_in_one_line() -> None:
    config, said = resolve(None, "mine/labels.csv", cpu=True)
    assert is_cpu_profile(config) and config.study.n_trials == 10
    assert config.data.dataset == "mine/labels.csv" and config.study.name == "labels-28-cpu"
    (line,) = said
    assert line.startswith("profile cpu (--cpu on a manifest without a study file): 5 operations of "
                           "kernel 3, 8/16 initial filters, at most 5e+08 FLOPs; 10 trials of up to 8 "
                           "epochs at batch 32 on 25% of train, scored on the whole val split")
    assert line.endswith("--profile full for the seed study's full space and budget")


def test_the_profile_is_asked_for_or_left_and_flags_still_override_it() -> None:
    seed = default_study_config("organmnist3d")
    for study, dataset, flags in [(None, "mine/labels.csv", {}),  # no --cpu: the full space
                                  (None, "organmnist3d", {"cpu": True}),  # MedMNIST: only when asked
                                  (None, "mine/labels.csv", {"cpu": True, "profile": "full"})]:
        config, said = resolve(study, dataset, **flags)
        assert (config.space, config.train, config.study.profile) == (seed.space, seed.train, "full")
        assert said == []
    medmnist, said = resolve(None, "organmnist3d", profile="cpu")
    assert is_cpu_profile(medmnist) and medmnist.study.name == "organmnist3d-28-cpu" and len(said) == 1
    config, said = resolve(None, "mine/labels.csv", "space.initial_filters=[8]",
                           "data.search_val_fraction=0.5", cpu=True, max_epochs=3, n_trials=4)
    assert (config.train.max_epochs, config.study.n_trials, config.space.initial_filters) == (3, 4, (8,))
    assert config.space.ops == KERNEL_3 and config.train.batch_size == 32  # the rest is the profile's
    assert "8 initial filters" in said[0] and "4 trials of up to 3 epochs" in said[0]
    assert "scored on 50% of val" in said[0]


def test_the_cpu_study_file_is_the_cpu_profile_not_a_copy_of_it() -> None:
    from_file = load_study_config(CPU_FILE)
    profile = default_study_config("adrenalmnist3d", 28, "cpu")
    assert is_cpu_profile(from_file) and "[space]" not in CPU_FILE.read_text()
    assert {t: v for t, v in from_file.to_dict().items() if t != "study"} == \
        {t: v for t, v in profile.to_dict().items() if t != "study"}
    assert set(PROFILES["cpu"]) <= set(from_file.to_dict())
    # --profile full with the file: the seed study's space, the file's own keys kept
    full = load_study_config(CPU_FILE, profile="full")
    assert full.space == default_study_config("adrenalmnist3d").space and full.study.n_trials == 28


def test_a_profile_is_chosen_by_flag_or_file_never_by_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"study.profile chooses the defaults a study starts from; give "
                                          r"--profile cpu instead of --set study.profile$"):
        resolve(None, "organmnist3d", "study.profile=cpu")
    with pytest.raises(ValueError, match=r"--profile must be one of full, cpu, got 'cpu2'; did you mean"):
        resolve(None, "organmnist3d", profile="cpu2")


def test_a_study_made_before_profiles_were_recorded_is_the_same_study(tmp_path: Path) -> None:
    from nas3d.storages import make_storage
    from nas3d.study import create_study

    config = load_study_config(CPU_FILE).with_overrides({"data.dataset": "synthetic", "data.size": 8,
                                                         "data.root": str(tmp_path)})
    before = dataclasses.replace(config, study=dataclasses.replace(config.study, profile="full"))
    storage = make_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_study(before, storage, artifacts=str(tmp_path / "artifacts"))
    create_study(config, storage)  # the same values: accepted, not "a different configuration"
    with pytest.raises(ValueError, match="already exists with a different configuration"):
        create_study(config.with_overrides({"train.max_epochs": 9}), storage)


def test_the_cpu_profiles_cap_names_itself_where_a_size_outgrows_it() -> None:
    from nas3d.study import check_cap_fits_space

    config, _ = resolve(None, "organmnist3d", profile="cpu", size=64)
    with pytest.raises(ValueError, match=r"--size \(the cpu profile's cap; --profile full has none\)$"):
        check_cap_fits_space(config)


# --- item 6: a study file on your own data ---------------------------------------------------------------


def test_a_study_file_with_a_manifest_keeps_its_settings_and_says_what_it_replaced(tmp_path: Path) -> None:
    config, said = resolve(CPU_FILE, "mine/labels.csv", size=12)
    assert is_cpu_profile(config) and config.study.n_trials == 28 and config.study.sampler_seed == 0
    assert (config.data.dataset, config.data.size) == ("mine/labels.csv", 12)
    assert config.study.name == "labels-12-cpu"
    assert said[0] == (f"{CPU_FILE} with mine/labels.csv as its data: study.name 'adrenalmnist3d-28-cpu' -> "
                       "'labels-12-cpu' (--name for another)")
    own = tmp_path / "mine.toml"
    own.write_text('[study]\nname = "organmnist3d-big"\n[data]\ndataset = "organmnist3d"\n'
                   'root = "/data/medmnist"\n[train]\nmax_epochs = 30\n')
    config, said = resolve(own, "mine/labels.csv", name="kept")
    assert (config.study.name, config.data.root, config.train.max_epochs) == ("kept", None, 30)
    assert said == [f"{own} with mine/labels.csv as its data: data.root '/data/medmnist' dropped"]


# --- item 6: one line per finished trial ----------------------------------------------------------------


def _study_with_config(config: StudyConfig) -> optuna.Study:
    study = optuna.create_study(study_name=config.study.name, directions=["maximize", "minimize"])
    study.set_user_attr(records.CONFIG, config.to_dict())
    return study


def test_each_trial_that_ends_is_one_line_with_its_scores_seconds_and_what_is_left() -> None:
    from nas3d.worker import progress_line

    study = _study_with_config(StudyConfig(study=StudySettings(name="s", n_trials=3)))
    study.add_trial(create_trial(values=[0.6123, 2.5e6]))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={records.FAILURE_REASON: "out of memory"}))
    done, failed = study.get_trials(deepcopy=False)
    assert re.fullmatch(r"trial 0: val AUC 0\.6123, 2\.5 MFLOPs, \d+ s; 2 of 3 trials left",
                        progress_line(study, done._trial_id, 3))
    assert re.fullmatch(r"trial 1: fail after \d+ s: out of memory; 2 of 3 trials left",
                        progress_line(study, failed._trial_id, 3))
    # the worker passes the time it spent on the trial (claimed ahead, a trial's own span counts its wait)
    line = progress_line(study, done._trial_id, 3, seconds=212.4)
    assert line.endswith("MFLOPs, 212 s; 2 of 3 trials left")


# --- item 6: a study whose models have not learned yet --------------------------------------------------


@pytest.mark.parametrize(("best", "sets", "says"), [
    (0.337, {}, ["more epochs (--max-epochs 100)", "data.search_val_fraction=1", "train.recipe=small3d"]),
    (0.55, {"data.search_val_fraction": 1.0, "train.recipe": "small3d", "train.max_epochs": 8},
     ["more epochs (--max-epochs 20); then"]),
    (0.56, {}, []),
], ids=["seed-recipe", "whole-val-small3d", "learning"])
def test_status_says_when_the_models_have_not_learned_yet_and_what_helps(best, sets, says) -> None:
    config = StudyConfig(study=StudySettings(name="s", n_trials=3)).with_overrides(sets)
    study = _study_with_config(config)
    for auc, flops in ((best, 1e6), (best - 0.1, 5e5)):
        study.add_trial(create_trial(values=[auc, flops], user_attrs={records.ARCH: "a"}))
    status = format_status(study)
    if not says:
        assert "not learned" not in status
        return
    note = status[status.index("  not learned yet"):].splitlines()[:2]
    assert note[0] == (f"  not learned yet: the best val AUC is {best:.3f} (0.5 is chance), so these "
                       "models do not yet tell the classes apart and the front ranks noise.")
    assert note[1].startswith("  What usually helps: ") and all(s in note[1] for s in says)
    assert ("search_val_fraction" in note[1]) == ("data.search_val_fraction" not in sets)


# --- item 6: reference architectures at the study's size only -----------------------------------------


@pytest.mark.parametrize("size", [12, SEED_STUDY_SIZE])
def test_the_seed_architectures_are_drawn_only_for_a_study_at_the_size_they_were_chosen_at(
    size: int, tmp_path: Path
) -> None:
    study = _study_with_config(default_study_config("synthetic", size))
    study.add_trials([create_trial(values=[0.7, 2e5], user_attrs={records.ARCH: "a"}),
                      create_trial(values=[0.8, 9e5], user_attrs={records.ARCH: "b"})])
    front = study_front(study)
    seeds = [r.label for r in front.references if r.label.startswith("seed study: ")]
    traces = [t.name for t in front_figure([front]).data if t.name and t.name.startswith("seed study")]
    assert bool(seeds) == bool(traces) == (size == SEED_STUDY_SIZE)
    assert write_front_png([front], tmp_path / "pareto.png").stat().st_size > 0


# --- item 6: the only study when --study-name is left out ---------------------------------------------


def test_size_help_says_what_manifests_accept(capsys: pytest.CaptureFixture[str]) -> None:
    from nas3d.cli import main

    for command in ("search", "create-study"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "a manifest 4..256" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_a_cpu_search_on_a_manifest_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    from nas3d.cli import main
    from tests.test_cli import nas3d

    nifti_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    # as a user runs it (tests.test_cli.nas3d: the whole process group, workers too, ends with it)
    result = nas3d("search", "--dataset", "labels.csv", "--cpu", "--n-trials", "2", "--workers", "2",
                   "--storage", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    err, out = result.stderr, result.stdout
    assert "profile cpu (--cpu on a manifest without a study file): 5 operations of kernel 3" in err
    assert "study 'labels-28-cpu' ready" in out and "for a budget of 2" in out
    # a line per trial trained, from the worker subprocesses (two of them here), as each ends
    lines = re.findall(r"nas3d\.worker: trial (\d+): val AUC ([\d.]+), ([\d.,]+) MFLOPs, (\d+) s; (\d) of 2 "
                       r"trials left", err)
    study = optuna.load_study(study_name="labels-28-cpu", storage=url)
    complete = {t.number: t for t in study.trials if t.state == TrialState.COMPLETE}
    assert sorted(int(n) for n, *_ in lines) == sorted(complete) and len(complete) == 2
    for number, auc, mflops, *_ in lines:
        assert float(auc) == pytest.approx(complete[int(number)].values[0], abs=1e-4)
        assert float(mflops.replace(",", "")) == pytest.approx(complete[int(number)].values[1] / 1e6, abs=0.1)
        assert complete[int(number)].values[1] <= 5e8
    assert StudyConfig.from_dict(study.user_attrs[records.CONFIG]).study.profile == "cpu"

    # status --trial N and report without --study-name: the only study; its checkpoint is octet-stream
    number = min(complete)
    assert main(["status", "--storage", url, "--trial", str(number)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"trial {number} of study 'labels-28-cpu': complete")
    assert f"trial-{number}.pt  application/octet-stream" in shown
    assert main(["report", "--storage", url, "--out", str(tmp_path / "report")]) == 0
    assert "report on 1 study" in capsys.readouterr().out

    # the CPU study file on the same manifest is the same study, with the file's longer budget
    with caplog.at_level(logging.INFO, logger="nas3d"):
        assert main(["create-study", "--storage", url, "--study", str(CPU_FILE),
                     "--dataset", "labels.csv"]) == 0
    assert f"{CPU_FILE} with labels.csv as its data: study.name 'adrenalmnist3d-28-cpu' -> 'labels-28-cpu'" \
        in caplog.text
    assert "budget raised from 2 to 28 trials" in caplog.text

    # several studies: one line naming them
    optuna.create_study(study_name="other", storage=url)
    for argv in (["status", "--storage", url, "--trial", "0"], ["report", "--storage", url, "--out", "r2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == ("nas3d: error: this storage holds 2 studies ('labels-28-cpu', 'other'); say which "
                       "with --study-name\n")
    assert not (tmp_path / "r2").exists()


def test_without_a_study_status_trial_and_report_say_so(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from nas3d.cli import main

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    optuna.create_study(storage=url, study_name="x")
    optuna.delete_study(storage=url, study_name="x")
    for argv in (["status", "--storage", url, "--trial", "0"], ["report", "--storage", url, "--out", "r"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("nas3d: error: this storage holds no studies; create one with")
        assert err.count("\n") == 1
