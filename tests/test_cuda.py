"""Checks that need a CUDA device: run by bench/gpu_check.sh, skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nas3d.data import DataConfig, load_splits
from nas3d.model import build_model
from nas3d.seeds import seed_architectures
from nas3d.train import TrainConfig, TrialOutOfMemory, autocast_dtype, train_trial

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def synthetic(tmp_path: Path, size: int = 28) -> DataConfig:
    return DataConfig(dataset="synthetic", size=size, root=str(tmp_path), synthetic_classes=2,
                      synthetic_samples=256, search_fraction=1.0)


def test_mixed_precision_trial_learns_on_cuda(tmp_path: Path) -> None:
    data = load_splits(synthetic(tmp_path), "cuda", for_search=True)
    assert data.train.images.is_cuda
    model = build_model(seed_architectures()["adrenalmnist3d"], 1, 2)
    result = train_trial(model, data, TrainConfig(max_epochs=8, patience=8), torch.device("cuda"))
    assert result.val_auc > 0.8, result
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves master weights in fp32


class _Greedy(torch.nn.Module):
    """Asks the allocator for more memory than the device has: a real CUDA out-of-memory error."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, total = torch.cuda.mem_get_info()
        torch.empty(2 * total, dtype=torch.uint8, device=x.device)
        return self.linear(x.mean(dim=(1, 2, 3, 4)).unsqueeze(1))


def test_out_of_memory_is_a_trial_failure_and_frees_the_device(tmp_path: Path) -> None:
    data = load_splits(synthetic(tmp_path, size=16), "cuda", for_search=True)
    before = torch.cuda.memory_allocated()
    with pytest.raises(TrialOutOfMemory, match="out of memory"):
        train_trial(_Greedy(), data, TrainConfig(max_epochs=1), torch.device("cuda"))
    assert torch.cuda.memory_allocated() <= before + 2**20


def test_amp_dtype_follows_each_gpus_native_bf16() -> None:
    for index in range(torch.cuda.device_count()):
        native = torch.cuda.get_device_capability(index)[0] >= 8
        device = torch.device("cuda", index)
        assert autocast_dtype(device, True) is (torch.bfloat16 if native else torch.float16)


def test_cudnn_benchmark_is_restored_after_a_cuda_run(tmp_path: Path) -> None:
    data = load_splits(synthetic(tmp_path, size=16), "cuda", for_search=True)
    torch.backends.cudnn.benchmark = False
    model = build_model(seed_architectures()["adrenalmnist3d"], 1, 2)
    train_trial(model, data, TrainConfig(max_epochs=1, cudnn_benchmark=True), torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is False
