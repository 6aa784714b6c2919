from __future__ import annotations

import pytest
import torch
from torch import nn

from nas3d.costs import measure_costs
from nas3d.model import Cell, build_model
from nas3d.ops import op_kernel_size
from nas3d.seeds import seed_architectures

SEEDS = seed_architectures()
NUM_CLASSES = {"organmnist3d": 11, "nodulemnist3d": 2, "adrenalmnist3d": 2, "synapsemnist3d": 2}


def conv(c_in: int, c_out: int, k: int, side: int) -> int:
    """Hand count: 2 FLOPs per multiply-add, one output voxel per input voxel ("same" padding)."""
    return 2 * c_in * c_out * k**3 * side**3


# FLOPs at 28^3 written out layer by layer from the published description of each cell.
HAND_FLOPS = {
    # S1C1F8, ops conv5_in_mish, relu_conv3, relu_conv5; classifier 8 -> 2
    "adrenalmnist3d": conv(1, 8, 3, 28) + conv(8, 8, 5, 28) + conv(8, 8, 3, 28) + conv(8, 8, 5, 28)
    + 2 * 8 * 2,
    # S2C2F8, ops k=3,5,7: two cells at 8 ch on 28^3; pool; 1x1 projection 8->16 then two cells at
    # 16 ch on 14^3; classifier 16 -> 2
    "nodulemnist3d": conv(1, 8, 3, 28)
    + 2 * (conv(8, 8, 3, 28) + conv(8, 8, 5, 28) + conv(8, 8, 7, 28))
    + conv(8, 16, 1, 14)
    + 2 * (conv(16, 16, 3, 14) + conv(16, 16, 5, 14) + conv(16, 16, 7, 14))
    + 2 * 16 * 2,
    # S1C1F32, ops k=3,7,7,5; classifier 32 -> 11
    "organmnist3d": conv(1, 32, 3, 28)
    + conv(32, 32, 3, 28) + conv(32, 32, 7, 28) + conv(32, 32, 7, 28) + conv(32, 32, 5, 28)
    + 2 * 32 * 11,
    # S1C2F16, ops k=3,7,3,3 in two cells; classifier 16 -> 2
    "synapsemnist3d": conv(1, 16, 3, 28)
    + 2 * (conv(16, 16, 3, 28) + conv(16, 16, 7, 28) + conv(16, 16, 3, 28) + conv(16, 16, 3, 28))
    + 2 * 16 * 2,
}


def test_hand_counts_are_pinned() -> None:
    assert HAND_FLOPS == {
        "adrenalmnist3d": 787_813_408,
        "nodulemnist3d": 4_182_821_952,
        "organmnist3d": 37_712_483_008,
        "synapsemnist3d": 9_549_998_144,
    }


@pytest.mark.parametrize("dataset", sorted(SEEDS))
def test_seed_architecture_structure_and_flops(dataset: str) -> None:
    arch = SEEDS[dataset]
    model = build_model(arch, in_channels=1, num_classes=NUM_CLASSES[dataset])
    cells = [m for m in model.cells if isinstance(m, Cell)]
    pools = [m for m in model.cells if isinstance(m, nn.MaxPool3d)]
    assert len(cells) == arch.stacks * arch.cells_per_stack
    assert len(pools) == arch.stacks - 1
    for index, cell in enumerate(cells):
        stack = index // arch.cells_per_stack
        width = arch.initial_filters * 2**stack
        kernels = [op_kernel_size(op) for op in arch.ops]
        convs = [m for op in cell.vertex_ops for m in op.modules() if isinstance(m, nn.Conv3d)]
        assert [c.kernel_size[0] for c in convs] == kernels
        assert all(c.in_channels == c.out_channels == width for c in convs)
        # a projection exactly where the width changes: first cell of every later stack
        assert (cell.project is not None) == (stack > 0 and index % arch.cells_per_stack == 0)
    assert model.classifier.in_features == arch.stack_widths()[-1]
    costs = measure_costs(arch, 1, NUM_CLASSES[dataset], 28, with_thop=False)
    assert costs.flops == HAND_FLOPS[dataset]


@pytest.mark.parametrize("size", [28, 64])
def test_any_cubic_size_and_no_unused_parameters(size: int) -> None:
    arch = SEEDS["nodulemnist3d"]
    model = build_model(arch, in_channels=2, num_classes=3)
    x = torch.randn(2, 2, size, size, size) if size == 28 else torch.randn(1, 2, size, size, size)
    out = model(x)
    assert out.shape == (x.shape[0], 3)
    out.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_thop_buffers_never_reach_a_model_state_dict() -> None:
    arch = SEEDS["adrenalmnist3d"]
    model = build_model(arch)
    keys_before = set(model.state_dict())
    costs = measure_costs(arch, 1, 2, 16)
    assert costs.thop_macs is not None and costs.thop_macs > 0
    assert set(model.state_dict()) == keys_before
    assert not any("total_ops" in k or "total_params" in k for k in build_model(arch).state_dict())


def test_model_code_does_not_import_optuna() -> None:
    import subprocess
    import sys

    code = "import sys, nas3d.model, nas3d.costs; print('optuna' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
