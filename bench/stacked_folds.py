"""Training a fold's k copies as one stacked model against k runs one after another, on the CPU, in one run.

The k models of a cross-validated trial (``data.cv_folds = k``) are one architecture with k sets of
weights, each trained on its own fold's batches. Stacked, their weights are batched along a new first
axis (``torch.func.stack_module_state``) and one call of ``torch.vmap`` over
``torch.func.functional_call`` runs all k forward and backward passes; one Adam steps the stacked
weights, which is exactly k Adams (Adam is elementwise). Sequential is what ``nas3d.objective`` does
today: each model its own forward, backward and Adam step.

BatchNorm (the searched networks' stem) keeps running statistics, which it updates in place. Under
``vmap`` the stacked buffers are passed through ``functional_call`` beside the weights, batched like
them, so each copy updates its own statistics: the models stay the same networks as in sequential
training. ``--batch-norm replace`` instead turns running statistics off
(``torch.func.replace_all_batch_norm_modules_``), which changes what eval mode computes (batch
statistics), so it is measured for comparison only.

Both sides start from the same weights, see the same batches, run in float32 and channels-first (the
trainer's channels_last_3d is left out on both sides: a vmapped batch axis would sit in front of it),
and alternate round by round so that a drift in machine speed hits both alike. Printed: seconds per
training step of all k models, each side's median over the rounds, and their ratio.

    python bench/stacked_folds.py --size 16 --batch 16 --folds 3 --steps 6 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from nas3d.model import build_model  # noqa: E402
from nas3d.seeds import seed_architectures  # noqa: E402


def make_models(arch_name: str, k: int, classes: int) -> list[nn.Module]:
    arch = seed_architectures()[arch_name]
    models = []
    for fold in range(k):
        torch.manual_seed(fold)
        models.append(build_model(arch, 1, classes).train())
    return models


def sequential_steps(models: list[nn.Module], batches: list[tuple[torch.Tensor, torch.Tensor]],
                     steps: int) -> float:
    """Seconds per step of the k models trained one after another (each its own Adam)."""
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    start = time.perf_counter()
    for _ in range(steps):
        for model, optimizer, (x, y) in zip(models, optimizers, batches, strict=True):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return (time.perf_counter() - start) / steps


def stacked_steps(models: list[nn.Module], batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int,
                  batch_norm: str, trained: dict | None = None) -> float:
    """Seconds per step of the k models stacked into one vmapped call (one Adam over stacked weights);
    ``trained`` receives the stacked weights and buffers after the steps."""
    models = [copy.deepcopy(m) for m in models]
    if batch_norm == "replace":
        for m in models:
            torch.func.replace_all_batch_norm_modules_(m)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss_of(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(base, (p, b), (x,)), y)

    step = torch.vmap(torch.func.grad(loss_of), in_dims=(0, 0, 0, 0))
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    x = torch.stack([b[0] for b in batches])
    y = torch.stack([b[1] for b in batches])
    start = time.perf_counter()
    for _ in range(steps):
        grads = step(params, buffers, x, y)
        for name, p in params.items():
            p.grad = grads[name]
        optimizer.step()
    seconds = (time.perf_counter() - start) / steps
    if trained is not None:
        trained.update(params, **{f"buffer:{k}": v for k, v in buffers.items()})
    return seconds


def largest_difference(models: list[nn.Module], trained: dict) -> float:
    """The largest absolute difference between the sequentially trained models' weights and running
    statistics and the stacked ones: the check that both sides train the same k networks."""
    worst = 0.0
    for name, value in trained.items():
        key = name.removeprefix("buffer:")
        tensors = [dict(m.named_parameters(), **dict(m.named_buffers()))[key] for m in models]
        mine = torch.stack([t.detach() for t in tensors])
        if mine.is_floating_point():
            worst = max(worst, (mine - value.detach()).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="adrenalmnist3d", help="a seed architecture, by its dataset")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batch-norm", choices=("buffers", "replace"), default="buffers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = make_models(args.arch, args.folds, 2)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.rand(args.batch, 1, args.size, args.size, args.size, generator=generator),
                torch.randint(0, 2, (args.batch,), generator=generator)) for _ in range(args.folds)]
    # warm-up (allocator, oneDNN kernels) and the check that both sides train the same networks
    sequential = copy.deepcopy(models)
    sequential_steps(sequential, batches, 2)
    trained: dict = {}
    stacked_steps(models, batches, 2, args.batch_norm, trained)
    difference = largest_difference(sequential, trained)
    times: dict[str, list[float]] = {"sequential": [], "stacked": []}
    for _ in range(args.rounds):
        times["sequential"].append(sequential_steps(copy.deepcopy(models), batches, args.steps))
        times["stacked"].append(stacked_steps(models, batches, args.steps, args.batch_norm))
    seq, stk = statistics.median(times["sequential"]), statistics.median(times["stacked"])
    print(f"{args.arch} at {args.size}^3, batch {args.batch}, {args.folds} folds, {args.steps} steps x "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads, batch norm: {args.batch_norm}")
    print(f"  after 2 steps the two sides' weights and running statistics differ by at most {difference:.2e}")
    for name, values in times.items():
        print(f"  {name:>10}: {statistics.median(values) * 1e3:8.1f} ms per step of all {args.folds} models "
              f"(rounds: {', '.join(f'{v * 1e3:.1f}' for v in values)})")
    print(f"  stacked / sequential speed: {seq / stk:.2f}x "
          f"({'stacked faster' if stk < seq else 'stacked slower'}; adopt at >= 1.30x)")


if __name__ == "__main__":
    main()
