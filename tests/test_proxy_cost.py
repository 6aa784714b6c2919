"""bench/proxy_cost.py on tiny volumes: the rows it picks and what it reports, not a measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nas3d.architecture import Architecture
from tests._bench import load_bench

ARCH = Architecture(ops=("conv3_in_relu",), edges=((0, 1), (1, 2)), stacks=1, cells_per_stack=1,
                    initial_filters=4)


@pytest.fixture(scope="module")
def bench():
    return load_bench("proxy_cost")


def test_spread_takes_the_cheapest_and_dearest_rows_and_some_between(bench) -> None:
    rows = [{"flops": f} for f in (50, 10, 40, 20, 30)]
    assert [r["flops"] for r in bench.spread(rows, 3)] == [10, 30, 50]
    assert [r["flops"] for r in bench.spread(rows, 9)] == [10, 20, 30, 40, 50]
    assert [r["flops"] for r in bench.spread(rows, 1)] == [10]


def test_a_run_reports_every_proxy_and_both_baselines(bench, tmp_path: Path, capsys) -> None:
    table = tmp_path / "table.json"
    row = {"arch": ARCH.short_str(), "arch_json": ARCH.to_json(), "flops": 1}
    table.write_text(json.dumps({"rows": [row]}))
    out = tmp_path / "cost.json"
    assert bench.main(["--table", str(table), "--size", "8", "--samples", "8", "--batch-size", "4",
                       "--repeats", "1", "--json", str(out)]) == 0
    seconds = json.loads(out.read_text())[0]["seconds"]
    assert set(seconds) == {"naswot", "synflow", "grad_norm", "zico", "synflow float64", "epoch"}
    assert all(v > 0 for v in seconds.values())
    assert "four / epoch" in capsys.readouterr().out
