"""The report module's pure parts: learning curves in every recorded shape, fronts and their table."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState, create_trial

from nas3d.report import format_curve, front_markdown, pareto_points, study_front

ROWS = ["epoch  val_auc  val_loss", "1      0.6100   0.6900", "2      0.7200   0.6500"]


@pytest.mark.parametrize("curve", [
    [{"epoch": 1, "val_auc": 0.61, "val_loss": 0.69}, {"epoch": 2, "val_auc": 0.72, "val_loss": 0.65}],
    [{"val_auc": 0.61, "val_loss": 0.69}, {"val_auc": 0.72, "val_loss": 0.65}],
    {"val_auc": [0.61, 0.72], "val_loss": [0.69, 0.65]},
    {"1": {"val_auc": 0.61, "val_loss": 0.69}, "2": {"val_auc": 0.72, "val_loss": 0.65}},
])
def test_a_learning_curve_in_any_recorded_shape_is_one_row_per_epoch(curve) -> None:
    assert [line.strip() for line in format_curve(curve)] == ROWS


def test_a_curve_of_plain_numbers_or_nothing_still_shows() -> None:
    assert [line.split() for line in format_curve([0.5, 0.6])] == [["epoch", "value"], ["1", "0.5000"],
                                                                  ["2", "0.6000"]]
    assert format_curve([]) == ["[]"]


def _trial(auc: float, flops: float, **attrs) -> object:
    return create_trial(state=TrialState.COMPLETE, values=[auc, flops],
                        user_attrs={"arch": f"arch-{auc}-{flops}", "params": 10, "val_acc": 0.5, **attrs})


def test_the_front_counts_fully_trained_trials_only_and_keeps_ties() -> None:
    trials = [_trial(0.9, 2e6), _trial(0.8, 1e6), _trial(0.7, 3e6), _trial(0.95, 1e5, early_stopped=True),
              _trial(0.9, 2e6), create_trial(state=TrialState.PRUNED, user_attrs={})]
    points = pareto_points(trials)
    assert [(p.val_auc, p.flops, p.pareto) for p in points] == [
        (0.9, 2e6, True), (0.8, 1e6, True), (0.7, 3e6, False), (0.9, 2e6, True)]


def test_the_note_tables_the_front_by_val_auc() -> None:
    import optuna

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials([_trial(0.8, 1e6), _trial(0.9, 2e6), _trial(0.7, 3e6)])
    note = front_markdown(study_front(study))
    assert note.index("| 1 | 0.9000 |") < note.index("| 0 | 0.8000 |") and "| 2 |" not in note
