"""Cost of an architecture: FLOPs, parameters, and thop's MACs for comparison with the literature.

FLOP convention (PyTorch's ``FlopCounterMode``): one multiply-add counts as **two** FLOPs, so
FLOPs = 2 x MACs for every op it counts. It counts the matrix work only: convolutions
(``2 * N * C_out * D_out * H_out * W_out * C_in * k^3``; the bias add is not counted) and the
classifier's ``addmm`` (``2 * N * C_in * classes``). Normalisation, activations, pooling and the
additions that join vertices are not counted: they are linear in the activation size and well under
1% of the convolutions here. Counted on a batch of one, on the meta device, so no memory or compute
is spent on real tensors.

thop's MAC count is recorded too, since published NAS and MedMNIST tables report thop numbers. thop
counts differently (it adds norms and some activations, and knows nothing of Mish), and it writes
``total_ops``/``total_params`` buffers into every module it profiles, so it only ever sees a
throw-away copy built for it (on the meta device too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from nas3d.architecture import Architecture
from nas3d.registry import ModelRecipe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Costs:
    flops: int  # FlopCounterMode, batch of one
    params: int
    thop_macs: int | None  # None where thop is unavailable or failed


def count_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of ``model`` on an input of ``input_shape`` (batch included)."""
    device = next(model.parameters()).device
    x = torch.empty(input_shape, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def thop_macs(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """thop's MAC count. thop leaves buffers in ``model``: pass a copy that is thrown away after.

    thop counts from tensor shapes in forward hooks, so a model on the meta device gives the same
    numbers without computing anything.
    """
    try:
        import thop
    except ImportError:  # pragma: no cover - thop is a dependency, but the count is only informative
        return None
    device = next(model.parameters()).device
    macs, _ = thop.profile(model, inputs=(torch.zeros(input_shape, device=device),), verbose=False)
    return int(macs)


def measure_costs(
    model: Architecture | ModelRecipe | str,
    in_channels: int,
    num_classes: int,
    size: int,
    *,
    with_thop: bool = True,
) -> Costs:
    """FLOPs, parameters and thop MACs of any registered model (an architecture, a recipe or a
    baseline's name) on a ``size``³ input, all counted on the meta device."""
    recipe = ModelRecipe.of(model)
    with torch.device("meta"):
        network = recipe.build(in_channels, num_classes).eval()
    shape = (1, in_channels, size, size, size)
    flops, params = count_flops(network, shape), count_params(network)
    macs = None
    if with_thop:
        # thop runs last, on this throw-away model: its buffers must never reach a real state_dict.
        try:
            macs = thop_macs(network, shape)
        except Exception as e:  # informative only; the FLOPs above are the number nas3d compares
            logger.warning("thop could not count %s: %s", recipe.describe(), e)
    return Costs(flops=flops, params=params, thop_macs=macs)
