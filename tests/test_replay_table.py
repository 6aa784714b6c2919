"""bench/replay_table.py on a tiny synthetic table: the replays' bookkeeping, not a measurement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests._bench import load_bench

EPOCHS = 6


def synthetic_table(n: int = 12) -> dict:
    """Rows whose curves rise to a final AUC; the search quarter sees what the whole split sees, and
    ``naswot`` equals the final AUC (a perfect proxy), ``zico`` its negative."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        final = float(rng.uniform(0.55, 0.95))
        aucs = [0.5 + (final - 0.5) * (e + 1) / EPOCHS for e in range(EPOCHS)]
        flops = int(10 ** rng.uniform(8.0, 8.7))
        rows.append({"flops": flops, "params": flops // 1000, "arch_hash": f"arch{i}",
                     "proxies": {"naswot": final, "synflow": None, "grad_norm": float(i), "zico": -final},
                     "curve": {"epoch": list(range(1, EPOCHS + 1)), "val_auc": aucs,
                               "val_loss": [1.0 - a for a in aucs], "full_val_auc": aucs}})
    return {"format": "nas3d-arch-table/1", "machine": {"cpu": "synthetic"}, "rows": rows}


@pytest.fixture(scope="module")
def bench():
    return load_bench("replay_table")


def test_correlations_find_a_perfect_proxy_and_its_negative(bench) -> None:
    found = {name: (s, k, n) for name, s, k, n in bench.correlations(bench.load_rows(synthetic_table()))}
    assert found["naswot"][:2] == (pytest.approx(1.0), pytest.approx(1.0))
    assert found["zico"][:2] == (pytest.approx(-1.0), pytest.approx(-1.0))
    assert found["synflow"][2] == 0  # no finite scores: not correlated, not silently zero
    # The synthetic search quarter sees what the whole split sees: it ranks perfectly.
    quarter = found["search-quarter AUC (what a search ranks by)"]
    assert quarter[:2] == (pytest.approx(1.0), pytest.approx(1.0))


def test_training_everything_recovers_the_whole_table(bench) -> None:
    result = bench.replay(bench.load_rows(synthetic_table()), orders=3, seed=0)
    full = result["strategies"]["full"]
    assert full["saving"] == 1.0 and full["hv_share"] == pytest.approx(1.0)
    assert full["true_front_recall"] == 1.0 and full["fully_trained"] == 12
    assert full["hv_full_same_epochs"] == pytest.approx(full["hv_mean"])
    # Curves are monotone in epochs spent and end at the whole table's hypervolume.
    assert full["curve_mean"][-1] == pytest.approx(result["full_hypervolume"])
    assert all(a <= b + 1e-12 for a, b in zip(full["curve_mean"], full["curve_mean"][1:], strict=False))


def test_cheaper_strategies_spend_what_they_should(bench) -> None:
    result = bench.replay(bench.load_rows(synthetic_table()), orders=3, seed=0)["strategies"]
    assert result["low 3 epochs"]["saving"] == pytest.approx(2.0)
    assert result["screen naswot k=2"]["fully_trained"] == 6
    assert result["screen naswot k=2"]["saving"] == pytest.approx(2.0)
    assert result["screen random k=2"]["fully_trained"] == 6
    # Equal epochs: training everything had reached no more than the whole table, and screening by a
    # perfect proxy beats both it and screening at random after the same epochs.
    perfect, chance = result["screen naswot k=2"], result["screen random k=2"]
    assert perfect["hv_full_same_epochs"] <= result["full"]["hv_mean"] + 1e-12
    assert perfect["hv_mean"] >= perfect["hv_full_same_epochs"] and perfect["hv_mean"] >= chance["hv_mean"]
    asha = result["moasha eta=3 min=2"]
    assert 12 * 2 <= asha["epochs_mean"] < 12 * EPOCHS and asha["fully_trained"] < 12


def test_a_perfect_proxy_screens_better_than_a_useless_one(bench) -> None:
    rows = bench.load_rows(synthetic_table(24))
    result = bench.replay(rows, orders=10, seed=1)["strategies"]
    assert result["screen naswot k=4"]["hv_mean"] > result["screen grad_norm k=4"]["hv_mean"]


def test_main_prints_the_tables_and_writes_the_png(bench, tmp_path: Path, capsys) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(synthetic_table()))
    assert bench.main([str(path), "--orders", "2", "--png", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "spearman" in out and "moasha eta=3 min=2" in out and (tmp_path / "r.png").stat().st_size > 0


def test_fidelity_correlations_are_perfect_where_curves_keep_their_order(bench) -> None:
    found = bench.fidelity_correlations(bench.load_rows(synthetic_table()))
    assert [e for e, _, _ in found] == list(range(1, EPOCHS + 1))
    assert all(q == pytest.approx(1.0) and w == pytest.approx(1.0) for _, q, w in found)


def test_the_retrained_front_scores_the_choices_at_their_true_values(bench) -> None:
    rows = bench.load_rows(synthetic_table())
    result = bench.replay(rows, orders=2, seed=0)["strategies"]
    # Fewer epochs rank as all epochs do here: the same front, retrained, is the whole table's front.
    assert result["low 3 epochs"]["hv_retrained_front"] == pytest.approx(result["full"]["hv_retrained_front"])
    assert result["low 3 epochs"]["hv_mean"] < result["full"]["hv_mean"]  # its own short runs score less


def test_a_smaller_train_fraction_is_replayed_on_the_architectures_both_tables_hold(bench) -> None:
    rows = bench.load_rows(synthetic_table())
    low = bench.load_rows({"rows": synthetic_table()["rows"][:8]})  # ranks as the base table does
    box = bench.hypervolume_box(28, 1, 2)
    found = {label: rest for label, *rest in bench.train_fraction(rows, low, 0.125, 0.25, box)}
    cost, rho, _, share, whole = found[f"train x0.5, {EPOCHS} epochs"]
    assert cost == 8 * EPOCHS / 2 and rho == pytest.approx(1.0) and share == pytest.approx(1.0)
    assert whole == pytest.approx(1.0)
    assert found[f"base, {EPOCHS} epochs"][0] == 8 * EPOCHS
    with pytest.raises(ValueError, match="share 2 architectures"):
        bench.train_fraction(rows, low[:2], 0.125, 0.25, box)
