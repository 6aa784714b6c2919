"""The report module's pure parts: fronts and their table."""

from __future__ import annotations

from optuna.trial import TrialState, create_trial

from nas3d.front import front_markdown, pareto_points, study_front


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
