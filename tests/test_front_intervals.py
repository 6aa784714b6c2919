"""Every front point with its uncertainty: fold or bootstrap intervals, ties, and where they are shown
(status, the report's table, the dashboard figure and PNG)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from nas3d import records
from nas3d.front import front_figure, front_markdown, pareto_points, study_front, write_front_png
from nas3d.report import format_status, report_markdown
from tests.test_study import make_objective, smoke_config


def _trial(auc: float, flops: float, **attrs: object) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.COMPLETE, values=[auc, flops],
                        user_attrs={records.ARCH: f"arch-{auc}", records.PARAMS: 10, records.VAL_ACC: 0.5,
                                    **attrs})


def _study() -> optuna.Study:
    """Three front members: 0 and 1 tied (their fold intervals overlap), 2 apart; 3 dominated."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials([
        _trial(0.90, 3e6, **{records.FOLD_VAL_AUC: [0.88, 0.90, 0.92]}),  # 0.90 ± 0.023
        _trial(0.86, 2e6, **{records.FOLD_VAL_AUC: [0.84, 0.86, 0.88]}),  # 0.86 ± 0.023
        _trial(0.70, 1e6, **{records.VAL_AUC_CI: [0.65, 0.75]}),
        _trial(0.60, 4e6),
    ])
    return study


def test_front_members_carry_their_intervals_and_ties() -> None:
    points = {p.number: p for p in pareto_points(_study().trials)}
    assert points[0].interval_kind == "folds"
    assert points[0].interval == pytest.approx((0.9 - 0.02309, 0.9 + 0.02309), abs=1e-4)
    assert points[2].interval_kind == "bootstrap" and points[2].interval == (0.65, 0.75)
    assert (points[0].tied_with, points[1].tied_with, points[2].tied_with) == ((1,), (0,), ())
    assert points[3].interval is None and not points[3].pareto
    assert points[0].interval_text == "[0.877, 0.923] ~1" and points[2].interval_text == "[0.650, 0.750]"


def test_a_raced_trial_is_never_on_the_front() -> None:
    raced = create_trial(state=TrialState.PRUNED, user_attrs={
        records.EARLY_STOPPED: True, records.EARLY_STOPPED_VALUES: [0.99, 1.0], records.FOLD_VAL_AUC: [0.99]})
    study = _study()
    study.add_trial(raced)
    assert 4 not in [p.number for p in pareto_points(study.trials)]


def test_status_the_note_and_the_report_show_the_intervals() -> None:
    study = _study()
    status = format_status(study)
    row = next(line for line in status.splitlines() if line.split()[:2] == ["0", "0.9000"])
    assert "[0.877, 0.923] ~1" in row
    assert "interval ~tied" in status and "mean ± 2 standard errors over the folds" in status
    assert "95 % BCa bootstrap over the val samples" in status and "statistically tied" in status
    note = front_markdown(study_front(study))
    assert "| 0 | 0.9000 | [0.877, 0.923] ~1 |" in note and "statistically tied" in note
    report = report_markdown([study_front(study, seed_references="none")])
    assert "0.9000 [0.877, 0.923] ~1" in report and "Val AUC intervals: mean ± 2 standard errors" in report


def test_without_intervals_nothing_is_claimed() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials([_trial(0.9, 2e6), _trial(0.8, 1e6)])
    assert "statistically tied" not in format_status(study)
    assert "statistically tied" not in front_markdown(study_front(study))


def test_the_figure_and_png_draw_the_intervals(tmp_path: Path) -> None:
    front = study_front(_study(), seed_references="none")
    figure = front_figure([front])
    members = next(t for t in figure.data if t.name.endswith("Pareto front"))
    by_number = {c[0]: (plus, minus) for c, plus, minus in zip(
        members.customdata, members.error_y.array, members.error_y.arrayminus, strict=True)}
    assert by_number[2] == pytest.approx((0.05, 0.05))
    assert "statistically tied with trial 1" in next(c[5] for c in members.customdata if c[0] == 0)
    assert write_front_png([front], tmp_path / "front.png").stat().st_size > 0


@pytest.mark.slow  # trains one smoke trial
def test_a_trial_without_folds_records_a_bootstrap_interval_around_its_val_auc(tmp_path: Path) -> None:
    # barely trained (a perfect val AUC would leave the bootstrap nothing to vary)
    config = smoke_config(tmp_path, **{"study.n_trials": 1, "train.lr": 1e-5})
    study, objective = make_objective(config, f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    low, high = trial.user_attrs[records.VAL_AUC_CI]
    assert low <= trial.values[0] <= high
    assert records.FOLD_VAL_AUC not in trial.user_attrs and records.VAL_AUC_SE not in trial.user_attrs
