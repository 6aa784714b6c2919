"""bench/arch_table.py's bookkeeping: which architectures a table takes, its protocol, resuming."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from nas3d.architecture import Architecture
from tests._bench import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("arch_table")


def arch(filters: int) -> Architecture:
    return Architecture(ops=("relu_conv3",), edges=((0, 1), (1, 2)), stacks=1, cells_per_stack=1,
                        initial_filters=filters)


def test_a_second_table_takes_architectures_of_the_first_spread_over_flops(bench, tmp_path: Path) -> None:
    rows = [{"arch_json": arch(f).to_json(), "arch_hash": arch(f).arch_hash(), "flops": f * 10}
            for f in (16, 4, 12, 8, 20)]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"rows": rows}))
    picked = bench.from_table(path, 3)
    assert [flops for _, flops in picked] == [40, 120, 200]
    assert picked[0][0] == arch(4)
    with pytest.raises(ValueError, match="holds only 5 architectures"):
        bench.from_table(path, 6)


def test_another_train_fraction_is_its_own_table_on_the_same_val_quarter(bench, tmp_path: Path) -> None:
    args = argparse.Namespace(
        name="t", archs=4, seed=0, data_root=str(tmp_path), epochs=3, batch_size=8, search_fraction=0.125)
    config = bench.table_config(args)
    assert (config.data.search_fraction, config.data.fraction("val")) == (0.125, 0.25)
    protocol = bench.protocol(config)
    assert (protocol["search_fraction"], protocol["search_val_fraction"]) == (0.125, 0.25)
    # The seed quarter leaves val's share unset, as the committed table's study was made.
    args.search_fraction = 0.25
    assert bench.table_config(args).data.search_val_fraction is None
    # A committed table of another protocol is not resumed from.
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"format": bench.FORMAT, "protocol": protocol, "rows": [{"arch_hash": "a"}]}))
    assert bench.committed_rows(table, config) == {"a": {"arch_hash": "a"}}
    assert bench.committed_rows(table, bench.table_config(args)) == {}


def test_a_resumed_build_queues_failed_architectures_again_once(bench) -> None:
    import optuna

    states = optuna.trial.TrialState
    choice = {"f": optuna.distributions.CategoricalDistribution([4, 8, 12])}
    study = optuna.create_study(directions=["maximize", "minimize"])
    for filters, state in ((4, states.FAIL), (8, states.FAIL), (8, states.COMPLETE), (12, states.FAIL)):
        study.enqueue_trial({"f": filters})
        study.tell(study.ask(choice), [0.5, 1.0] if state == states.COMPLETE else None, state=state)
    study.enqueue_trial({"f": 12})  # already queued again by hand
    assert bench.requeue_failed(study) == 1  # 4 only: 8 finished, 12 waits
    waiting = [t.system_attrs["fixed_params"]["f"] for t in study.trials if t.state == states.WAITING]
    assert sorted(waiting) == [4, 12]
    assert bench.requeue_failed(study) == 0  # nothing twice
