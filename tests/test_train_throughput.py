"""bench/train_throughput.py --cpu-variants on a one-row table: every variant reported against the
defaults, the rows picked; the plumbing of the script, not a measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nas3d.architecture import Architecture
from tests._bench import load_bench

ARCH = Architecture(ops=("relu_conv3",), edges=((0, 1), (1, 2)), stacks=1, cells_per_stack=1,
                    initial_filters=4)


@pytest.fixture(scope="module")
def bench():
    return load_bench("train_throughput")


def test_cpu_variants_report_each_against_the_defaults(bench, tmp_path: Path, capsys) -> None:
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"rows": [{"arch": "tiny", "arch_json": ARCH.to_json(), "flops": 1}]}))
    out = tmp_path / "variants.json"
    argv = ["--cpu-variants", "--table", str(table), "--rows", "median", "--samples", "8",
            "--batch-size", "4", "--epochs", "1", "--skip", "torch.compile", "--json", str(out)]
    assert bench.main(argv) == 0
    (variants,) = json.loads(out.read_text())["models"].values()
    assert "torch.compile" not in variants and {"defaults", "channels-first", "mkldnn off"} <= set(variants)
    assert variants["defaults"]["speed_vs_defaults"] == pytest.approx(1.0)
    assert "vs defaults" in capsys.readouterr().out


def test_unknown_rows_are_named(bench, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--cpu-variants", "--table", str(tmp_path / "t.json"), "--rows", "middle"])
