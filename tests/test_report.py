"""The report module's pure parts: fronts and their table."""

from __future__ import annotations

import pytest
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


# -- retrain results: intervals, paired comparisons, single-class warnings, calibration ----------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, dict]]:
    """Two architectures retrained (one epoch, two seeds) on the same tiny synthetic test set."""
    from nas3d.architecture import Architecture
    from nas3d.data import DataConfig
    from nas3d.retrain import RetrainConfig, RetrainSource, retrain

    tmp = tmp_path_factory.mktemp("runs")
    data = DataConfig(dataset="synthetic", size=8, root=str(tmp / "data"), synthetic_samples=96)
    config = RetrainConfig.of(epochs=2, seeds=(0, 1), batch_size=16, amp=False)
    runs = []
    for name, ops in (("a", ("relu_conv3",)), ("b", ("conv3_in_relu",))):
        arch = Architecture(ops, ((0, 1), (1, 2)), 1, 1, 8)
        report = retrain(RetrainSource.from_architecture(name, arch, study="toy", trial=len(runs)), data,
                         config, "cpu", tmp / name)
        runs.append((name, report.results))
    return runs


def test_compare_shows_intervals_a_paired_comparison_and_single_class_warnings(two_runs) -> None:
    from nas3d.metrics import bootstrap_interval
    from nas3d.report import format_comparison

    (_, a), (_, b) = two_runs
    scores = {name: [s["test_scores"] for s in r["seeds"]] for name, r in two_runs}
    low, high = a["summary"]["intervals"]["test_auc"]
    assert low <= a["summary"]["test_auc"]["mean"] <= high  # the interval holds the seeds' mean AUC
    flagged = a | {"summary": a["summary"] | {"single_class": {"0": ["test at 0.5"]}}}
    text = format_comparison([("a", flagged), ("b", b)])
    assert f"{a['summary']['test_auc']['mean']:.4f}±{a['summary']['test_auc']['std']:.4f} " \
           f"[{low:.3f}, {high:.3f}]" in text.splitlines()[1]
    paired = bootstrap_interval(a["test_labels"], scores["a"], "binary-class", other=scores["b"])
    line = next(x for x in text.splitlines() if x.startswith("  a - b: test AUC"))
    assert f"[{paired[0]:+.3f}, {paired[1]:+.3f}]" in line
    assert ("less than their paired interval" in line) == (paired[0] <= 0 <= paired[1])
    assert "warning: a seed 0 predicts a single class on test at 0.5" in text
    assert "warning: b" not in text or b["summary"]["single_class"]
    # another test set: no paired comparison
    elsewhere = b | {"test_labels": b["test_labels"][::-1]}
    assert "paired comparisons" not in format_comparison([("a", a), ("b", elsewhere)])


def test_report_draws_the_calibration_of_retrained_binary_models(two_runs, tmp_path) -> None:
    import optuna

    from nas3d.report import report_markdown, write_calibration_png

    study = optuna.create_study(study_name="toy", directions=["maximize", "minimize"])
    study.add_trials([_trial(0.9, 2e6), _trial(0.8, 1e6)])
    runs = [r for _, r in two_runs]
    runs[1] = runs[1] | {"summary": runs[1]["summary"] | {"single_class": {"1": ["val at 0.5"]}}}
    fronts = [study_front(study, runs)]
    path = write_calibration_png([("a", runs[0])], tmp_path / "calibration.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_calibration_png([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    text = report_markdown(fronts, runs, calibration=True)
    assert "![Calibration](calibration.png)" in text
    assert "**warning: toy trial 1 seed 1 predicts a single class on val at 0.5**" in text
    interval = runs[0]["summary"]["intervals"]["test_auc"]
    assert f"[{interval[0]:.3f}, {interval[1]:.3f}]" in text
