"""Zero-cost proxies: scores of an untrained network from one batch, computed before any training.

Each proxy maps ``(model, images, labels)`` to one float, higher meaning "predicted better":

- ``naswot`` (Mellor et al., 2021): the log-determinant of the kernel ``K = C Cᵀ + (1-C)(1-C)ᵀ`` of
  the samples' binary activation codes ``C`` (1 where an activation's input is positive), taken at
  every ReLU and Mish; networks that tell inputs apart at initialisation score higher.
- ``synflow`` (Tanaka et al., 2020): ``log10 Σ |θ ⊙ ∂R/∂θ|`` with ``R`` the summed output of the
  network with all weights made positive on an all-ones input (data-free). Reported as log10 because
  the sum spans many orders of magnitude. Computed in float32, and again in float64 only when float32
  overflows: the reference implementations use float64 throughout, which gives the same log10 to six
  digits on the seed space at 28³ and costs 1.3-3x more (``bench/proxy_cost.py``).
- ``grad_norm`` (Abdelfattah et al., 2021): ``Σ ‖∂L/∂W‖₂`` over the conv and linear weights, ``L`` the
  cross-entropy of the batch.
- ``zico`` (Li et al., 2023): ``Σ_layers log Σ_θ mean|g_θ| / std(g_θ)``, the per-weight gradient
  mean and standard deviation taken across the batch's mini-batches (at least two).

Why written here: no maintained package computes these for 3D CNNs. The nearest on PyPI,
``alethiometer`` 1.1.2 (2023, a fork of ``foresight``), selects layers by ``nn.Conv2d``/``nn.Linear``
and so skips every ``Conv3d``. Every proxy here runs on a deep copy of the model, so the network
that then trains keeps its initial weights, buffers (BatchNorm statistics) and gradients untouched;
none draws random numbers, so seeded training is not shifted either.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PROXIES", "PROXY_BATCH", "ProxyScores", "grad_norm", "naswot", "proxy_batch", "score_proxies",
           "synflow", "zico"]

#: Samples a trial's proxies see: enough for NASWOT's kernel and ZiCo's two mini-batches, few enough
#: that each proxy stays well under a second on a 2-core CPU at 28³ (bench/proxy_cost.py,
#: docs/arch-table.md).
PROXY_BATCH = 8

Proxy = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]

#: Activations whose inputs give NASWOT's binary codes (the seed space's two nonlinearities).
_ACTIVATIONS = (nn.ReLU, nn.Mish)
#: Layers whose weights the gradient proxies read.
_WEIGHTED = (nn.Conv3d, nn.Linear)


def naswot(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """log|K| of the activation-pattern kernel on ``images`` (labels unused)."""
    net = copy.deepcopy(model).train()
    n = images.shape[0]
    kernel = torch.zeros(n, n, dtype=torch.float64, device=images.device)

    def add_codes(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        # A pre-hook: the activations run in place, so their input is read before it is overwritten.
        codes = (inputs[0].detach().flatten(1) > 0).to(torch.float64)
        kernel.add_(codes @ codes.T).add_((1 - codes) @ (1 - codes).T)

    hooks = [m.register_forward_pre_hook(add_codes) for m in net.modules() if isinstance(m, _ACTIVATIONS)]
    try:
        with torch.no_grad():
            net(images)
    finally:
        for hook in hooks:
            hook.remove()
    sign, logdet = torch.linalg.slogdet(kernel)
    return float(logdet) if sign > 0 else -math.inf


def synflow(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
            dtype: torch.dtype = torch.float32) -> float:
    """log10 of SynFlow's saliency sum; reads only ``images``' shape (one all-ones sample).

    In ``dtype``; a float32 sum that overflows (a non-finite saliency) is computed again in float64."""
    net = copy.deepcopy(model).to(dtype).eval()  # eval: BatchNorm uses its (initial) running statistics
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    ones = torch.ones((1, *images.shape[1:]), dtype=dtype, device=images.device)
    net.zero_grad(set_to_none=True)
    net(ones).sum().backward()
    total = sum(float((p.detach() * p.grad).abs().sum(dtype=torch.float64))
                for p in net.parameters() if p.grad is not None)
    if not math.isfinite(total) and dtype != torch.float64:
        return synflow(model, images, labels, dtype=torch.float64)
    return math.log10(total) if total > 0 else -math.inf


def grad_norm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum of the L2 norms of the cross-entropy gradients of the conv and linear weights."""
    net = copy.deepcopy(model).train()
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(images), labels).backward()
    return float(sum(m.weight.grad.norm() for m in net.modules()
                     if isinstance(m, _WEIGHTED) and m.weight.grad is not None))


def zico(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, splits: int = 2) -> float:
    """ZiCo over ``splits`` mini-batches of the batch (the gradient statistics need at least two)."""
    if images.shape[0] < 2 * splits:
        raise ValueError(f"zico needs at least {2 * splits} samples for {splits} mini-batches, "
                         f"but got {images.shape[0]}")
    net = copy.deepcopy(model).train()
    layers = [m for m in net.modules() if isinstance(m, _WEIGHTED)]
    grads: list[list[torch.Tensor]] = [[] for _ in layers]
    for x, y in zip(images.chunk(splits), labels.chunk(splits), strict=True):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        for i, layer in enumerate(layers):
            grads[i].append(layer.weight.grad.detach().flatten().clone())
    score = 0.0
    for per_batch in grads:
        g = torch.stack(per_batch)
        std = g.std(dim=0)
        nonzero = std > 0
        ratio = float((g.abs().mean(dim=0)[nonzero] / std[nonzero]).sum())
        if ratio > 0:
            score += math.log(ratio)
    return score


#: name -> proxy; the list of proxies is derived from this table.
PROXIES: Mapping[str, Proxy] = {"naswot": naswot, "synflow": synflow, "grad_norm": grad_norm, "zico": zico}

ProxyScores = dict[str, float]


def proxy_batch(split, size: int = PROXY_BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of ``size`` samples of ``split`` (a :class:`nas3d.data.Split`), the same for every
    architecture; drawn with a private generator, so the global torch seed is untouched."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:size]
    return split.batch(order.to(split.labels.device))


def score_proxies(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, names: tuple[str, ...] = tuple(PROXIES)
) -> tuple[ProxyScores, dict[str, float]]:
    """Every proxy in ``names`` on one batch: ``(scores, seconds)``, each keyed by proxy name.

    ``images`` are float inputs as the model trains on them, ``labels`` their int64 classes; the
    model is left exactly as it was (each proxy works on a copy).
    """
    unknown = [n for n in names if n not in PROXIES]
    if unknown:
        raise ValueError(f"unknown proxies {unknown}; valid: {', '.join(PROXIES)}")
    scores, seconds = {}, {}
    for name in names:
        start = time.perf_counter()
        scores[name] = PROXIES[name](model, images, labels)
        seconds[name] = time.perf_counter() - start
    return scores, seconds
