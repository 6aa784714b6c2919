"""bench/noise_table.py: which architectures the truth table takes, its jobs, resuming, and its analysis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nas3d.architecture import Architecture
from nas3d.costs import measure_costs
from nas3d.seeds import seed_architectures
from tests._bench import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("noise_table")


def arch(op: str, filters: int = 8) -> Architecture:
    return Architecture(ops=(op,), edges=((0, 1), (1, 2)), stacks=1, cells_per_stack=1,
                        initial_filters=filters)


def row(architecture: Architecture, trial: int, flops: int, quarter: list[float], whole: list[float]) -> dict:
    return {"trial": trial, "arch": architecture.short_str(), "arch_json": architecture.to_json(),
            "arch_hash": architecture.arch_hash(), "flops": flops,
            "curve": {"val_auc": quarter, "val_loss": [0.5] * len(quarter), "full_val_auc": whole}}


def hand_table(rows: list[dict]) -> dict:
    protocol = {"dataset": "adrenalmnist3d", "search_fraction": 0.25, "search_val_fraction": 0.25,
                "subset_seed": 0, "seed": 0}
    return {"protocol": protocol, "rows": rows}


def test_the_cpu_profiles_best_is_the_published_one(bench) -> None:
    published = "S1C1F8 1=mish_conv3(0) 2=conv3_in_relu(0) 3=conv3_in_mish(1,2) out(3)"
    assert bench.CPU_BEST.short_str() == published
    assert round(measure_costs(bench.CPU_BEST, 1, 2, 28, with_thop=False).flops / 1e6) == 237


def test_table_scores_are_taken_at_the_epoch_the_quarter_val_search_keeps(bench) -> None:
    r = row(arch("relu_conv3"), 0, 1, [0.6, 0.8, 0.8, 0.7], [0.5, 0.6, 0.9, 0.95])
    r["curve"]["val_loss"] = [0.5, 0.4, 0.3, 0.2]  # epochs 2 and 3 tie on AUC: the lower loss wins
    assert bench.table_scores(r) == {"kept_epoch": 3, "quarter_val_auc": 0.8, "whole_val_auc": 0.9,
                                     "whole_val_best": 0.95}


def test_architectures_are_the_seed_the_cpu_best_the_top_and_a_spread(bench) -> None:
    ops = ["relu_conv3", "mish_conv3", "conv3_in_relu", "conv3_in_mish", "in_mish_conv3", "relu_conv5",
           "mish_conv5", "conv5_in_relu", "conv5_in_mish", "in_mish_conv5", "relu_conv7", "mish_conv7"]
    # whole-val AUC (at the kept epoch) rises with the index, FLOPs fall with it
    rows = [row(arch(op), i, 1000 - i, [0.7], [0.5 + i / 100]) for i, op in enumerate(ops)]
    rows.append(row(bench.CPU_BEST, 99, 500, [0.9], [0.99]))  # in the table: its row's scores, no top slot
    chosen = bench.choose_architectures(hand_table(rows))
    roles = ["seed", "cpu-best"] + ["top"] * 4 + ["by-flops"] * 3 + ["by-score"] * 3
    assert [a["role"] for a in chosen] == roles
    assert chosen[0]["arch_hash"] == seed_architectures()["adrenalmnist3d"].arch_hash()
    assert chosen[0]["table"] is None
    assert chosen[1]["table"]["whole_val_auc"] == 0.99 and chosen[1]["table"]["trial"] == 99
    trials = [a["table"]["trial"] for a in chosen[2:]]
    assert trials[:4] == [11, 10, 9, 8]  # the best whole-val scores
    assert trials[4:7] == [7, 3, 0]  # the rest (0..7) spread over FLOPs: cheapest, middle, dearest
    assert trials[7:] == [1, 4, 6]  # then over the remaining ones' scores (1, 2, 4, 5, 6)


def test_jobs_run_fold_major_with_search_jobs_after_fold_0_and_seed_repeats_last(bench) -> None:
    archs = [{"arch_hash": "s", "table": None}, {"arch_hash": "t", "table": {"trial": 1}}]
    jobs = [(j["arch_hash"], j["kind"], j["fold"], j["seed"]) for j in bench.plan_jobs(archs, 3, 2)]
    assert jobs == [("s", "fold", 0, 0), ("t", "fold", 0, 0), ("s", "search", None, 0),
                    ("s", "fold", 1, 42), ("t", "fold", 1, 42),
                    ("s", "fold", 2, 143), ("t", "fold", 2, 143),
                    ("s", "repeat", 0, 1), ("t", "repeat", 0, 1),
                    ("s", "repeat", 0, 2), ("t", "repeat", 0, 2)]


def job(arch_hash: str, kind: str, fold: int | None, seed: int, val_auc: float, **extra) -> dict:
    return {"arch_hash": arch_hash, "kind": kind, "fold": fold, "seed": seed, "val_auc": val_auc,
            "test_auc": val_auc - 0.05, **extra}


def known_document() -> dict:
    """Three architectures, three folds each and one seed repeat on fold 0, with variance parts worked
    out by hand in the test below."""
    architectures = [
        {"arch_hash": "seed", "arch": "the seed's", "role": "seed", "flops": 300, "table": None},
        {"arch_hash": "a", "arch": "A", "role": "top", "flops": 100,
         "table": {"quarter_val_auc": 0.6, "whole_val_auc": 0.8, "whole_val_best": 0.85}},
        {"arch_hash": "b", "arch": "B", "role": "by-flops", "flops": 200,
         "table": {"quarter_val_auc": 0.7, "whole_val_auc": 0.75, "whole_val_best": 0.66}},
    ]
    folds = {"seed": [0.70, 0.72, 0.74], "a": [0.80, 0.84, 0.82], "b": [0.60, 0.62, 0.64]}
    repeats = {"seed": 0.66, "a": 0.78, "b": 0.60}
    jobs = [job(h, "fold", f, (0, 42, 143)[f], s[f]) for f in range(3) for h, s in folds.items()]
    jobs.append(job("seed", "search", None, 0, 0.9,
                    search={"quarter_val_auc": 0.9, "whole_val_auc": 0.7, "whole_val_best": 0.75}))
    jobs += [job(h, "repeat", 0, 1, s) for h, s in repeats.items()]
    return {"protocol": {"folds": 3}, "architectures": architectures, "jobs": jobs, "complete": len(jobs),
            "planned_jobs": len(jobs)}


def test_the_variance_parts_of_a_known_table(bench) -> None:
    parts = bench.variance_parts(known_document())
    # means 0.72, 0.82, 0.62: squares about 0.72 sum to 0.02, over 2
    assert parts["between"] == pytest.approx(0.01) and parts["between_jobs"] == 9
    # each architecture's folds lie 0.02 either side of its mean: 3 x 0.0008 over 3 x 2
    assert parts["within"] == pytest.approx(0.0004) and parts["within_jobs"] == 9
    assert parts["architecture"] == pytest.approx(0.01 - 0.0004 / 3)
    # fold 0 against the repeat: (0.70, 0.66) 0.0008, (0.80, 0.78) 0.0002, (0.60, 0.60) 0, over 3
    assert parts["seed"] == pytest.approx(0.001 / 3) and parts["seed_jobs"] == 6
    assert parts["fold"] == pytest.approx(0.0004 - 0.001 / 3)


def test_truth_correlations_and_the_search_pick_of_a_known_table(bench) -> None:
    document = known_document()
    true, folds = bench.truth(document)
    assert folds == 3 and true == pytest.approx({"seed": 0.72, "a": 0.82, "b": 0.62})
    rows = bench.correlations(document)["rows"]
    rho = {name.split(" (")[0]: r["rho"] for name, r in rows.items()}
    # truth ranks seed 2, A 3, B 1; quarter 3, 1, 2 and FLOPs 3, 1, 2: d² = 6, rho = 1 - 36/24
    assert rho["quarter-val score"] == pytest.approx(-0.5)
    assert rho["FLOPs"] == pytest.approx(-0.5)
    assert rho["whole-val best epoch"] == pytest.approx(1.0)
    assert rho["whole-val at the kept epoch"] == pytest.approx(0.5)  # 0.7, 0.8, 0.75: ranks 1, 3, 2
    assert rho["one fold"] == rho["two folds"] == rho["fold 0 vs the other folds' mean"] == pytest.approx(1.0)
    assert all(r["architectures"] == 3 for r in rows.values())
    pick = bench.search_pick(document, "whole_val_best")
    assert (pick["picked"], pick["beats_seed"], pick["picked_truth_rank"]) == ("A", True, 1)
    assert pick["seed_truth"] == pytest.approx(0.72)
    quarter = bench.search_pick(document, "quarter_val_auc")
    assert (quarter["picked"], quarter["picked_is_seed"]) == ("the seed's", True)
    assert not quarter["beats_seed"]
    text = bench.report(document)
    assert "(rank 2) (the seed's own architecture)" in text and "which beats the seed's 0.720" in text
    assert "0.820 ± 0.012" in text  # A: folds 0.80, 0.84, 0.82, SD 0.02 over sqrt(3)


def test_a_partial_table_says_what_cannot_be_separated_yet(bench) -> None:
    document = known_document()
    document["jobs"] = [j for j in document["jobs"] if j["kind"] == "fold" and j["fold"] == 0]
    parts = bench.variance_parts(document)
    assert parts["between"] == pytest.approx(0.01)  # fold 0 alone: 0.70, 0.80, 0.60
    assert parts["within"] is parts["seed"] is parts["fold"] is parts["architecture"] is None
    correlations = bench.correlations(document)
    assert correlations["truth_folds"] == 1
    assert not any(name.startswith(("one fold", "two folds")) for name in correlations["rows"])
    # the seed's search score is not done: the quarter-val figure rests on the two table rows
    assert correlations["rows"]["quarter-val score (the seed protocol's search)"]["architectures"] == 2
    text = bench.report(document)
    assert "cannot be separated yet" in text and "needs the seed repeats" in text
    assert "over 1 of 3 folds" in text


def test_each_replay_strategy_spends_its_budget_as_it_says(bench) -> None:
    pool = {"good": {"folds": [0.8, 0.8, 0.8], "flops": 100.0},
            "bad": {"folds": [0.5, 0.5, 0.5], "flops": 200.0},
            "dear": {"folds": [0.9, 0.9, 0.9], "flops": 300.0}}
    order, fold_orders = ["good", "bad", "dear"], {h: [0, 1, 2] for h in pool}

    def scored(budget: int, strategy: str) -> list[str]:
        return sorted(bench.replay_once(pool, order, fold_orders, budget, strategy, prior_sd=0.05))

    assert scored(2, "single split") == ["bad", "good"]  # one fold each
    assert scored(7, "k-fold") == ["bad", "good"]  # 3 + 3; the third needs 3 more than the 1 left
    # the race stops "bad" after its first fold (0.5 + 2 x 0.05 < good's 0.8 at fewer FLOPs): 3 + 1 + 3
    assert scored(7, "k-fold + race") == ["dear", "good"]
    assert scored(5, "k-fold + race") == ["good"]  # "dear" unfinished: never chosen
    for arch, score in zip(order, (0.7, 0.9, 0.6), strict=True):
        pool[arch]["search"] = score
    # today's search: a quarter of a fold training each, scored by its recorded search score
    assert bench.replay_once(pool, order, fold_orders, 0.5, "search score", 0.05, search_cost=0.25) == {
        "good": (0.7, 100.0), "bad": (0.9, 200.0)}


def lucky_document() -> dict:
    """Four architectures: "good" scores 0.80 on every fold, "lucky" 0.95 on one fold and 0.55 on the
    others (a lower truth), two more are worse everywhere."""
    folds = {"good": [0.80, 0.80, 0.80], "lucky": [0.95, 0.55, 0.55], "c": [0.6, 0.6, 0.6],
             "d": [0.5, 0.5, 0.5]}
    architectures = [{"arch_hash": h, "arch": h, "role": "top", "flops": 1e8, "table": None} for h in folds]
    jobs = [job(h, "fold", f, (0, 42, 143)[f], s[f]) for f in range(3) for h, s in folds.items()]
    return {"protocol": {"folds": 3, "size": 28}, "architectures": architectures, "jobs": jobs,
            "complete": len(jobs), "planned_jobs": len(jobs)}


def test_replays_show_a_single_split_fooled_by_a_lucky_fold_where_k_fold_is_not(bench) -> None:
    result = bench.replays(lucky_document(), budgets=(4, 12), draws=3000, seed=1)
    rows = {(r["budget"], r["strategy"]): r for r in result["rows"]}
    assert result["architectures"] == 4 and result["truth_folds"] == 3
    # 12 trainings: k-fold scores all four on all folds, so it always takes "good"
    assert rows[12, "k-fold"]["best_share"] == 1.0 and rows[12, "k-fold"]["val_truth"] == pytest.approx(0.8)
    # a single split scores all four on one fold each: "lucky" wins whenever its fold is the 0.95 one
    assert rows[12, "single split"]["best_share"] == pytest.approx(2 / 3, abs=0.03)
    assert rows[12, "single split"]["test_truth"] < rows[12, "k-fold"]["test_truth"]
    # every architecture has the same FLOPs: the front is the best scored one, its HV share below 1
    # whenever that is not "good"
    assert rows[12, "k-fold"]["hypervolume_share"] == pytest.approx(1.0)
    assert rows[12, "single split"]["hypervolume_share"] < 1.0
    text = bench.report(lucky_document())
    assert "replays at equal training cost" in text and "k-fold + race" in text
    assert "search score" not in text  # no architecture has a search score


def test_replays_rank_todays_search_by_its_score_at_its_own_cost(bench, tmp_path: Path) -> None:
    document = lucky_document()
    searched = {"good": 0.70, "lucky": 0.90, "c": 0.80, "d": 0.60}  # one noisy score each: "lucky" tops it
    for a in document["architectures"]:
        a["table"] = {"quarter_val_auc": 0.5, "whole_val_auc": 0.5, "whole_val_best": searched[a["arch"]]}
    for j in document["jobs"]:
        j["train_samples"] = 800
    good = document["architectures"][0]
    document["jobs"].append(job("good", "search", None, 0, 0.5, train_samples=200, search=good["table"]))
    result = bench.replays(document, budgets=(1, 4), draws=500, seed=2)
    assert result["search_cost"] == pytest.approx(0.25) and result["search_score"] == "whole_val_best"
    rows = {(r["budget"], r["strategy"]): r for r in result["rows"]}
    # 4 trainings buy 16 search trainings: it sees all four and always takes "lucky", never the best
    assert rows[4, "search score"]["best_share"] == 0.0
    assert rows[4, "search score"]["val_truth"] == pytest.approx((0.95 + 0.55 + 0.55) / 3)
    # 1 training buys 4 search trainings but one fold training, one architecture, for a single split
    assert rows[1, "search score"]["best_share"] == 0.0 and rows[1, "single split"]["best_share"] > 0
    assert "a search training costs 0.25 fold trainings" in bench.report(document)
    bench.plot(document, tmp_path / "noise.png")
    assert (tmp_path / "noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_table_of_another_protocol_is_refused(bench, tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": bench.FORMAT, "protocol": {"epochs": 12, "folds": 3}}))
    with pytest.raises(ValueError, match=r"another protocol \(differs in: epochs\); pass another --out"):
        bench.load_document(path, {"epochs": 1, "folds": 3})
    assert bench.load_document(tmp_path / "none.json", {}) is None


def test_bad_arguments_exit_2_with_one_line(bench, tmp_path: Path, capsys) -> None:
    assert bench.main(["--data-root", str(tmp_path), "--folds", "4"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --folds must be in [2, 3] (one training seed each: "
                                               "(0, 42, 143)), but got 4")
    assert bench.main(["--report", "--out", str(tmp_path / "none.json")]) == 2
    assert "build it first" in capsys.readouterr().err


@pytest.mark.slow
def test_a_small_build_writes_the_table_resumes_without_training_and_reports(bench, tmp_path: Path,
                                                                            capsys) -> None:
    table = tmp_path / "arch_table.json"
    table.write_text(json.dumps(hand_table([])))
    out = tmp_path / "noise.json"
    args = ["--data-root", str(tmp_path / "data"), "--dataset", "synthetic", "--size", "8",
            "--table", str(table), "--archs", "2", "--folds", "2", "--epochs", "1", "--seed-repeats", "0",
            "--threads", "1",
            "--out", str(out)]
    assert bench.main(args) == 0
    first = json.loads(out.read_text())
    assert first["complete"] == first["planned_jobs"] == 6  # 2 architectures x 2 folds, 2 search jobs
    assert [a["role"] for a in first["architectures"]] == ["seed", "cpu-best"]
    pool = 256 + 64  # synthetic train + val
    for architecture in first["architectures"]:
        mine = [j for j in first["jobs"] if j["arch_hash"] == architecture["arch_hash"]]
        folds = [j for j in mine if j["kind"] == "fold"]
        assert sorted(i for j in folds for i in j["val_index"]) == list(range(pool))
        assert [j["seed"] for j in folds] == [0, 42]
        for j in folds:
            assert len(j["val_scores"]) == len(j["val_index"]) == j["val_samples"]
            assert j["train_samples"] + j["val_samples"] == pool
            assert 0 <= j["test_auc"] <= 1 and len(j["curve"]["val_auc"]) == 1
        search = next(j for j in mine if j["kind"] == "search")
        assert search["train_samples"] == 64  # the quarter of train
        assert set(search["search"]) >= {"quarter_val_auc", "whole_val_best"}
    assert first["analysis"]["jobs"] == 6
    capsys.readouterr()
    assert bench.main(args) == 0  # again: nothing left to train
    assert "6 done already" in capsys.readouterr().out
    assert json.loads(out.read_text())["jobs"] == first["jobs"]
    assert bench.main(["--report", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "6 of 6 jobs done" in text and "Spearman with the truth (2 folds)" in text
    assert np.isfinite(first["analysis"]["variance"]["within"])
