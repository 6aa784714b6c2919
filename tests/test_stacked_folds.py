"""bench/stacked_folds.py: the stacked (vmap) copies train the same networks as the sequential ones."""

from __future__ import annotations

import copy

import pytest
import torch

from tests._bench import load_bench


@pytest.mark.slow  # a few training steps of the seed study's architecture, twice
def test_stacked_training_matches_sequential_training_batch_norm_statistics_included() -> None:
    bench = load_bench("stacked_folds")
    models = bench.make_models("adrenalmnist3d", 2, 2)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 1, 8, 8, 8, generator=generator),
                torch.randint(0, 2, (4,), generator=generator)) for _ in range(2)]
    sequential = copy.deepcopy(models)
    bench.sequential_steps(sequential, batches, 2)
    trained: dict = {}
    bench.stacked_steps(models, batches, 2, "buffers", trained)
    assert any(name.endswith("running_mean") for name in trained)  # BatchNorm's statistics are compared too
    assert bench.largest_difference(sequential, trained) < 1e-4
    assert bench.largest_difference(models, trained) > 1e-3  # the untrained weights are far from them
