from __future__ import annotations

import pytest
import torch

from nas3d.costs import count_flops
from nas3d.ops import OPS, build_op, op_kernel_size
from nas3d.seeds import seed_document


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_keeps_shape_backprops_and_counts_its_conv(name: str) -> None:
    channels, size = 3, 6
    op = build_op(name, channels)
    x = torch.randn(2, channels, size, size, size, requires_grad=True)
    y = op(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in op.parameters())
    k = op_kernel_size(name)
    # one conv: 2 FLOPs per multiply-add, C_out * C_in * k^3 per output voxel, batch of one
    expected = 2 * channels * channels * k**3 * size**3
    assert count_flops(op, (1, channels, size, size, size)) == expected > 0


def test_small_conv_flops_hand_count() -> None:
    conv = torch.nn.Conv3d(2, 4, 3, padding=1)
    # 4*5*6 output voxels, each 4 outputs x 2 inputs x 27 taps multiply-adds
    assert count_flops(conv, (1, 2, 4, 5, 6)) == 2 * (4 * 5 * 6) * 4 * 2 * 27


def test_op_table_names_and_order_follow_the_seed() -> None:
    assert list(OPS) == seed_document()["ops_order_in_seed"]


def test_unknown_op_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="Did you mean 'conv3_in_relu'"):
        build_op("conv3_in_rleu", 4)
