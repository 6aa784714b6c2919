"""The recipe table: today's training recipe against each option of ``[train]`` alone and all combined.

On real AdrenalMNIST3D at 28³ (``--data-root``), for the seed study's published adrenal architecture and
the CPU profile's best (:data:`CPU_BEST`), each recipe variant (:data:`VARIANTS`) is trained on the whole
train split for ``--epochs`` (12) epochs at batch ``--batch-size`` (32), Adam(W) at lr 1e-3, patience
equal to the epochs (every run trains all its epochs), keeping the best-val-AUC epoch, with seeds 0, 42
and 143. Each run is tested as ``nas3d retrain`` tests a seed (:func:`nas3d.retrain.test_metrics`:
medmnist's Evaluator on the real test split): test AUC, ACC at 0.5 (MedMNIST's), the threshold chosen
on val by balanced accuracy with the balanced accuracy, sensitivity and specificity at it, and whether
the model predicts one class only (on val, on test, at 0.5). Each run keeps its test scores, so the
table gives each recipe a 95 % BCa bootstrap interval of its seed-averaged test AUC over the test volumes,
and the paired interval of its difference from the same architecture's paper recipe.

The JSON is rewritten atomically after every run; running the same command again skips the finished
runs (a file made with another protocol is refused). At the end the comparison table is printed.
Cost: 42 runs (2 architectures x 7 variants x 3 seeds); on a 2-core AMD EPYC, one thread, a 12-epoch
run on 857 training volumes took 260-780 s depending on the VM (either architecture), so the
table is 3 to 9 hours of one core (``--archs``, ``--variants`` and ``--seeds`` build it in parts):

    python bench/recipe_table.py --data-root ../shared/data --threads 1     # build (resumes), then the table
    python bench/recipe_table.py --report                                   # the table of what is done
    python bench/recipe_table.py --data-root ../shared/data --archs cpu_best --rescore   # older runs: scores
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (puts this checkout first on sys.path)
import numpy as np
import torch
from _common import CPU_BEST, REPO, format_table, load_table, set_threads, write_table
from arch_table import machine

from nas3d.architecture import Architecture
from nas3d.data import DataConfig, load_splits
from nas3d.metrics import bootstrap_interval, single_class
from nas3d.registry import ModelRecipe
from nas3d.retrain import PAPER_SEEDS, compact_scores, decision_metrics, test_metrics
from nas3d.seeds import seed_architectures
from nas3d.train import RECIPES, TrainConfig, predict, train_trial

FORMAT = "nas3d-recipe-table/1"
SEEDS = PAPER_SEEDS[:3]  # 0, 42, 143: the first three of nas3d retrain's
_ALL = RECIPES["small3d"]
#: Each variant's [train] keys over today's recipe ("paper"): every option alone, then all combined
#: (the "small3d" recipe).
VARIANTS: dict[str, dict[str, object]] = {
    "paper": {},
    "multistep": {"schedule": "multistep"},
    "cosine": {"schedule": "cosine", "warmup_epochs": _ALL.warmup_epochs},
    "weight_decay": {"weight_decay": _ALL.weight_decay},
    "balanced": {"class_weights": "balanced"},
    "augment": {"augment": True},
    "all": {"recipe": "small3d"},
}


ARCH_LABELS = ("seed", "cpu_best")


def architectures(dataset: str) -> dict[str, Architecture]:
    """The two architectures of the table by label: the seed study's for ``dataset`` and the CPU best."""
    seeds = seed_architectures()
    if dataset not in seeds:  # synthetic data (the tests): the adrenal one
        dataset = "adrenalmnist3d"
    return dict(zip(ARCH_LABELS, (seeds[dataset], CPU_BEST), strict=True))


def protocol(args: argparse.Namespace) -> dict:
    """What makes two runs comparable; a resumed file must have been made with the same. Every variant
    and architecture is in it, not the ones this build selects: ``--archs``, ``--variants`` and
    ``--seeds`` build one file in parts."""
    return {"dataset": args.dataset, "size": args.size, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "keep": "val_auc", "threshold": "youden", "variants": VARIANTS,
            "architectures": {label: a.to_json() for label, a in architectures(args.dataset).items()}}


def train_config(args: argparse.Namespace, variant: str, seed: int) -> TrainConfig:
    return TrainConfig(max_epochs=args.epochs, patience=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       seed=seed, amp=False, **VARIANTS[variant])  # type: ignore[arg-type]


def run_key(run: dict) -> tuple[str, str, int]:
    return run["arch"], run["variant"], run["seed"]


def run_one(arch: Architecture, data, data_config: DataConfig, config: TrainConfig) -> dict:
    """Train one run as ``nas3d retrain`` trains a seed and return its row."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)  # the initial weights, as retrain seeds them
    model = ModelRecipe.of(arch).build(data.in_channels, data.num_classes)
    trained = train_trial(model, data, config, "cpu")
    scores, _ = predict(model, data.test, "cpu", config.batch_size, channels_last=config.channels_last)
    val_scores, _ = predict(model, data.val, "cpu", config.batch_size, channels_last=config.channels_last)
    test_auc, test_acc = test_metrics(data_config, data.test, scores)
    decision = decision_metrics(data, val_scores, scores, config.threshold)
    return {
        "val_auc": trained.val_auc, "best_epoch": trained.best_epoch, "test_auc": test_auc,
        "test_acc": test_acc, "threshold": decision["threshold"],
        "test_balanced_accuracy": decision.get("test_balanced_accuracy"),
        "test_sensitivity": decision.get("test_sensitivity"),
        "test_specificity": decision.get("test_specificity"),
        "one_class_val": single_class(val_scores, data.task) is not None,
        "one_class_test": single_class(scores, data.task) is not None,
        "options": dataclasses.asdict(config.options),
        # for the intervals of the table (bootstrap over the test volumes), as results.json keeps them
        "test_scores": compact_scores(scores, data.task),
        "seconds": round(time.perf_counter() - start, 1),
    }


def load_document(path: Path, expected: dict) -> dict | None:
    return load_table(path, FORMAT, expected)


def write_document(path: Path, document: dict, trained: set[tuple[str, str, int]]) -> None:
    """Write ``document`` with the runs another build of the same file (``--variants`` or ``--archs``
    in parts, one per core) wrote meanwhile, under a lock: what is on disk is kept, except the runs
    this build ``trained`` (new, or trained again by ``--rescore``), which replace theirs."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = load_document(path, document["protocol"]) or {"runs": []}
        runs = {run_key(r): r for r in on_disk["runs"]}
        for run in document["runs"]:
            if run_key(run) in trained or run_key(run) not in runs:
                runs[run_key(run)] = run
        document["runs"] = list(runs.values())
        write_table(path, document)


def build(args: argparse.Namespace) -> dict:
    expected = protocol(args)
    document = load_document(args.out, expected) or {"format": FORMAT, "protocol": expected, "runs": []}
    document.update(command="python bench/recipe_table.py " + " ".join(args.argv), machine=machine())
    document["machine"]["torch_threads"] = torch.get_num_threads()
    data_config = DataConfig(dataset=args.dataset, size=args.size, root=str(Path(args.data_root).resolve()),
                             download=False)
    data = load_splits(data_config, "cpu", for_search=False)  # the whole train and val splits, and test
    document.update(task=data.task, test_labels=data.test.labels.cpu().numpy().reshape(-1).tolist())
    archs = architectures(args.dataset)
    planned = [(label, variant, seed)
               for label in args.archs for variant in args.variants for seed in args.seeds]
    # --rescore: a run recorded without its test scores (before the table kept them) is trained again
    done = {run_key(r) for r in document["runs"] if "test_scores" in r or not args.rescore}
    todo = [key for key in planned if key not in done]
    log(f"{len(planned)} runs planned, {len(planned) - len(todo)} done already; "
        f"{torch.get_num_threads()} torch thread(s) -> {args.out}")
    trained: set[tuple[str, str, int]] = set()
    for number, (label, variant, seed) in enumerate(todo, start=1):
        row = run_one(archs[label], data, data_config, train_config(args, variant, seed))
        before = next((r for r in document["runs"] if run_key(r) == (label, variant, seed)), None)
        document["runs"] = [r for r in document["runs"] if r is not before]
        document["runs"].append({"arch": label, "variant": variant, "seed": seed, **row})
        trained.add((label, variant, seed))
        write_document(args.out, document, trained)
        log(f"[{number}/{len(todo)}] {label} {variant} seed {seed}: test AUC {row['test_auc']:.3f}, "
            f"ACC@0.5 {row['test_acc']:.3f}, one class on test {row['one_class_test']} ({row['seconds']} s)"
            + _again(before, row))
    return document


def _again(before: dict | None, row: dict) -> str:
    """How a run trained again (``--rescore``) compares with its record: on one machine a CPU run is
    bit-reproducible, so its test AUC should be the same to the last digit (another processor differs)."""
    if before is None:
        return ""
    old = before["test_auc"]
    return "; trained again, test AUC " + ("identical" if old == row["test_auc"] else f"was {old:.6f}")


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f}±{np.std(values):.3f}" if values else "-"


def _intervals(document: dict, runs: list[dict], paper: list[dict]) -> tuple[str, str]:
    """The 95 % BCa interval of the seed-averaged test AUC over the test volumes, and the paired one of
    its difference from the same architecture's paper recipe (the seeds in both); "-" where a run was
    recorded without its test scores (the table's first runs) or there is nothing to pair with."""
    if "test_labels" not in document or any("test_scores" not in r for r in runs):
        return "-", "-"
    labels, task = np.asarray(document["test_labels"]), document["task"]
    ours = [np.asarray(r["test_scores"]) for r in runs]
    low, high = bootstrap_interval(labels, ours, task)
    interval = f"[{low:.3f}, {high:.3f}]"
    if runs == paper or not paper or any("test_scores" not in r for r in paper):
        return interval, "-"
    mean = np.mean([r["test_auc"] for r in runs]) - np.mean([r["test_auc"] for r in paper])
    low, high = bootstrap_interval(labels, ours, task, other=[np.asarray(r["test_scores"]) for r in paper])
    return interval, f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def report(document: dict) -> str:
    """The comparison table: per architecture and variant, over its seeds."""
    headers = ["arch", "recipe", "seeds", "test AUC", "AUC 95% CI", "ΔAUC vs paper [95% CI]", "bal. acc @thr",
               "sens @thr", "spec @thr", "ACC @0.5", "one class val", "one class test"]
    rows = []
    variants = list(document["protocol"]["variants"])
    for label in document["protocol"]["architectures"]:
        grouped = {v: [r for r in document["runs"] if (r["arch"], r["variant"]) == (label, v)]
                   for v in variants}
        for variant in variants:
            runs = grouped[variant]
            if not runs:
                continue

            def values(key: str, runs: list[dict] = runs) -> list[float]:
                return [r[key] for r in runs if r.get(key) is not None]

            rows.append([label, variant, str(len(runs)), _mean_std(values("test_auc")),
                         *_intervals(document, runs, grouped["paper"]),
                         _mean_std(values("test_balanced_accuracy")), _mean_std(values("test_sensitivity")),
                         _mean_std(values("test_specificity")), _mean_std(values("test_acc")),
                         f"{sum(r['one_class_val'] for r in runs)}/{len(runs)}",
                         f"{sum(r['one_class_test'] for r in runs)}/{len(runs)}"])
    p = document["protocol"]
    seeds = sorted({r["seed"] for r in document["runs"]})
    head = (f"recipe table: {p['dataset']} {p['size']}³, {p['epochs']} epochs at batch {p['batch_size']}, "
            f"seeds {','.join(map(str, seeds)) or '-'}; mean±std over seeds; "
            "CI: 95 % BCa bootstrap over the test volumes (seeds averaged; ΔAUC paired with the paper "
            "recipe's seeds); @thr: at the threshold chosen on val (balanced accuracy); one class: "
            "predicts a single class at 0.5")
    return head + "\n" + (format_table(headers, rows) if rows else "(no run finished yet)")


def log(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="folder holding the dataset's npz (required to build)")
    parser.add_argument("--dataset", default="adrenalmnist3d")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                        help="comma-separated (default 0,42,143)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--archs", default=",".join(ARCH_LABELS),
                        help=f"comma-separated, of {', '.join(ARCH_LABELS)} (default both)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path,
                        help="the JSON (default bench/data/recipe_table_DATASET_SIZE.json)")
    parser.add_argument("--report", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--rescore", action="store_true",
                        help="train again the selected runs recorded without test scores (for the intervals)")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.out = args.out or REPO / "bench" / "data" / f"recipe_table_{args.dataset}_{args.size}.json"
    try:
        if args.report:
            if not args.out.exists():
                raise ValueError(f"{args.out} does not exist: build it first (without --report)")
            log(report(json.loads(args.out.read_text())))
            return 0
        if not args.data_root:
            raise ValueError("--data-root is required to build (the folder holding the dataset's npz)")
        try:
            args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds expects comma-separated integers, but got {args.seeds!r}") from None
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in args.variants if v not in VARIANTS]
        args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
        if not args.archs or set(args.archs) - set(ARCH_LABELS):
            raise ValueError(f"--archs takes some of {', '.join(ARCH_LABELS)}, "
                             f"but got {args.archs or 'none'}")
        if unknown or not args.variants or not args.seeds:
            raise ValueError(f"--variants takes some of {', '.join(VARIANTS)}, but got {unknown or 'none'}"
                             if unknown or not args.variants else "--seeds must name at least one seed")
        for name in ("epochs", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}")
        set_threads(args.threads)
        document = build(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log("")
    log(report(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
