"""Zero-cost proxies: hand-computed values on tiny modules, and the trained model left untouched."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nas3d.architecture import Architecture
from nas3d.model import build_model
from nas3d.proxies import PROXIES, grad_norm, naswot, score_proxies, synflow, zico

ARCH = Architecture(ops=("conv3_in_mish", "relu_conv3"), edges=((0, 1), (1, 2), (0, 2), (2, 3)),
                    stacks=2, cells_per_stack=1, initial_filters=4)


def batch(n: int = 8, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, size, size, size, generator=generator), torch.arange(n) % 2


def test_every_proxy_scores_a_network_and_leaves_it_untouched() -> None:
    torch.manual_seed(0)
    model = build_model(ARCH, 1, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    images, labels = batch()
    scores, seconds = score_proxies(model, images, labels)
    assert set(scores) == set(PROXIES) == set(seconds)
    assert all(math.isfinite(v) for v in scores.values()), scores
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng_before, torch.get_rng_state())  # seeded training is not shifted


def test_synflow_of_a_linear_map_is_the_sum_of_its_absolute_weights() -> None:
    # R = sum(|W| @ 1 + |b|): dR/dW = 1 and dR/db = 1, so the saliency sum is sum|W| + sum|b|.
    layer = nn.Linear(5, 3)
    expected = math.log10(float(layer.weight.detach().abs().sum() + layer.bias.detach().abs().sum()))
    assert synflow(layer, torch.rand(4, 5), torch.zeros(4, dtype=torch.long)) == pytest.approx(expected)


def test_synflow_in_float32_matches_float64_and_falls_back_where_float32_overflows() -> None:
    torch.manual_seed(0)
    model = build_model(ARCH, 1, 2)
    images, labels = batch()
    reference = synflow(model, images, labels, dtype=torch.float64)
    assert synflow(model, images, labels) == pytest.approx(reference, rel=1e-5)
    # Weights of 1e30: the float32 saliency overflows (inf), float64 holds it.
    big = nn.Sequential(nn.Linear(5, 5, bias=False), nn.Linear(5, 1, bias=False))
    with torch.no_grad():
        for layer in big:
            layer.weight.fill_(1e30)
    # R = 25a² for a = 1e30: the 25 first-layer weights each have saliency a², the 5 last ones 5a².
    expected = math.log10(50 * 1e30 * 1e30)
    assert synflow(big, torch.rand(2, 5), torch.zeros(2, dtype=torch.long)) == pytest.approx(expected)


def test_grad_norm_is_the_norm_of_the_weight_gradient() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 2)
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 1, 0])
    F.cross_entropy(layer(x), y).backward()
    expected = float(layer.weight.grad.norm())
    layer.zero_grad(set_to_none=True)
    assert grad_norm(layer, x, y) == pytest.approx(expected)


def test_naswot_separates_distinct_inputs_and_not_identical_ones() -> None:
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    torch.manual_seed(0)
    distinct = torch.randn(6, 4)
    assert math.isfinite(naswot(net, distinct, torch.zeros(6, dtype=torch.long)))
    # Identical samples have identical codes: the kernel is singular.
    assert naswot(net, distinct[:1].repeat(6, 1), torch.zeros(6, dtype=torch.long)) == -math.inf


def test_zico_needs_two_mini_batches_of_two() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="at least 4 samples"):
        zico(model, torch.rand(3, 4), torch.zeros(3, dtype=torch.long))
    assert math.isfinite(zico(model, torch.rand(8, 4), torch.arange(8) % 2))


def test_unknown_proxy_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid: naswot, synflow, grad_norm, zico"):
        score_proxies(nn.Linear(2, 2), torch.rand(4, 2), torch.zeros(4, dtype=torch.long), names=("snip",))
