"""Replays on the architecture table: proxy correlations, and search strategies at equal training epochs.

Reads the JSON ``bench/arch_table.py`` writes. Nothing trains here: every strategy is replayed on the
table's recorded curves, so each runs in milliseconds and can be repeated over many proposal orders.

Ground truth: an architecture's **true score** is its AUC on the *whole* validation split at the epoch
the search would keep after all the table's epochs (best search-quarter AUC, ties to the lower loss).
The **true front** is the Pareto front of (true score, FLOPs) over the whole table.

Correlations: Spearman and Kendall of each zero-cost proxy with the true score, beside FLOPs alone and
params alone (a proxy no better than counting parameters is reported as such), and beside the score the
search itself ranks by after all epochs (the search quarter's AUC): how well a 25-volume share of val
stands for the whole split.

Fidelity: the rank correlation, with the full-fidelity score, of what a search would record after
fewer epochs, scored on the search quarter or on the whole val split (``data.search_val_fraction``).

Strategies, each over ``--orders`` random proposal orders (the table's architectures stand for a
sampler's proposals; the order is the only randomness), with the epochs each spends:

    full          train every proposal for all epochs
    moasha        MO-ASHA (nas3d.early_stopping.decide) at rungs min_epochs·η^k, on the search-quarter
                  AUC so far and FLOPs, as a live study decides
    screen        of every k proposals, train only the one the proxy ranks best for its FLOPs (the
                  largest residual of the proxy over its least-squares line on log10 FLOPs, fitted on
                  the proposals seen so far); the others cost nothing. ``screen random`` keeps one of
                  every k at random: the baseline a proxy must beat
    low           train each proposal for fewer epochs (the kept epoch among those)
    combinations  screening with MO-ASHA or with fewer epochs

For each, the hypervolume (docs/metrics.md#hypervolume) of the front it keeps is taken with the whole-val
AUC of what it trained (at the epochs it trained), against the epochs spent; beside it, what training
everything in the same order had reached after the same epochs (the comparison at equal epochs); and
how many true-front members its own final front (by the search-quarter scores it saw) contains, and
the hypervolume of that front at its members' true scores ("retrained front": what a user holds after
retraining what the search found; it judges a cheap fidelity by its choices, not by its short runs).

    python bench/replay_table.py bench/data/arch_table_adrenalmnist3d_28.json --png docs/replays.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import _common  # noqa: F401  (puts this checkout first on sys.path)
import numpy as np
from _common import format_table
from scipy import stats

from nas3d.early_stopping import RungEntry, decide, rung_epochs
from nas3d.pareto import hypervolume, hypervolume_box

PROXY_NAMES = ("naswot", "synflow", "grad_norm", "zico")
RANDOM = "random"  # screening's baseline: one of every k proposals, chosen by no score at all


@dataclass(frozen=True)
class Row:
    """One architecture of the table, as the replays read it."""

    index: int
    flops: int
    params: int
    proxies: dict[str, float | None]
    val_auc: tuple[float, ...]  # search quarter, per epoch
    val_loss: tuple[float, ...]
    full_val_auc: tuple[float, ...]  # whole val split, per epoch
    arch_hash: str = ""

    @property
    def epochs(self) -> int:
        return len(self.val_auc)

    def kept(self, epochs: int) -> int:
        """0-based epoch the search keeps after ``epochs`` epochs: best quarter AUC, then lower loss."""
        return max(range(min(epochs, self.epochs)), key=lambda e: (self.val_auc[e], -self.val_loss[e]))

    def seen(self, epochs: int) -> float:
        """The search-quarter AUC the study records after ``epochs`` epochs."""
        return self.val_auc[self.kept(epochs)]

    def whole(self, epochs: int | None = None) -> float:
        """Best whole-val AUC after ``epochs`` (default: all) epochs: what a search scored on the whole
        val split (``data.search_val_fraction = 1``) records."""
        return max(self.full_val_auc[:self.epochs if epochs is None else epochs])

    def true(self, epochs: int | None = None) -> float:
        """Whole-val AUC at the kept epoch after ``epochs`` (default: all) epochs."""
        return self.full_val_auc[self.kept(self.epochs if epochs is None else epochs)]


def load_rows(table: dict) -> list[Row]:
    rows = []
    for i, r in enumerate(table["rows"]):
        c = r["curve"]
        rows.append(Row(i, int(r["flops"]), int(r["params"]), dict(r.get("proxies") or {}),
                        tuple(c["val_auc"]), tuple(c["val_loss"]), tuple(c["full_val_auc"]),
                        r.get("arch_hash", "")))
    epochs = {r.epochs for r in rows}
    if len(epochs) != 1:
        raise ValueError(f"every row must have the same number of epochs, but got {sorted(epochs)}")
    return rows


def pareto_members(points: Sequence[tuple[int, float, float]]) -> set[int]:
    """Indices of the non-dominated ``(index, auc, flops)`` points (AUC up, FLOPs down)."""
    front = set()
    for i, auc, flops in points:
        if not any((a >= auc and f <= flops) and (a > auc or f < flops) for _, a, f in points):
            front.add(i)
    return front


def correlations(rows: Sequence[Row]) -> list[tuple[str, float, float, int]]:
    """``(name, spearman, kendall, n)`` of each proxy with the true score, then of FLOPs and params."""
    truth = np.array([r.true() for r in rows])
    out = []
    columns: dict[str, list[float | None]] = {n: [r.proxies.get(n) for r in rows] for n in PROXY_NAMES}
    columns["flops (baseline)"] = [float(r.flops) for r in rows]
    columns["params (baseline)"] = [float(r.params) for r in rows]
    columns["search-quarter AUC (what a search ranks by)"] = [r.seen(r.epochs) for r in rows]
    for name, values in columns.items():
        keep = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        if len(keep) < 3:
            out.append((name, math.nan, math.nan, len(keep)))
            continue
        x, y = np.array([values[i] for i in keep]), truth[keep]
        out.append((name, float(stats.spearmanr(x, y).statistic), float(stats.kendalltau(x, y).statistic),
                    len(keep)))
    return out


def fidelity_correlations(rows: Sequence[Row]) -> list[tuple[int, float, float]]:
    """``(epochs, by quarter, by whole val)`` for every epoch count: the Spearman correlation with the
    full-fidelity score of what a search would record after that many epochs, scored on the search
    quarter (its AUC at the kept epoch, against the true score) or on the whole val split (its best
    AUC so far, against its best over all epochs). How far a cheaper fidelity keeps the ranking."""
    whole_final = [r.whole() for r in rows]
    truth = [r.true() for r in rows]
    out = []
    for e in range(1, rows[0].epochs + 1):
        quarter = [r.seen(e) for r in rows]
        whole = [r.whole(e) for r in rows]
        out.append((e, float(stats.spearmanr(quarter, truth).statistic),
                    float(stats.spearmanr(whole, whole_final).statistic)))
    return out


def train_fraction(rows: Sequence[Row], low: Sequence[Row], fraction: float, base_fraction: float,
                   box) -> list[tuple[str, float, float, float, float, float]]:
    """A smaller train share as a fidelity, on the architectures both tables hold (``low`` trained on
    ``fraction`` of train, ``rows`` on ``base_fraction``; the same val quarter). For each of (the base
    table, the low table) at several epoch counts: ``(label, cost, spearman, retrained front, share,
    whole-val spearman)``: the cost in base-table epochs, the Spearman correlation of the search's score
    with the true score, the hypervolume of the front it picks at its members' true scores, also as a
    share of the base table's own pick, and the Spearman correlation of its best whole-val AUC with the
    base table's best over all epochs (a search scored on the whole split). Every architecture is
    trained, so there is no order to average over."""
    by_hash = {r.arch_hash: r for r in rows}
    pairs = [(by_hash[r.arch_hash], r) for r in low if r.arch_hash in by_hash]
    if len(pairs) < 3:
        raise ValueError(f"the tables share {len(pairs)} architectures; the train-fraction replay needs 3")
    base = [b for b, _ in pairs]
    truth = [b.true() for b in base]
    whole_final = [b.whole() for b in base]

    def pick(scored: Sequence[tuple[Row, float]]) -> float:
        chosen = pareto_members([(b.index, score, b.flops) for b, score in scored])
        return hypervolume([(b.true(), b.flops) for b in base if b.index in chosen], box)

    epochs = base[0].epochs
    out, reference = [], None
    for label, table, scale in (("base", base, 1.0),
                                (f"train x{fraction / base_fraction:g}", [r for _, r in pairs],
                                 fraction / base_fraction)):
        for e in sorted({epochs, max(1, epochs // 2)}, reverse=True):
            scores = [r.seen(e) for r in table]
            hv = pick(list(zip(base, scores, strict=True)))
            reference = hv if reference is None else reference
            rho = float(stats.spearmanr(scores, truth).statistic)
            whole = float(stats.spearmanr([r.whole(e) for r in table], whole_final).statistic)
            out.append((f"{label}, {e} epochs", len(pairs) * e * scale, rho, hv,
                        hv / reference if reference else math.nan, whole))
    return out


@dataclass
class Trace:
    """What a strategy trained, in the order it spent epochs: ``(epochs so far, row, epochs trained)``
    for each architecture it evaluated to its end (fully or at its fidelity)."""

    steps: list[tuple[int, Row, int]]
    spent: int


Strategy = Callable[[Sequence[Row]], Trace]


def full(order: Sequence[Row], epochs: int | None = None) -> Trace:
    spent, steps = 0, []
    for row in order:
        e = epochs or row.epochs
        spent += e
        steps.append((spent, row, e))
    return Trace(steps, spent)


def moasha(order: Sequence[Row], eta: int, min_epochs: int) -> Trace:
    """MO-ASHA as a sequential study runs it: each proposal, at each rung, against the earlier ones."""
    total = order[0].epochs
    rungs = rung_epochs(min_epochs, eta, total)
    reached: dict[int, list[RungEntry]] = {r: [] for r in rungs}
    spent, steps = 0, []
    for row in order:
        stop = None
        for r in rungs:
            mine = RungEntry(row.index, max(row.val_auc[:r]), float(row.flops))
            proceed = decide(mine, reached[r], eta)[0]
            reached[r].append(mine)
            if not proceed:
                stop = r
                break
        spent += stop or total
        if stop is None:
            steps.append((spent, row, total))
    return Trace(steps, spent)


def screen(order: Sequence[Row], proxy: str, k: int, then: Callable[[Sequence[Row]], Trace] = full) -> Trace:
    """Of every ``k`` proposals, the one with the largest proxy residual on log10 FLOPs goes to ``then``;
    ``proxy="random"`` keeps the first of each group (the order is random already)."""
    chosen, seen_x, seen_y = [], [], []
    for start in range(0, len(order), k):
        group = order[start:start + k]
        if proxy == RANDOM:
            chosen.append(group[0])
            continue
        for row in group:
            value = row.proxies.get(proxy)
            if value is not None and math.isfinite(value):
                seen_x.append(math.log10(row.flops))
                seen_y.append(value)
        slope, intercept = np.polyfit(seen_x, seen_y, 1) if len(set(seen_x)) > 1 else (0.0, 0.0)

        def residual(row: Row, slope: float = slope, intercept: float = intercept) -> float:
            value = row.proxies.get(proxy)
            if value is None or not math.isfinite(value):
                return -math.inf
            return value - (slope * math.log10(row.flops) + intercept)

        chosen.append(max(group, key=residual))
    return then(chosen)


def curve(trace: Trace, box, grid: np.ndarray) -> np.ndarray:
    """Hypervolume (whole-val AUC of what was trained) after each epoch budget in ``grid``."""
    out = np.zeros(len(grid))
    points: list[tuple[float, float]] = []
    j, value = 0, 0.0
    for g, budget in enumerate(grid):
        added = False
        while j < len(trace.steps) and trace.steps[j][0] <= budget:
            _, row, e = trace.steps[j]
            points.append((row.true(e), row.flops))
            j, added = j + 1, True
        if added:  # the front changes only when an architecture finishes
            value = hypervolume(points, box)
        out[g] = value
    return out


def retrained_front_hypervolume(trace: Trace, box) -> float:
    """Hypervolume of the strategy's own final front (chosen by the search-quarter scores it saw) at the
    architectures' true scores: the front a user ends with after retraining what the search found, as
    ``nas3d retrain`` does. A cheap fidelity is judged here by the choices it makes, not by how far its
    own short runs got."""
    seen = [(row.index, row.seen(e), row.flops) for _, row, e in trace.steps]
    chosen = pareto_members(seen)
    rows = {row.index: row for _, row, _ in trace.steps}
    return hypervolume([(rows[i].true(), rows[i].flops) for i in chosen], box)


def true_front_recall(trace: Trace, true_front: set[int]) -> float:
    """Share of the true front in the strategy's own final front (by the quarter scores it saw)."""
    seen = [(row.index, row.seen(e), row.flops) for _, row, e in trace.steps]
    return len(pareto_members(seen) & true_front) / len(true_front) if true_front else math.nan


def strategies(epochs: int) -> dict[str, Strategy]:
    """The replayed strategies by label (fidelities scaled to the table's epochs)."""
    out: dict[str, Strategy] = {"full": full}
    for eta, m in ((2, 1), (2, 2), (3, 1), (3, 2), (3, 4)):
        if rung_epochs(m, eta, epochs):
            out[f"moasha eta={eta} min={m}"] = lambda o, eta=eta, m=m: moasha(o, eta, m)
    for e in sorted({max(1, epochs // 4), max(1, epochs // 3), max(1, epochs // 2)}):
        out[f"low {e} epochs"] = lambda o, e=e: full(o, e)
    for proxy in (RANDOM, *PROXY_NAMES):
        for k in (2, 4):
            out[f"screen {proxy} k={k}"] = lambda o, p=proxy, k=k: screen(o, p, k)
    for proxy in PROXY_NAMES:
        if rung_epochs(2, 3, epochs):
            out[f"screen {proxy} k=2 + moasha eta=3 min=2"] = (
                lambda o, p=proxy: screen(o, p, 2, lambda c: moasha(c, 3, 2)))
        out[f"screen {proxy} k=2 + low {max(1, epochs // 2)} epochs"] = (
            lambda o, p=proxy: screen(o, p, 2, lambda c: full(c, max(1, epochs // 2))))
    return out


def replay(rows: Sequence[Row], orders: int, seed: int) -> dict:
    """Every strategy over ``orders`` proposal orders: hypervolume-vs-epochs curves and end figures."""
    epochs = rows[0].epochs
    box = hypervolume_box(28, 1, 2)
    truth = pareto_members([(r.index, r.true(), r.flops) for r in rows])
    full_hv = hypervolume([(r.true(), r.flops) for r in rows], box)
    grid = np.linspace(0, len(rows) * epochs, 49)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(len(rows)) for _ in range(orders)]
    results = {}
    everything = [full([rows[i] for i in perm]) for perm in perms]
    for label, strategy in strategies(epochs).items():
        curves, spent, hvs, recalls, trained, same_epochs, retrained = [], [], [], [], [], [], []
        for perm, baseline in zip(perms, everything, strict=True):
            trace = strategy([rows[i] for i in perm])
            curves.append(curve(trace, box, grid))
            spent.append(trace.spent)
            hvs.append(curve(trace, box, np.array([trace.spent]))[0])
            same_epochs.append(curve(baseline, box, np.array([trace.spent]))[0])
            recalls.append(true_front_recall(trace, truth))
            retrained.append(retrained_front_hypervolume(trace, box))
            trained.append(len(trace.steps))
        results[label] = {
            "epochs_mean": float(np.mean(spent)), "saving": len(rows) * epochs / float(np.mean(spent)),
            "hv_mean": float(np.mean(hvs)), "hv_std": float(np.std(hvs)),
            "hv_share": float(np.mean(hvs)) / full_hv if full_hv > 0 else math.nan,
            # What training everything in the same orders had reached after the same epochs.
            "hv_full_same_epochs": float(np.mean(same_epochs)),
            "hv_retrained_front": float(np.mean(retrained)),
            "hv_retrained_front_std": float(np.std(retrained)),
            "true_front_recall": float(np.mean(recalls)), "fully_trained": float(np.mean(trained)),
            "curve_mean": np.mean(curves, axis=0).tolist(), "curve_std": np.std(curves, axis=0).tolist(),
        }
    return {"architectures": len(rows), "epochs": epochs, "orders": orders, "full_hypervolume": full_hv,
            "true_front": sorted(truth), "grid": grid.tolist(), "strategies": results}


def plot(result: dict, path: Path, labels: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array(result["grid"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for label in labels:
        s = result["strategies"][label]
        mean, std = np.array(s["curve_mean"]), np.array(s["curve_std"])
        ax.plot(grid, mean, label=f"{label} ({s['saving']:.1f}x fewer epochs)")
        ax.fill_between(grid, mean - std, mean + std, alpha=0.15)
    ax.axhline(result["full_hypervolume"], color="grey", ls=":", label="whole table")
    ax.set_xlabel("training epochs spent")
    ax.set_ylabel("hypervolume (whole-val AUC, log10 FLOPs)")
    ax.set_title(f"Replays on {result['architectures']} architectures x {result['epochs']} epochs, "
                 f"mean ± std over {result['orders']} orders")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path)
    parser.add_argument("--orders", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--fraction-table", type=Path,
                        help="a table of the same architectures at another train fraction (arch_table.py "
                             "--search-fraction): replays that fidelity against this table")
    args = parser.parse_args(argv)
    table = json.loads(args.table.read_text())
    rows = load_rows(table)
    print(f"{len(rows)} architectures x {rows[0].epochs} epochs ({table.get('machine', {}).get('cpu', '?')})")
    print("\nproxy correlation with the true score (whole-val AUC at the kept epoch):")
    print(format_table(("score", "spearman", "kendall", "n"),
                       [(n, f"{s:+.3f}", f"{k:+.3f}", c) for n, s, k, c in correlations(rows)]))
    print("\nfewer epochs: Spearman with the full-fidelity score of what a search records after e epochs:")
    print(format_table(("epochs", "scored on the search quarter", "scored on the whole val split"),
                       [(e, f"{q:+.2f}", f"{w:+.2f}") for e, q, w in fidelity_correlations(rows)]))
    if args.fraction_table:
        low_table = json.loads(args.fraction_table.read_text())
        base_fraction = table["protocol"]["search_fraction"]
        fraction = low_table["protocol"]["search_fraction"]
        print(f"\ntrain fraction {fraction:g} against {base_fraction:g}, on the architectures both tables "
              "hold (cost in epochs of this table; every architecture trained):")
        found = train_fraction(rows, load_rows(low_table), fraction, base_fraction, hypervolume_box(28, 1, 2))
        print(format_table(("search", "cost", "spearman with truth", "retrained front", "share",
                            "spearman, whole val"),
                           [(label, f"{cost:.0f}", f"{s:+.2f}", f"{hv:.4f}", f"{100 * share:.1f} %",
                             f"{w:+.2f}") for label, cost, s, hv, share, w in found]))
    result = replay(rows, args.orders, args.seed)
    print(f"\nreplays, mean ± std over {args.orders} orders; whole table hypervolume "
          f"{result['full_hypervolume']:.4f}, true front {len(result['true_front'])} architectures:")
    print(format_table(
        ("strategy", "epochs", "saving", "hypervolume", "share", "full at same epochs", "retrained front",
         "true front found", "trained"),
        [(label, f"{s['epochs_mean']:.0f}", f"{s['saving']:.2f}x", f"{s['hv_mean']:.4f} ± {s['hv_std']:.4f}",
          f"{100 * s['hv_share']:.1f} %", f"{s['hv_full_same_epochs']:.4f}",
          f"{s['hv_retrained_front']:.4f} ± {s['hv_retrained_front_std']:.4f}",
          f"{100 * s['true_front_recall']:.0f} %", f"{s['fully_trained']:.1f}")
         for label, s in result["strategies"].items()]))
    adopt = [(label, s) for label, s in result["strategies"].items()
             if label != "full" and s["hv_share"] >= 0.95 and s["saving"] >= 3.0]
    print("\nkeeps >= 95 % of the hypervolume at >= 3x fewer epochs: "
          + (", ".join(f"{label} ({s['saving']:.1f}x, {100 * s['hv_share']:.0f} %)" for label, s in adopt)
             or "none"))
    if args.png:
        best = {}
        for label, s in result["strategies"].items():
            family = label.split(" ")[0] if "+" not in label else "combined"
            if label.startswith(f"screen {RANDOM}"):
                family = label  # the baseline screening must beat, drawn beside the best screening
            if family not in best or s["hv_mean"] / s["epochs_mean"] > best[family][1]:
                best[family] = (label, s["hv_mean"] / s["epochs_mean"])
        plot(result, args.png, ["full", *[v[0] for k, v in best.items() if k != "full"]])
        print(f"wrote {args.png}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
