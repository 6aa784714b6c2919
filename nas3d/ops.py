"""The 15 cell operations of the seed search space, chosen by name from one table.

Every operation maps ``(N, C, D, H, W)`` to the same shape: stride 1, "same" padding, width kept.
The op names are derived from the table below, never kept in a second list.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from nas3d.util import unknown_option_message

KERNEL_SIZES = (3, 5, 7)


def _conv(channels: int, kernel_size: int, *, bias: bool) -> nn.Conv3d:
    return nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, bias=bias)


def _norm(channels: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, affine=True)


# A conv followed by a norm gets no bias: the norm subtracts the mean, so a bias there would be a
# parameter with no effect. Activations that read a vertex's input are not in-place: that tensor
# may feed other vertices of the cell too.
def _conv_in_relu(c: int, k: int) -> nn.Module:
    return nn.Sequential(_conv(c, k, bias=False), _norm(c), nn.ReLU(inplace=True))


def _conv_in_mish(c: int, k: int) -> nn.Module:
    return nn.Sequential(_conv(c, k, bias=False), _norm(c), nn.Mish(inplace=True))


def _in_mish_conv(c: int, k: int) -> nn.Module:
    return nn.Sequential(_norm(c), nn.Mish(inplace=True), _conv(c, k, bias=True))


def _relu_conv(c: int, k: int) -> nn.Module:
    return nn.Sequential(nn.ReLU(), _conv(c, k, bias=True))


def _mish_conv(c: int, k: int) -> nn.Module:
    return nn.Sequential(nn.Mish(), _conv(c, k, bias=True))


_OP_TEMPLATES: dict[str, Callable[[int, int], nn.Module]] = {
    "conv{k}_in_relu": _conv_in_relu,
    "conv{k}_in_mish": _conv_in_mish,
    "in_mish_conv{k}": _in_mish_conv,
    "relu_conv{k}": _relu_conv,
    "mish_conv{k}": _mish_conv,
}

#: name -> factory(channels) -> nn.Module, in the seed study's order.
OPS: dict[str, Callable[[int], nn.Module]] = {
    template.format(k=k): partial(_make, k=k)
    for template, _make in _OP_TEMPLATES.items()
    for k in KERNEL_SIZES
}


def op_kernel_size(name: str) -> int:
    """The cubic kernel size of operation ``name``'s single convolution."""
    return OPS[name].keywords["k"]


def build_op(name: str, channels: int) -> nn.Module:
    """Instantiate operation ``name`` for a cell of width ``channels``."""
    try:
        factory = OPS[name]
    except KeyError:
        raise ValueError(unknown_option_message("operation", name, list(OPS))) from None
    return factory(channels)
