# Long module: the truth table's jobs, its resumable JSON and its analysis belong together, and the
# analysis is read by the tests as functions of this script.
"""The truth table: architectures scored across stratified folds of train+val, to measure the noise.

The search scores an architecture once: one seed, one split, on a quarter of a 98-volume validation
split (or on the whole of it). This table says how much of that score is the architecture. Each
architecture is trained on ``--folds`` stratified folds of train+val (``nas3d.folds``, split seed 0):
the fold's val part never trains, and each fold has its own training seed (0, 42, 143). Training is
the CPU profile's search recipe (``studies/adrenalmnist3d-cpu.toml``: batch 32, Adam at lr 1e-3, the
kept epoch is the best val AUC) for ``--epochs`` (12) epochs with patience 12, so every curve is
complete. Per job the table records the curve, the kept epoch and its val AUC, the per-sample val
scores with their indices into train+val, and the **test** AUC and ACC of the kept model. Test AUC is
reported beside the truth, never used to choose anything.

The **truth** of an architecture is the mean val AUC of its kept epochs over its folds.

Architectures: the seed study's published one for the dataset, the CPU profile's best
(:data:`CPU_BEST`), the architecture table's top 4 by whole-val AUC at the epoch the search keeps (the
best quarter-val AUC), and 6 more spread over the table's FLOPs (3) and whole-val scores (3). A table
row brings its search scores (quarter-val, whole-val at the kept epoch, best whole-val: what the CPU
profile, which scores on the whole split, records); the two architectures outside the table get them
from a "search" job by the table's protocol (a quarter of train, seed 0, scored on the quarter of val
and on the whole of it). ``--seed-repeats N`` adds N more seeds (1..N) on fold 0 for every
architecture, so that seed noise can be told from fold noise.

Jobs run fold-major (every architecture's fold 0, then the search jobs, then fold 1, ...), then the
seed repeats. The JSON is rewritten atomically after every job, with the analysis of what is done;
running the same command again skips the finished jobs.

    python bench/noise_table.py --data-root ../shared/data --threads 1      # build (resumes)
    python bench/noise_table.py --report                                    # the analysis so far
    python bench/noise_table.py --report --png docs/noise.png               # ... and its figure
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import _common  # noqa: F401  (puts this checkout first on sys.path)
import numpy as np
import torch
from _common import CPU_BEST, REPO, format_table, load_table, set_threads, spread, write_table
from arch_table import machine
from scipy import stats

from nas3d.architecture import Architecture
from nas3d.costs import measure_costs
from nas3d.data import DataConfig, DeviceData, Split, ensure_file, load_splits, read_arrays
from nas3d.folds import stratified_folds
from nas3d.model import build_model
from nas3d.seeds import seed_architectures
from nas3d.train import EpochRecord, TrainConfig, TrainResult, evaluate, predict, train_trial

FORMAT = "nas3d-noise-table/1"
DEFAULT_TABLE = REPO / "bench" / "data" / "arch_table_adrenalmnist3d_28.json"
#: One training seed per fold; fold f trains with FOLD_SEEDS[f].
FOLD_SEEDS = (0, 42, 143)
SPLIT_SEED = 0  # the seed of the stratified folds: the same folds for every architecture
TOP, BY_FLOPS, BY_SCORE = 4, 3, 3
FOLD, SEARCH, REPEAT = "fold", "search", "repeat"  # job kinds


# --------------------------------------------------------------------------------------- choosing


def table_scores(row: dict) -> dict:
    """An architecture-table row's search scores: at the epoch the quarter-val search keeps (best
    quarter AUC, ties to the lower loss) its quarter-val AUC and whole-val AUC, and the best whole-val
    AUC of any epoch (what a search scored on the whole val split records)."""
    curve = row["curve"]
    return search_scores(curve["val_auc"], curve["val_loss"], curve["full_val_auc"])


def search_scores(val_auc: list[float], val_loss: list[float], full_val_auc: list[float]) -> dict:
    kept = max(range(len(val_auc)), key=lambda e: (val_auc[e], -val_loss[e]))
    return {"kept_epoch": kept + 1, "quarter_val_auc": val_auc[kept],
            "whole_val_auc": full_val_auc[kept], "whole_val_best": max(full_val_auc)}


def evenly(rows: list[dict], count: int, key) -> list[dict]:
    """``count`` of ``rows`` evenly over their order by ``key``, the first and last included."""
    rows = sorted(rows, key=key)
    if count >= len(rows):
        return rows
    return [rows[round(i * (len(rows) - 1) / (count - 1))] for i in range(count)] if count > 1 else rows[:1]


def choose_architectures(table: dict) -> list[dict]:
    """The table's architectures in job order: the seed study's, the CPU profile's best, the top
    :data:`TOP` by whole-val AUC at the kept epoch, :data:`BY_FLOPS` of the rest spread over FLOPs
    (cheapest and dearest included) and :data:`BY_SCORE` more spread over whole-val AUC."""
    dataset = table["protocol"]["dataset"]
    chosen = [("seed", seed_architectures()[dataset], None), ("cpu-best", CPU_BEST, None)]
    by_hash = {row["arch_hash"]: row for row in table["rows"]}
    chosen = [(role, arch, by_hash.get(arch.arch_hash())) for role, arch, _ in chosen]
    taken = {arch.arch_hash() for _, arch, _ in chosen}

    def whole(row: dict) -> tuple:
        return (table_scores(row)["whole_val_auc"], row["arch_hash"])

    def add(role: str, rows: list[dict]) -> None:
        for row in rows:
            chosen.append((role, Architecture.from_json(row["arch_json"]), row))
            taken.add(row["arch_hash"])

    def rest() -> list[dict]:
        return [row for row in table["rows"] if row["arch_hash"] not in taken]

    add("top", sorted(rest(), key=whole, reverse=True)[:TOP])
    add("by-flops", spread(rest(), BY_FLOPS))
    add("by-score", evenly(rest(), BY_SCORE, whole))
    return [{"role": role, "arch": arch.short_str(), "arch_json": arch.to_json(),
             "arch_hash": arch.arch_hash(),
             "table": None if row is None else {"trial": row["trial"], **table_scores(row)}}
            for role, arch, row in chosen]


def plan_jobs(archs: list[dict], folds: int, repeats: int) -> list[dict]:
    """Every job in run order: fold 0 of every architecture, a search job for each architecture
    outside the table, folds 1.., then ``repeats`` more seeds on fold 0."""
    jobs = []
    for fold in range(folds):
        jobs += [{"arch_hash": a["arch_hash"], "kind": FOLD, "fold": fold, "seed": FOLD_SEEDS[fold]}
                 for a in archs]
        if fold == 0:
            jobs += [{"arch_hash": a["arch_hash"], "kind": SEARCH, "fold": None, "seed": 0}
                     for a in archs if a["table"] is None]
    for seed in range(1, repeats + 1):
        jobs += [{"arch_hash": a["arch_hash"], "kind": REPEAT, "fold": 0, "seed": seed} for a in archs]
    return jobs


def job_key(job: dict) -> tuple:
    return job["arch_hash"], job["kind"], job["fold"], job["seed"]


# --------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Pool:
    """Train+val of a dataset (train first, then val) and its test split, as arrays and on the CPU."""

    images: np.ndarray
    labels: np.ndarray  # (N,)
    test: Split
    task: str
    num_classes: int
    in_channels: int
    size: int
    train_count: int  # pool indices below it are train samples, the rest val


def read_pool(config: DataConfig) -> Pool:
    arrays = read_arrays(config, ensure_file(config))
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (arrays[s] for s in ("train", "val", "test"))
    return Pool(images=np.concatenate([train_x, val_x]),
                labels=np.concatenate([train_y, val_y]).reshape(-1),
                test=Split.from_arrays(test_x, test_y, task=config.task, device="cpu"),
                task=config.task, num_classes=config.num_classes, in_channels=config.in_channels,
                size=config.size, train_count=len(train_y))


def train_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(max_epochs=args.epochs, patience=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, seed=seed, keep="val_auc")


def curve_of(history: tuple[EpochRecord, ...]) -> dict[str, list]:
    names = ["epoch", "train_loss", "val_loss", "val_auc", "val_acc", "seconds"]
    if history[0].full_val_auc is not None:
        names += ["full_val_auc", "full_val_acc"]
    return {name: [getattr(record, name) for record in history] for name in names}


def trained(arch: Architecture, data: DeviceData, config: TrainConfig,
            test: Split) -> tuple[dict, np.ndarray]:
    """Train ``arch`` on ``data`` (seeded weights, as a search trial), score its kept epoch on test;
    the job's record and the kept model's val scores."""
    torch.manual_seed(config.seed)  # the initial weights, as nas3d.objective seeds them
    model = build_model(arch, data.in_channels, data.num_classes)
    result: TrainResult = train_trial(model, data, config, "cpu", on_epoch=log_epoch)
    scores, _ = predict(model, data.val, "cpu", config.batch_size, channels_last=config.channels_last)
    test_auc, test_acc, test_loss = evaluate(model, test, "cpu", config.batch_size,
                                             channels_last=config.channels_last)
    record = {"kept_epoch": result.best_epoch, "val_auc": result.val_auc, "val_acc": result.val_acc,
              "val_loss": result.val_loss, "test_auc": test_auc, "test_acc": test_acc,
              "test_loss": test_loss, "train_samples": len(data.train), "val_samples": len(data.val),
              "curve": curve_of(result.history)}
    return record, scores


def run_fold_job(arch: Architecture, pool: Pool, fold: tuple[np.ndarray, np.ndarray],
                 config: TrainConfig) -> dict:
    """Train on the fold's train part, keep by its val part, and record the kept model's val and test
    scores; ``val_index`` are the val part's indices into train+val."""
    train_index, val_index = fold

    def split(index: np.ndarray) -> Split:
        return Split.from_arrays(pool.images[index], pool.labels[index], task=pool.task, device="cpu")

    data = DeviceData(name="fold", num_classes=pool.num_classes, in_channels=pool.in_channels,
                      size=pool.size, train=split(train_index), val=split(val_index), test=None)
    record, scores = trained(arch, data, config, pool.test)
    # Binary: the positive class's probability (what AUC ranks); multi-class: every class's.
    kept = scores[:, -1] if pool.task == "binary-class" else scores
    record["val_index"] = val_index.tolist()
    record["val_scores"] = np.round(kept, 6).tolist()
    return record


def run_search_job(arch: Architecture, data_config: DataConfig, search: dict, pool: Pool,
                   config: TrainConfig) -> dict:
    """The architecture table's protocol: a share of train, kept by a share of val, the whole val
    split scored every epoch; the search scores it would have recorded."""
    search_data = replace(data_config, search_fraction=search["search_fraction"],
                          search_val_fraction=search["search_val_fraction"],
                          subset_seed=search["subset_seed"], record_full_val=True)
    data = load_splits(search_data, "cpu", for_search=True)
    record, _ = trained(arch, data, config, pool.test)
    curve = record["curve"]
    record["search"] = search_scores(curve["val_auc"], curve["val_loss"], curve["full_val_auc"])
    return record


# --------------------------------------------------------------------------------------- the table


def protocol(args: argparse.Namespace, table: dict) -> dict:
    search = {key: table["protocol"][key] for key in ("search_fraction", "search_val_fraction",
                                                         "subset_seed", "seed")}
    return {"dataset": args.dataset, "size": args.size, "pool": "train+val", "folds": args.folds,
            "split_seed": SPLIT_SEED, "fold_seeds": list(FOLD_SEEDS[:args.folds]),
            "repeat_seeds": "1..N on fold 0 (--seed-repeats N)", "epochs": args.epochs,
            "patience": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "keep": "val_auc",
            "search": search}


def load_document(path: Path, expected: dict) -> dict | None:
    return load_table(path, FORMAT, expected)


def write_document(path: Path, document: dict) -> None:
    document["complete"] = len(document["jobs"])
    document["analysis"] = analyse(document)
    write_table(path, document)


def build(args: argparse.Namespace) -> dict:
    table = json.loads(args.table.read_text())
    expected = protocol(args, table)
    document = load_document(args.out, expected)
    archs = choose_architectures(table)[:args.archs]
    data_config = DataConfig(dataset=args.dataset, size=args.size, root=str(Path(args.data_root).resolve()),
                             download=False)
    if data_config.is_manifest:
        raise ValueError(f"--dataset {args.dataset}: the truth table reads MedMNIST-format npz files "
                         "(a MedMNIST3D flag or synthetic), not a manifest")
    pool = read_pool(data_config)
    for arch in archs:
        costs = measure_costs(Architecture.from_json(arch["arch_json"]), pool.in_channels, pool.num_classes,
                              pool.size, with_thop=False)
        arch.update(flops=costs.flops, params=costs.params)
    if document is None:
        document = {"format": FORMAT, "protocol": expected, "architectures": [], "jobs": []}
    known = {a["arch_hash"] for a in document["architectures"]}
    document["architectures"] += [a for a in archs if a["arch_hash"] not in known]
    table_path = args.table.resolve()
    document.update(command="python bench/noise_table.py " + " ".join(args.argv), machine=machine(),
                    table=str(table_path.relative_to(REPO) if table_path.is_relative_to(REPO)
                              else table_path))
    document["machine"]["torch_threads"] = torch.get_num_threads()
    jobs = plan_jobs(archs, args.folds, args.seed_repeats)
    document["planned_jobs"] = len({job_key(j) for j in jobs} | {job_key(j) for j in document["jobs"]})
    done = {job_key(j) for j in document["jobs"]}
    todo = [job for job in jobs if job_key(job) not in done]
    log(f"{len(archs)} architectures, {len(jobs)} jobs planned, {len(jobs) - len(todo)} done already; "
        f"{torch.get_num_threads()} torch thread(s) -> {args.out}")
    folds = stratified_folds(pool.labels, args.folds, SPLIT_SEED)
    by_hash = {a["arch_hash"]: a for a in archs}
    for number, job in enumerate(todo, start=1):
        arch = Architecture.from_json(by_hash[job["arch_hash"]]["arch_json"])
        start = time.perf_counter()
        config = train_config(args, job["seed"])
        if job["kind"] == SEARCH:
            record = run_search_job(arch, data_config, expected["search"], pool, config)
        else:
            record = run_fold_job(arch, pool, folds[job["fold"]], config)
        record = {**job, **record, "seconds": round(time.perf_counter() - start, 2)}
        document["jobs"].append(record)
        write_document(args.out, document)
        epoch_seconds = sum(record["curve"]["seconds"]) / len(record["curve"]["seconds"])
        log(f"[{number}/{len(todo)}] {job['kind']} fold {job['fold']} seed {job['seed']} {arch.short_str()}: "
            f"val AUC {record['val_auc']:.3f} (epoch {record['kept_epoch']}), "
            f"test AUC {record['test_auc']:.3f}, {record['seconds']:.0f} s ({epoch_seconds:.1f} s an epoch)")
    return document


def log(text: str) -> None:
    print(text, flush=True)


def log_epoch(record: EpochRecord, last: bool) -> bool:
    """A line per epoch in the build's log (a job takes minutes); never stops the run."""
    log(f"  epoch {record.epoch}: train loss {record.train_loss:.4f}, val AUC {record.val_auc:.3f}, "
        f"{record.seconds:.1f} s")
    return True


# --------------------------------------------------------------------------------------- analysis


def fold_scores(document: dict) -> dict[str, dict[int, float]]:
    """``{arch_hash: {fold: kept val AUC}}`` of the fold jobs (each fold with its own seed)."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for job in document["jobs"]:
        if job["kind"] == FOLD:
            out[job["arch_hash"]][job["fold"]] = job["val_auc"]
    return dict(out)


def truth(document: dict) -> tuple[dict[str, float], int]:
    """The truth of each architecture (mean kept val AUC over folds 0..m-1) and m: the protocol's
    fold count, or on a partial table the most folds that 3 architectures (or all, when fewer have
    begun) have all done. Architectures short of m folds have no truth yet."""
    scores = fold_scores(document)
    needed = min(3, len(scores))
    for m in range(document["protocol"]["folds"], 0, -1):
        complete = {h: s for h, s in scores.items() if all(f in s for f in range(m))}
        if needed and len(complete) >= needed:
            return {h: float(np.mean([s[f] for f in range(m)])) for h, s in complete.items()}, m
    return {}, 0


def pooled_variance(groups: list[list[float]]) -> tuple[float | None, int]:
    """The pooled within-group variance (squares about each group's mean over the summed n-1) and the
    number of values it rests on; None when no group holds two values."""
    groups = [g for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    if dof == 0:
        return None, 0
    squares = sum(float(np.sum((np.asarray(g) - np.mean(g)) ** 2)) for g in groups)
    return squares / dof, sum(len(g) for g in groups)


def variance_parts(document: dict) -> dict:
    """The per-job score's variance split into architecture, fold and seed parts.

    - ``between``: variance (n-1) of the architectures' fold means; ``architecture`` removes from it
      the noise those means still carry (``within`` times the mean of 1/folds): the one-way
      random-effects estimate of the variance of the architectures' true scores.
    - ``within``: pooled variance across an architecture's folds. Fold and seed change together in
      fold jobs, so this is fold and seed noise together.
    - ``seed``: pooled variance across seeds on fold 0 (the fold job and the seed repeats).
    - ``fold``: ``within - seed``: what changing the fold adds beyond the seed (may come out
      negative by chance when it is small).
    Each part is None where the jobs done cannot separate it yet; ``*_jobs`` say how many jobs each
    figure rests on.
    """
    scores = fold_scores(document)
    groups = [list(s.values()) for s in scores.values()]
    means = [float(np.mean(g)) for g in groups]
    between = float(np.var(means, ddof=1)) if len(means) >= 2 else None
    within, within_jobs = pooled_variance(groups)
    fold0: dict[str, list[float]] = defaultdict(list)
    for job in document["jobs"]:
        if job["fold"] == 0 and job["kind"] in (FOLD, REPEAT):
            fold0[job["arch_hash"]].append(job["val_auc"])
    seed, seed_jobs = pooled_variance(list(fold0.values()))
    architecture = None
    if between is not None and within is not None:
        architecture = between - within * float(np.mean([1 / len(g) for g in groups]))
    return {"architectures": len(groups), "between": between, "between_jobs": sum(map(len, groups)),
            "architecture": architecture, "within": within, "within_jobs": within_jobs,
            "seed": seed, "seed_jobs": seed_jobs,
            "fold": within - seed if within is not None and seed is not None else None}


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho, or None on fewer than 3 pairs or a constant side."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


def search_score_of(document: dict) -> dict[str, dict]:
    """Each architecture's search scores: its table row's, else its search job's."""
    out = {a["arch_hash"]: a["table"] for a in document["architectures"] if a["table"] is not None}
    for job in document["jobs"]:
        if job["kind"] == SEARCH:
            out.setdefault(job["arch_hash"], job["search"])
    return out


def correlations(document: dict) -> dict:
    """Spearman correlation with the truth of each cheaper score, with the number of architectures
    each rests on. The one-fold and two-fold scores are folds of the truth itself (optimistic by
    construction); "fold 0 vs the other folds" is the held-out version."""
    true, m = truth(document)
    search = search_score_of(document)
    folds = fold_scores(document)
    flops = {a["arch_hash"]: a.get("flops") for a in document["architectures"]}
    def of(key: str) -> dict[str, float]:
        return {h: s[key] for h, s in search.items()}

    candidates = {
        "quarter-val score (the seed protocol's search)": of("quarter_val_auc"),
        "whole-val at the kept epoch": of("whole_val_auc"),
        "whole-val best epoch (the CPU profile's score)": of("whole_val_best"),
        "FLOPs (not negated: > 0 means dearer scores higher)": {h: f for h, f in flops.items() if f},
    }
    if m >= 2:
        fold0 = {h: s[0] for h, s in folds.items() if 0 in s}
        candidates["one fold (fold 0)"] = fold0
        candidates["fold 0 vs the other folds' mean (held out)"] = fold0
    if m >= 3:
        candidates["two folds (mean of folds 0, 1)"] = {h: (s[0] + s[1]) / 2 for h, s in folds.items()
                                                        if 0 in s and 1 in s}
    out = {}
    for name, values in candidates.items():
        common = sorted(set(values) & set(true))
        target = true
        if name.startswith("fold 0 vs"):
            target = {h: float(np.mean([folds[h][f] for f in range(1, m)])) for h in common}
        out[name] = {"rho": spearman([values[h] for h in common], [target[h] for h in common]),
                     "architectures": len(common)}
    return {"truth_folds": m, "rows": out}


def search_pick(document: dict, score: str = "whole_val_best") -> dict | None:
    """Which architecture the search's score ranks first among those with a truth, and whether its
    truth beats the seed study's published architecture's; None until both are known."""
    true, m = truth(document)
    search = search_score_of(document)
    seed = next((a["arch_hash"] for a in document["architectures"] if a["role"] == "seed"), None)
    common = [h for h in true if h in search]
    if seed not in true or not common:
        return None
    names = {a["arch_hash"]: a["arch"] for a in document["architectures"]}
    picked = max(common, key=lambda h: (search[h][score], h))
    ranked = sorted(true, key=lambda h: -true[h])
    return {"score": score, "picked": names[picked], "picked_score": search[picked][score],
            "picked_truth": true[picked], "picked_truth_rank": ranked.index(picked) + 1,
            "seed_truth": true[seed], "beats_seed": true[picked] > true[seed],
            "picked_is_seed": picked == seed,
            "best": names[ranked[0]], "best_truth": true[ranked[0]], "architectures": len(common),
            "truth_folds": m}


#: The strategies a replay compares, in the order they are reported. "search score" is today's search:
#: one training on the search's share of train per architecture, ranked by its recorded score.
STRATEGIES = ("search score", "single split", "k-fold", "k-fold + race")
#: The search score a replay ranks "search score" by: the CPU profile's (the whole val split, best epoch).
SEARCH_SCORE = "whole_val_best"


def replay_pool(document: dict) -> tuple[dict[str, dict], int]:
    """The architectures a replay draws from: those with all ``m`` truth folds, each with its fold val
    AUCs (in fold order), FLOPs, val truth and test truth (the mean test AUC of its fold models, which
    nothing in a replay chooses by)."""
    true, m = truth(document)
    folds = fold_scores(document)
    tests: dict[str, dict[int, float]] = defaultdict(dict)
    for job in document["jobs"]:
        if job["kind"] == FOLD:
            tests[job["arch_hash"]][job["fold"]] = job["test_auc"]
    flops = {a["arch_hash"]: a.get("flops") for a in document["architectures"]}
    search = search_score_of(document)
    pool = {h: {"folds": [folds[h][f] for f in range(m)], "flops": float(flops[h]), "val_truth": true[h],
                "test_truth": float(np.mean([tests[h][f] for f in range(m)])),
                "search": search.get(h, {}).get(SEARCH_SCORE)}
            for h in true if flops.get(h)}
    return pool, m


def search_cost(document: dict) -> float | None:
    """What one search training costs in fold trainings: its training volumes over a fold's (the same
    epochs, so the same share of the work per epoch); None until a search job and a fold job are done."""
    samples = {kind: next((j.get("train_samples") for j in document["jobs"] if j["kind"] == kind), None)
               for kind in (SEARCH, FOLD)}
    return samples[SEARCH] / samples[FOLD] if samples[SEARCH] and samples[FOLD] else None


def _front(scored: dict[str, tuple[float, float]]) -> list[str]:
    """The members of ``{hash: (score, flops)}`` that no other has a higher score at no more FLOPs."""
    return [h for h, (s, f) in scored.items()
            if not any(s2 >= s and f2 <= f and (s2, f2) != (s, f) for s2, f2 in scored.values())]


def replay_once(pool: dict[str, dict], order: list[str], fold_orders: dict[str, list[int]], budget: int,
                strategy: str, prior_sd: float, search_cost: float = 1.0) -> dict[str, tuple[float, float]]:
    """The architectures one strategy has fully scored, ``{hash: (score, flops)}``, when it spends
    ``budget`` fold trainings on the proposals ``order`` (the same proposals for every strategy).

    - search score: one search training each (``search_cost`` fold trainings), scored by the
      architecture's recorded search score (``pool[h]["search"]``), so ``budget / search_cost`` of them;
    - single split: one fold each (the first of the architecture's ``fold_orders``), so ``budget``
      architectures;
    - k-fold: all k folds each, the mean, so ``budget // k`` architectures;
    - k-fold + race: folds in turn; after each fold but the last, the race of ``nas3d.racing`` (its
      optimistic bound, mean + 2 SE with ``prior_sd`` as the SD's floor) stops an architecture that
      a fully scored one beats at no more FLOPs. A stopped or unfinished one is never chosen."""
    from nas3d.racing import optimistic_bound

    k = len(next(iter(pool.values()))["folds"])
    scored: dict[str, tuple[float, float]] = {}
    spent = 0
    for h in order:
        arch, folds = pool[h], fold_orders[h]
        if strategy == "search score":
            if spent + search_cost > budget + 1e-9:
                break
            spent += search_cost
            scored[h] = (arch["search"], arch["flops"])
            continue
        if strategy == "single split":
            if spent + 1 > budget:
                break
            spent += 1
            scored[h] = (arch["folds"][folds[0]], arch["flops"])
            continue
        if strategy == "k-fold" and spent + k > budget:
            break
        values: list[float] = []
        for f in folds:
            if spent >= budget:
                break
            spent += 1
            values.append(arch["folds"][f])
            if strategy == "k-fold + race" and len(values) < k:
                bound = optimistic_bound(values, prior_sd)
                if any(s > bound and fl <= arch["flops"] for s, fl in scored.values()):
                    break
        if len(values) == k:
            scored[h] = (float(np.mean(values)), arch["flops"])
        if spent >= budget:
            break
    return scored


def replays(document: dict, budgets: tuple[int, ...] = (3, 6, 12, 18), draws: int = 2000, seed: int = 0,
            prior_sd: float | None = None) -> dict | None:
    """Each strategy of :data:`STRATEGIES` replayed on the truth table at equal training cost ("search
    score" only once every architecture of the pool has a search score and the search's cost is known).

    A draw proposes the pool's architectures in a random order (random search: the table cannot
    replay a sampler) and gives each a random fold order; every strategy spends the same ``budget``
    fold trainings on the same proposals. Per strategy and budget, over ``draws`` draws: the mean val
    truth and test truth of the architecture it would choose (its best score), how often that is the
    pool's best by val truth, and the hypervolume (``nas3d.pareto``, the 28³ box) of its front, with
    each member placed at its truth, as a share of the truth front's. The single split's score is one
    fold of the truth itself, and k-fold's is the truth: val truth flatters them, so test truth is
    reported beside it. None when fewer than 2 folds or 4 architectures have a truth."""
    from nas3d.pareto import hypervolume, hypervolume_box
    from nas3d.racing import RacingConfig

    pool, m = replay_pool(document)
    if m < 2 or len(pool) < 4:
        return None
    prior_sd = RacingConfig().prior_sd if prior_sd is None else prior_sd
    box = hypervolume_box(document["protocol"].get("size", 28))
    truth_points = {h: (a["val_truth"], a["flops"]) for h, a in pool.items()}
    full = hypervolume([truth_points[h] for h in _front(truth_points)], box)
    best = max(pool, key=lambda h: pool[h]["val_truth"])
    cost = search_cost(document)
    strategies = [s for s in STRATEGIES if s != "search score"
                  or (cost and all(a["search"] is not None for a in pool.values()))]
    rng = np.random.default_rng(seed)
    hashes = sorted(pool)
    sums = {(b, s): np.zeros(4) for b in budgets for s in strategies}
    for _ in range(draws):
        order = [hashes[i] for i in rng.permutation(len(hashes))]
        fold_orders = {h: [int(f) for f in rng.permutation(m)] for h in hashes}
        for b in budgets:
            for s in strategies:
                scored = replay_once(pool, order, fold_orders, b, s, prior_sd, cost or 1.0)
                if not scored:
                    continue
                pick = max(scored, key=lambda h: (scored[h][0], -scored[h][1], h))
                hv = hypervolume([truth_points[h] for h in _front(scored)], box)
                sums[b, s] += (pool[pick]["val_truth"], pool[pick]["test_truth"], pick == best,
                               hv / full if full > 0 else 0.0)
    return {"architectures": len(pool), "truth_folds": m, "draws": draws, "prior_sd": prior_sd,
            "best_val_truth": pool[best]["val_truth"], "search_cost": cost, "search_score": SEARCH_SCORE,
            "rows": [{"budget": b, "strategy": s, "val_truth": v / draws, "test_truth": t / draws,
                      "best_share": p / draws, "hypervolume_share": hv / draws}
                     for b in budgets for s in strategies for v, t, p, hv in [sums[b, s]]]}


def analyse(document: dict) -> dict:
    return {"jobs": len(document["jobs"]), "variance": variance_parts(document),
            "correlations": correlations(document),
            "pick": {score: search_pick(document, score) for score in ("whole_val_best", "quarter_val_auc")},
            "replays": replays(document)}


def fmt(value: float | None, digits: int = 3) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "n/a" if missing else f"{value:.{digits}f}"


def truth_text(value: float | None, scores: dict[int, float], folds: int) -> str:
    """The truth with the standard error of its ``folds`` fold scores (their SD over sqrt(folds))."""
    if value is None:
        return "n/a"
    if folds < 2:
        return fmt(value)
    sd = float(np.std([scores[f] for f in range(folds)], ddof=1))
    return f"{value:.3f} ± {sd / math.sqrt(folds):.3f}"


def report(document: dict, analysis: dict | None = None) -> str:
    """The analysis of what is done (``analyse(document)`` unless given), as text."""
    analysis = analyse(document) if analysis is None else analysis
    true, m = truth(document)
    folds, search = fold_scores(document), search_score_of(document)
    tests: dict[str, list[float]] = defaultdict(list)
    for job in document["jobs"]:
        if job["kind"] == FOLD:
            tests[job["arch_hash"]].append(job["test_auc"])
    k = document["protocol"]["folds"]
    lines = [f"{document['complete']} of {document.get('planned_jobs', '?')} jobs done; the truth is the "
             f"mean kept val AUC over {m} of {k} folds"]
    rows = []
    for a in sorted(document["architectures"], key=lambda a: -true.get(a["arch_hash"], -1)):
        h, s = a["arch_hash"], search.get(a["arch_hash"], {})
        per_fold = " ".join(fmt(folds.get(h, {}).get(f)) for f in range(k))
        rows.append([a["arch"][:60], a["role"], f"{a.get('flops', 0) / 1e6:.0f}",
                     fmt(s.get("quarter_val_auc")), fmt(s.get("whole_val_auc")),
                     fmt(s.get("whole_val_best")), per_fold, truth_text(true.get(h), folds.get(h, {}), m),
                     fmt(float(np.mean(tests[h])) if tests[h] else None)])
    lines.append(format_table(["architecture", "role", "MFLOPs", "quarter", "whole@kept", "whole best",
                               "folds", "truth ± se", "test"], rows))
    v = analysis["variance"]
    lines.append("")
    lines.append(f"variance of the per-job score over {v['architectures']} architectures:")
    lines.append(f"  between the architectures' means  {fmt(v['between'], 5)}  "
                 f"({v['between_jobs']} fold jobs)")
    lines.append(f"  architecture (means less noise)   {fmt(v['architecture'], 5)}")
    lines.append(f"  within an architecture, fold+seed {fmt(v['within'], 5)}  ({v['within_jobs']} jobs)"
                 + ("" if v["within"] is not None else ": needs 2 folds of one architecture"))
    lines.append(f"  seed, on fold 0                   {fmt(v['seed'], 5)}  ({v['seed_jobs']} jobs)"
                 + ("" if v["seed"] is not None else ": needs the seed repeats (--seed-repeats)"))
    lines.append(f"  fold (within less seed)           {fmt(v['fold'], 5)}"
                 + ("" if v["fold"] is not None else ": cannot be separated yet"))
    c = analysis["correlations"]
    lines.append("")
    lines.append(f"Spearman with the truth ({c['truth_folds']} folds):")
    for name, row in c["rows"].items():
        lines.append(f"  {name:55s} {fmt(row['rho'], 2):>6}  ({row['architectures']} architectures)")
    if c["truth_folds"] < 3:
        lines.append("  (one fold needs a truth of 2 folds or more to mean anything, two folds 3 or more)")
    for score, pick in analysis["pick"].items():
        lines.append("")
        if pick is None:
            lines.append(f"search pick by {score}: not known yet (needs the seed architecture's truth)")
            continue
        verdict = "beats" if pick["beats_seed"] else "does not beat"
        against = (" (the seed's own architecture)" if pick["picked_is_seed"]
                   else f", which {verdict} the seed's {pick['seed_truth']:.3f}")
        lines.append(f"search pick by {score} among {pick['architectures']}: {pick['picked']} "
                     f"(score {pick['picked_score']:.3f}); its truth {pick['picked_truth']:.3f} "
                     f"(rank {pick['picked_truth_rank']}){against}; "
                     f"the best truth is {pick['best_truth']:.3f}")
    lines.append("")
    r = analysis["replays"]
    if r is None:
        lines.append("replays: not yet (need 2 folds of at least 4 architectures)")
        return "\n".join(lines)
    lines.append(f"replays at equal training cost ({r['draws']} random proposal orders over "
                 f"{r['architectures']} architectures, {r['truth_folds']} folds, race prior SD "
                 f"{r['prior_sd']}; the pool's best val truth {r['best_val_truth']:.3f}"
                 + (f"; a search training costs {r['search_cost']:.2f} fold trainings, ranked by "
                    f"{r['search_score']}" if r.get("search_cost") else "") + "):")
    lines.append(format_table(
        ["fold trainings", "strategy", "pick: val truth", "pick: test truth", "pick is the best",
         "front HV / truth's"],
        [[str(row["budget"]), row["strategy"], f"{row['val_truth']:.4f}", f"{row['test_truth']:.4f}",
          f"{row['best_share']:.0%}", f"{row['hypervolume_share']:.3f}"] for row in r["rows"]]))
    return "\n".join(lines)


def plot(document: dict, path: Path, replayed: dict | None = None) -> None:
    """Two panels: each architecture's truth (± the fold SE) against the search's score and against one
    fold held out; and the replays' pick (its mean test truth) against the training spent (``replayed``:
    ``replays(document)``, drawn again unless given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    true, m = truth(document)
    folds, search = fold_scores(document), search_score_of(document)
    roles = {a["arch_hash"]: a["role"] for a in document["architectures"]}
    hashes = [h for h in true if h in search]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    se = [float(np.std(list(folds[h].values()), ddof=1) / math.sqrt(m)) if m > 1 else 0.0 for h in hashes]
    panels = ((lambda h: search[h][SEARCH_SCORE], "o", "search score (whole val, best epoch)"),
              (lambda h: folds[h][0], "s", "one fold (fold 0, of the truth)"))
    for x_of, marker, label in panels:
        xs = [x_of(h) for h in hashes]
        rho = spearman(xs, [true[h] for h in hashes])
        left.errorbar(xs, [true[h] for h in hashes], yerr=se, fmt=marker, alpha=0.75, capsize=2,
                      label=f"{label}: Spearman {fmt(rho, 2)}")
    for h in hashes:
        if roles[h] in ("seed", "cpu-best"):
            left.annotate(roles[h], (search[h][SEARCH_SCORE], true[h]), fontsize=7, xytext=(4, -10),
                          textcoords="offset points")
    left.set_xlabel("cheaper score")
    left.set_ylabel(f"truth: mean val AUC over {m} folds (± SE)")
    left.set_title(f"{len(hashes)} architectures")
    left.legend(fontsize=7, loc="lower right")
    r = replays(document) if replayed is None else replayed
    if r is not None:
        for strategy in dict.fromkeys(row["strategy"] for row in r["rows"]):
            rows = [row for row in r["rows"] if row["strategy"] == strategy]
            race = strategy.endswith("race")  # dashed: where it never stops a trial it hides k-fold's line
            right.plot([row["budget"] for row in rows], [row["test_truth"] for row in rows],
                       marker="x" if race else "o", ls="--" if race else "-", label=strategy)
        best_test = max(a["test_truth"] for a in replay_pool(document)[0].values())
        right.axhline(best_test, color="grey", ls=":", label="the pool's best test truth")
        right.set_xlabel("fold trainings spent")
        right.set_ylabel("test AUC of the chosen architecture (mean of its folds' models)")
        right.set_title(f"replays: mean over {r['draws']} proposal orders")
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="folder holding the dataset's npz (required to build)")
    parser.add_argument("--dataset", default="adrenalmnist3d")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE,
                        help="the architecture table to choose from")
    parser.add_argument("--archs", type=int, default=TOP + BY_FLOPS + BY_SCORE + 2,
                        help="the first N architectures of the list (default all 12)")
    parser.add_argument("--folds", type=int, default=len(FOLD_SEEDS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed-repeats", type=int, default=1, help="more seeds on fold 0 per architecture")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path,
                        help="the JSON (default bench/data/noise_table_DATASET_SIZE.json)")
    parser.add_argument("--report", action="store_true", help="print the analysis of --out and exit")
    parser.add_argument("--png", type=Path, help="with --report: draw the truth and the replays here too")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.out = args.out or REPO / "bench" / "data" / f"noise_table_{args.dataset}_{args.size}.json"
    try:
        if args.report:
            if not args.out.exists():
                raise ValueError(f"{args.out} does not exist: build it first (without --report)")
            document = json.loads(args.out.read_text())
            analysis = analyse(document)
            log(report(document, analysis))
            if args.png:
                plot(document, args.png, analysis["replays"])
                log(f"wrote {args.png}")
            return 0
        if not args.data_root:
            raise ValueError("--data-root is required to build (the folder holding the dataset's npz)")
        if not 2 <= args.folds <= len(FOLD_SEEDS):
            raise ValueError(f"--folds must be in [2, {len(FOLD_SEEDS)}] (one training seed each: "
                             f"{FOLD_SEEDS}), but got {args.folds}")
        for name in ("archs", "epochs", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}")
        if args.seed_repeats < 0:
            raise ValueError(f"--seed-repeats must be >= 0, but got {args.seed_repeats}")
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
