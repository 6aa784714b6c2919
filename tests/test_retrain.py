"""Final training: the paper's protocol as defaults, results.json that a reloaded checkpoint
reproduces, failures recorded with their reason, baselines through the same path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nas3d.architecture import Architecture
from nas3d.checkpoint import load_checkpoint
from nas3d.costs import measure_costs
from nas3d.data import DataConfig, load_splits
from nas3d.metrics import accuracy, auc, binary_rates, bootstrap_interval, choose_threshold
from nas3d.registry import ModelRecipe
from nas3d.retrain import PAPER_SEEDS, RetrainConfig, RetrainSource, load_results, retrain
from nas3d.train import Recipe, predict

ARCH = Architecture(("conv3_in_relu", "relu_conv3"), ((0, 1), (1, 2), (2, 3)), 1, 1, 8)
# Float32 (amp only acts on CUDA): bit-reproducible on the CPU, so a reloaded checkpoint scores the same.
TINY = RetrainConfig.of(epochs=2, seeds=(0, 1), batch_size=16, amp=False)


def tiny_data(tmp_path: Path, size: int = 8, samples: int = 64) -> DataConfig:
    return DataConfig(dataset="synthetic", size=size, root=str(tmp_path / "data"), synthetic_samples=samples)


def test_defaults_are_the_papers_protocol() -> None:
    config = RetrainConfig()
    assert (config.epochs, config.seeds, config.batch_size, config.train.lr) == (200, PAPER_SEEDS, 128, 1e-3)
    assert RetrainConfig.of() == config and config.patience is None
    assert PAPER_SEEDS == (0, 42, 143, 1234, 3074)
    train = config.train_config(seed=42)
    # no early stop: patience equals the epoch budget
    assert (train.max_epochs, train.patience, train.seed, train.lr) == (200, 200, 42, 1e-3)
    assert RetrainConfig.of(patience=10).train_config(0).patience == 10


def test_the_recorded_recipe_keeps_the_flat_form_of_earlier_versions() -> None:
    # results.json and the seed checkpoints record the recipe by its flags, as before it held a TrainConfig
    config = RetrainConfig.of(epochs=3, seeds=(1, 2), batch_size=8, lr=0.01, patience=2, amp=False)
    assert config.to_dict() == {"epochs": 3, "seeds": [1, 2], "batch_size": 8, "lr": 0.01, "patience": 2,
                                "amp": False, "channels_last": True, "keep": "val_auc",
                                "cudnn_benchmark": True, "recipe": "paper", "schedule": "constant",
                                "warmup_epochs": 0, "weight_decay": 0.0, "class_weights": "none",
                                "augment": False, "threshold": "youden"}
    assert RetrainConfig().to_dict()["patience"] is None  # every epoch trains
    # the recipe's options are recorded resolved: a named recipe with one key overridden
    small = RetrainConfig.of(recipe="small3d", augment=False).to_dict()
    assert (small["recipe"], small["schedule"], small["augment"], small["class_weights"]) == (
        "small3d", "cosine", False, "balanced")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1, but got 0"),
        ({"seeds": ()}, "seeds must not be empty"),
        ({"seeds": (0, 0)}, "seeds must be distinct"),
        ({"seeds": (-1,)}, "seeds must be integers >= 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"patience": 0}, "patience must be an integer >= 1 or None"),
    ],
)
def test_bad_config_is_refused_with_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetrainConfig.of(**kwargs)


def test_results_match_the_metrics_of_the_saved_best_checkpoints(tmp_path: Path) -> None:
    data_config = tiny_data(tmp_path)
    factory = RetrainSource.from_architecture("tiny", ARCH, dataset="synthetic")
    seen = []
    report = retrain(factory, data_config, TINY, "cpu", tmp_path / "out", on_seed=seen.append)
    assert [s.seed for s in seen] == [0, 1] and not report.failed

    results = load_results(tmp_path / "out")
    assert results == json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] and results["dataset"] == "synthetic" and results["size"] == 8
    assert results["samples"] == {"train": 64, "val": 16, "test": 16}  # full splits, no search subset
    costs = measure_costs(ARCH, 1, 2, 8)
    assert (results["costs"]["flops"], results["costs"]["params"]) == (costs.flops, costs.params)

    data = load_splits(data_config, "cpu", for_search=False)
    labels = data.test.labels.numpy()
    for entry in results["seeds"]:
        assert entry["status"] == "completed" and entry["reason"] is None
        assert 1 <= entry["best_epoch"] <= entry["epochs_run"] == 2
        checkpoint = load_checkpoint(tmp_path / "out" / entry["checkpoint"])
        assert checkpoint.architecture == ARCH and checkpoint.metadata["seed"] == entry["seed"]
        model = checkpoint.build().to(memory_format=torch.channels_last_3d)
        scores, _ = predict(model, data.test, "cpu", 16, channels_last=True)
        assert entry["test_auc"] == auc(labels, scores, "binary-class")
        assert entry["test_acc"] == accuracy(labels, scores, "binary-class")
        assert checkpoint.metadata["metrics"]["test_auc"] == entry["test_auc"]
        # the per-sample test scores are kept exactly (they give the same AUC), in test_labels' order
        assert results["test_labels"] == labels.tolist()
        assert np.array_equal(np.float32(entry["test_scores"]), scores[:, 1])
        # the threshold chosen on val is in the checkpoint, with the test rates at it
        val_scores, _ = predict(model, data.val, "cpu", 16, channels_last=True)
        threshold = choose_threshold(data.val.labels.numpy(), val_scores)
        assert entry["threshold"] == checkpoint.threshold == checkpoint.metadata["threshold"] == threshold
        rates = binary_rates(labels, scores, threshold)
        assert entry["test_balanced_accuracy"] == rates["balanced_accuracy"]
        assert (entry["test_sensitivity"], entry["test_specificity"]) == (rates["sensitivity"],
                                                                         rates["specificity"])

    summary = results["summary"]
    test_aucs = [s["test_auc"] for s in results["seeds"]]
    assert summary["completed"] == 2 and summary["failed"] == 0
    assert summary["test_auc"]["mean"] == pytest.approx(np.mean(test_aucs))
    assert summary["test_auc"]["std"] == pytest.approx(np.std(test_aucs))
    # the bootstrap interval over the test samples is the one of the kept scores
    expected = bootstrap_interval(labels, [s["test_scores"] for s in results["seeds"]], "binary-class")
    assert summary["intervals"]["test_auc"] == pytest.approx(list(expected), nan_ok=True)


def test_seeds_give_different_initialisations_and_reruns_the_same(tmp_path: Path) -> None:
    data_config = tiny_data(tmp_path)
    config = RetrainConfig.of(epochs=1, seeds=(0, 1), batch_size=16, amp=False)
    factory = RetrainSource.from_architecture("tiny", ARCH)
    first = retrain(factory, data_config, config, "cpu", tmp_path / "a")
    again = retrain(factory, data_config, config, "cpu", tmp_path / "b")
    assert first.seeds[0].val_loss != first.seeds[1].val_loss
    assert [s.val_loss for s in first.seeds] == [s.val_loss for s in again.seeds]


def test_a_failing_seed_is_recorded_with_its_reason_not_scored(tmp_path: Path) -> None:
    config = RetrainConfig.of(epochs=2, seeds=(0, 1), batch_size=16, lr=1e12, amp=False)
    factory = RetrainSource.from_architecture("diverges", ARCH)
    report = retrain(factory, tiny_data(tmp_path), config, "cpu", tmp_path / "out")
    assert len(report.failed) == 2
    results = load_results(tmp_path / "out")
    for entry in results["seeds"]:
        assert entry["status"] == "failed" and entry["reason"].startswith("NonFiniteLoss: ")
        assert entry["test_auc"] is None and entry["checkpoint"] is None
    assert results["summary"] == {"completed": 0, "failed": 2, "val_auc": None, "val_acc": None,
                                  "test_auc": None, "test_acc": None, "test_balanced_accuracy": None,
                                  "test_sensitivity": None, "test_specificity": None, "single_class": {}}
    assert not list((tmp_path / "out").glob("seed-*.pt"))


def test_existing_results_are_not_overwritten_unless_asked(tmp_path: Path) -> None:
    factory = RetrainSource.from_architecture("tiny", ARCH)
    config = RetrainConfig.of(epochs=1, seeds=(0,), batch_size=16, amp=False)
    retrain(factory, tiny_data(tmp_path), config, "cpu", tmp_path / "out")
    with pytest.raises(ValueError, match="results.json exists; pass --force"):
        retrain(factory, tiny_data(tmp_path), config, "cpu", tmp_path / "out")
    retrain(factory, tiny_data(tmp_path), config, "cpu", tmp_path / "out", overwrite=True)


def test_a_baseline_retrains_through_the_same_path(tmp_path: Path) -> None:
    data_config = tiny_data(tmp_path, size=4, samples=32)
    config = RetrainConfig.of(epochs=1, seeds=(0,), batch_size=16, amp=False)
    report = retrain(RetrainSource.from_baseline("resnet18"), data_config, config, "cpu", tmp_path / "out")
    assert not report.failed, report.failed
    results = report.results
    assert results["model"]["kind"] == "baseline" and results["model"]["baseline"] == "resnet18"
    costs = measure_costs("resnet18", 1, 2, 4)
    assert (results["costs"]["flops"], results["costs"]["params"]) == (costs.flops, costs.params)
    raw = torch.load(tmp_path / "out" / "seed-0.pt", weights_only=True)  # weights and a recipe only
    assert raw["model"] == {"name": "resnet18", "args": {}}
    model = load_checkpoint(tmp_path / "out" / "seed-0.pt").build()
    data = load_splits(data_config, "cpu", for_search=False)
    scores, _ = predict(model.to(memory_format=torch.channels_last_3d), data.test, "cpu", 16,
                        channels_last=True)
    assert report.seeds[0].test_auc == auc(data.test.labels.numpy(), scores, "binary-class")


def test_an_unknown_baseline_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown baseline 'resnet34'.*resnet18, resnet50"):
        RetrainSource.from_baseline("resnet34")
    with pytest.raises(ValueError, match="unknown model 'resnet34'.*nas3d, resnet18, resnet50"):
        ModelRecipe("resnet34")


def test_a_checkpoint_of_the_first_format_still_loads_and_predicts_as_it_did() -> None:
    # Written by nas3d 0.1 ("nas3d-checkpoint/1"); the logits were printed when it was written.
    checkpoint = load_checkpoint(Path(__file__).parent / "data" / "checkpoint-format1.pt")
    assert checkpoint.architecture == Architecture(("relu_conv3",), ((0, 1), (1, 2)), 1, 1, 8)
    assert checkpoint.metadata["trial"] == 3 and checkpoint.input_size == 12
    x = torch.linspace(0, 1, 12**3).reshape(1, 1, 12, 12, 12)
    with torch.no_grad():
        logits = checkpoint.build()(x)
    torch.testing.assert_close(logits, torch.tensor([[-0.3046598434448242, -0.2169724404811859]]))
    source = RetrainSource.from_checkpoint(Path(__file__).parent / "data" / "checkpoint-format1.pt")
    assert source.name == "smoke-trial3" and source.recipe.architecture == checkpoint.architecture


def _options(**extra: object) -> dict:
    return {"baseline": "resnet18", "dataset": "synthetic", "epochs": 3, "seeds": "0", "batch_size": 8,
            "lr": 1e-3, **extra}


def test_retrain_takes_the_recipe_options_by_set() -> None:
    from nas3d.retrain import plan_retrain

    # the default is the recipe table's best, the paper's with augmentation; the paper's is one key away
    assert plan_retrain(_options(), None).config.train.options == Recipe(augment=True)
    assert plan_retrain(_options(set=["train.recipe=paper"]), None).config.train.options == Recipe()

    plan = plan_retrain(_options(set=["train.recipe=small3d", "train.augment=false",
                                      "train.threshold=sensitivity:0.9", "data.synthetic_samples=40"]), None)
    options = plan.config.train.options
    assert (options.schedule, options.class_weights, options.augment) == ("cosine", "balanced", False)
    assert plan.config.train.threshold == "sensitivity:0.9" and plan.data.synthetic_samples == 40
    assert plan.config.epochs == 3  # the flags stay the flags'


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.lr=1"], "retrain sets train.lr by its flag --lr; drop --set train.lr"),
        (["study.name=x"], "retrain --set takes data.KEY=VALUE or train.KEY=VALUE, but got 'study.name'"),
        (["train.schedule=linear"], "train.schedule must be one of constant, multistep, cosine"),
        (["train.threshold=sensitivity:2"], 'train.threshold must be "youden" or "sensitivity:T"'),
    ],
)
def test_bad_recipe_options_are_one_line_errors(sets: list[str], message: str) -> None:
    from nas3d.retrain import plan_retrain

    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as raised:
        plan_retrain(_options(set=sets), None)
    assert "\n" not in str(raised.value)


def test_decision_metrics_find_single_class_models() -> None:
    from nas3d.data import DeviceData, Split
    from nas3d.retrain import decision_metrics

    def split(labels: list[int]) -> Split:
        return Split(torch.zeros(len(labels), 1, 2, 2, 2), torch.tensor(labels), "binary-class")

    data = DeviceData(name="toy", num_classes=2, in_channels=1, size=2,
                      train=split([0, 1]), val=split([0, 0, 1, 1]), test=split([0, 1, 1]))
    low = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])  # ranks val perfectly, all below 0.5
    found = decision_metrics(data, low, np.array([[0.9, 0.1], [0.7, 0.3], [0.65, 0.35]]), "youden")
    assert found["threshold"] == pytest.approx(0.25)  # midway between the classes on val
    assert found["single_class"] == ("val at 0.5", "test at 0.5")
    assert found["test_sensitivity"] == 1.0 and found["test_specificity"] == 1.0
