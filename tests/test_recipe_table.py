"""bench/recipe_table.py: its variants, resuming, and the table it prints, on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nas3d.metrics import auc
from nas3d.seeds import seed_architectures
from nas3d.train import RECIPES, Recipe
from tests._bench import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("recipe_table")


def test_variants_are_todays_recipe_each_option_alone_and_all_combined(bench) -> None:
    args = type("Args", (), {"epochs": 12, "batch_size": 32, "lr": 1e-3})()
    options = {name: bench.train_config(args, name, 0).options for name in bench.VARIANTS}
    assert options["paper"] == Recipe() and options["all"] == RECIPES["small3d"]
    for name in ("multistep", "cosine", "weight_decay", "balanced", "augment"):  # one option each
        changed = {k for k, v in vars(options[name]).items() if v != getattr(Recipe(), k)} - {"warmup_epochs"}
        assert len(changed) == 1, (name, changed)
    archs = bench.architectures("adrenalmnist3d")
    assert archs["seed"] == seed_architectures()["adrenalmnist3d"]
    assert archs["cpu_best"].short_str() == ("S1C1F8 1=mish_conv3(0) 2=conv3_in_relu(0) 3=conv3_in_mish(1,2) "
                                             "out(3)")


def test_bad_arguments_exit_2_with_one_line(bench, tmp_path: Path, capsys) -> None:
    assert bench.main(["--data-root", str(tmp_path), "--variants", "paper,fast"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --variants takes some of paper, multistep")
    assert bench.main(["--data-root", str(tmp_path), "--archs", "resnet18"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --archs takes some of seed, cpu_best")
    assert bench.main(["--report", "--out", str(tmp_path / "none.json")]) == 2
    assert "build it first" in capsys.readouterr().err


@pytest.mark.slow
def test_a_small_build_writes_runs_resumes_without_training_and_prints_the_table(bench, tmp_path: Path,
                                                                                capsys) -> None:
    out = tmp_path / "recipes.json"
    args = ["--data-root", str(tmp_path / "data"), "--dataset", "synthetic", "--size", "8", "--epochs", "1",
            "--batch-size", "64", "--seeds", "0", "--variants", "paper,all", "--threads", "1",
            "--out", str(out)]
    assert bench.main(args) == 0
    first = json.loads(out.read_text())
    assert [(r["arch"], r["variant"], r["seed"]) for r in first["runs"]] == [
        ("seed", "paper", 0), ("seed", "all", 0), ("cpu_best", "paper", 0), ("cpu_best", "all", 0)]
    for run in first["runs"]:
        assert 0 <= run["test_auc"] <= 1 and 0 < run["threshold"] < 1
        assert isinstance(run["one_class_val"], bool) and isinstance(run["one_class_test"], bool)
        assert run["options"]["augment"] == (run["variant"] == "all")
        assert len(run["test_scores"]) == len(first["test_labels"]) and first["task"] == "binary-class"
    printed = capsys.readouterr().out
    assert "recipe table: synthetic 8³, 1 epochs at batch 64" in printed and "one class test" in printed
    assert bench.main(args) == 0  # again: nothing left to train
    assert "4 done already" in capsys.readouterr().out
    assert json.loads(out.read_text())["runs"] == first["runs"]
    with pytest.raises(ValueError, match=r"another protocol \(differs in: epochs\)"):
        bench.load_document(out, first["protocol"] | {"epochs": 2})
    assert bench.main(["--report", "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in table[-2:]] == [["cpu_best", "paper", "1"], ["cpu_best", "all", "1"]]
    # built in parts: another variant, one architecture, into the same file
    in_parts = [*args[:args.index("--variants")], "--variants", "balanced", "--archs", "cpu_best",
                *args[args.index("--threads"):]]
    assert bench.main(in_parts) == 0
    assert "1 runs planned, 0 done already" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert runs[:4] == first["runs"]
    assert [(r["arch"], r["variant"]) for r in runs[4:]] == [("cpu_best", "balanced")]
    # --rescore: a run recorded without its test scores is trained again, bit-reproducibly on the CPU
    document = json.loads(out.read_text())
    del document["runs"][1]["test_scores"]
    out.write_text(json.dumps(document))
    assert bench.main([*args, "--rescore"]) == 0
    printed = capsys.readouterr().out
    assert "4 runs planned, 3 done already" in printed
    assert "seed all seed 0" in printed and "trained again, test AUC identical" in printed
    rescored = {(r["arch"], r["variant"]): r for r in json.loads(out.read_text())["runs"]}
    assert len(rescored) == 5 and rescored["seed", "all"]["test_scores"] == first["runs"][1]["test_scores"]


def test_two_builds_of_one_file_keep_each_others_runs(bench, tmp_path: Path) -> None:
    """Two builds (one per core, other --variants) read the file at their start; each write keeps the
    runs the other wrote meanwhile."""
    out = tmp_path / "recipes.json"
    protocol = {"dataset": "synthetic", "epochs": 1}
    first = {"format": bench.FORMAT, "protocol": protocol, "runs": []}
    second = {"format": bench.FORMAT, "protocol": protocol, "runs": []}  # started before any run ended
    first["runs"].append({"arch": "cpu_best", "variant": "paper", "seed": 0, "test_auc": 0.8})
    bench.write_document(out, first, {("cpu_best", "paper", 0)})
    second["runs"].append({"arch": "cpu_best", "variant": "balanced", "seed": 0, "test_auc": 0.7})
    bench.write_document(out, second, {("cpu_best", "balanced", 0)})
    first["runs"].append({"arch": "cpu_best", "variant": "paper", "seed": 42, "test_auc": 0.9})
    bench.write_document(out, first, {("cpu_best", "paper", 0), ("cpu_best", "paper", 42)})
    runs = json.loads(out.read_text())["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == [("balanced", 0), ("paper", 0), ("paper", 42)]
    # a build that trains a run again (--rescore) replaces it; another build's stale copy does not
    second["runs"][-1] = {"arch": "cpu_best", "variant": "balanced", "seed": 0, "test_auc": 0.7,
                          "test_scores": [0.1]}
    bench.write_document(out, second, {("cpu_best", "balanced", 0)})
    first["runs"].append({"arch": "cpu_best", "variant": "paper", "seed": 143, "test_auc": 0.85})
    bench.write_document(out, first, {("cpu_best", "paper", 0), ("cpu_best", "paper", 42),
                                      ("cpu_best", "paper", 143)})
    runs = {(r["variant"], r["seed"]): r for r in json.loads(out.read_text())["runs"]}
    assert len(runs) == 4 and runs["balanced", 0]["test_scores"] == [0.1]


def test_the_table_gives_each_recipe_a_bootstrap_interval_and_its_paired_difference_from_paper(bench) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)

    def run(variant: str, seed: int, signal: float, scores: bool = True) -> dict:
        score = np.clip(0.5 + signal * (labels - 0.5) + rng.normal(0, 0.3, labels.size), 0, 1)
        row = {"arch": "seed", "variant": variant, "seed": seed,
               "test_auc": auc(labels, score, "binary-class"), "test_acc": 0.5, "one_class_val": False,
               "one_class_test": False}
        return row | ({"test_scores": score.tolist()} if scores else {})
    runs = [run("paper", 0, 0.1), run("paper", 42, 0.1), run("all", 0, 0.6), run("all", 42, 0.6),
            run("balanced", 0, 0.3, scores=False)]
    document = {"protocol": {"dataset": "synthetic", "size": 8, "epochs": 1, "batch_size": 4,
                             "variants": bench.VARIANTS, "architectures": {"seed": {}}},
                "runs": runs, "task": "binary-class", "test_labels": labels.tolist()}
    lines = {line.split()[1]: line for line in bench.report(document).splitlines()[3:]}
    paper_runs = [r for r in runs if r["variant"] == "paper"]
    paper, combined = (bench._intervals(document, [r for r in runs if r["variant"] == v], paper_runs)
                       for v in ("paper", "all"))
    assert paper[1] == "-" and combined[0] in lines["all"] and combined[1] in lines["all"]
    low, high = (float(x) for x in combined[0].strip("[]").split(","))
    mean = np.mean([r["test_auc"] for r in runs[2:4]])
    assert low < mean < high
    difference = float(combined[1].split()[0])
    d_low, d_high = (float(x) for x in combined[1].split(" ", 1)[1].strip("[]").split(","))
    assert difference > 0 and 0 < d_low < difference < d_high  # a clearly better recipe: the pair excludes 0
    assert lines["balanced"].split()[4:6] == ["-", "-"]  # recorded without scores: no interval


@pytest.mark.slow
def test_a_run_is_the_seed_nas3d_retrain_trains_and_tests(bench, tmp_path: Path) -> None:
    """The README's retrained rows come from this table: a run is ``nas3d retrain``'s seed of the same
    recipe, to the last bit on the CPU (model, test scores, threshold)."""
    from nas3d.data import DataConfig, load_splits
    from nas3d.retrain import RETRAIN_RECIPE, RetrainConfig, RetrainSource, retrain

    arch = bench.architectures("synthetic")["cpu_best"]
    data_config = DataConfig(dataset="synthetic", size=8, root=str(tmp_path / "data"), synthetic_samples=48)
    config = RetrainConfig.of(epochs=2, seeds=(42,), batch_size=16, amp=False, recipe=RETRAIN_RECIPE)
    (seed,) = retrain(RetrainSource.from_architecture("cpu_best", arch), data_config, config, "cpu",
                      tmp_path / "run").seeds
    data = load_splits(data_config, "cpu", for_search=False)
    row = bench.run_one(arch, data, data_config, config.train_config(42))
    assert seed.completed and row["options"]["augment"]
    assert (row["test_auc"], row["threshold"], row["best_epoch"]) == (seed.test_auc, seed.threshold,
                                                                       seed.best_epoch)
    assert row["test_scores"] == seed.test_scores
