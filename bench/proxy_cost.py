"""What the zero-cost proxies cost, against one training epoch of the same architecture, in one run.

For architectures of the real-data table spread over its FLOPs, each proxy of ``nas3d.proxies`` is
timed on the batch a trial gives it (``PROXY_BATCH`` volumes at 28³), beside two baselines run in the
same process on the same network: one epoch of the trainer (``nas3d.train.train_epoch``) on a search
quarter of AdrenalMNIST3D's train split (297 volumes, batch 32, the table's protocol), and SynFlow in
float64 (the reference implementations' precision) against the float32 it runs in. Volumes are random:
the cost of a network does not depend on what it sees. Every figure is the fastest of ``--repeats``.

    python bench/proxy_cost.py --table bench/data/arch_table_adrenalmnist3d_28.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _common  # noqa: F401  (puts this checkout first on sys.path)
import torch
from _common import REPO, format_table, spread

from nas3d.architecture import Architecture
from nas3d.data import Split
from nas3d.model import build_model
from nas3d.proxies import PROXIES, PROXY_BATCH, synflow
from nas3d.train import train_epoch

DEFAULT_TABLE = REPO / "bench" / "data" / "arch_table_adrenalmnist3d_28.json"


def fastest(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(row: dict, *, samples: int, batch_size: int, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(Architecture.from_json(row["arch_json"]), 1, 2)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(PROXY_BATCH, 1, size, size, size, generator=generator)
    labels = torch.arange(PROXY_BATCH) % 2
    out = {name: fastest(lambda p=proxy: p(model, images, labels), repeats)
           for name, proxy in PROXIES.items()}
    out["synflow float64"] = fastest(lambda: synflow(model, images, labels, dtype=torch.float64), repeats)
    volumes = torch.randint(0, 256, (samples, size, size, size), dtype=torch.uint8, generator=generator)
    split = Split.from_arrays(volumes.numpy(), (torch.arange(samples) % 2).reshape(-1, 1).numpy(),
                              task="binary-class", device="cpu")
    trained = build_model(Architecture.from_json(row["arch_json"]), 1, 2)
    trained.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def epoch() -> None:
        train_epoch(trained, split, optimizer, scaler, batch_size=batch_size,
                    generator=torch.Generator().manual_seed(0), channels_last=True)

    out["epoch"] = fastest(epoch, max(1, repeats - 1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--archs", type=int, default=6, help="architectures, spread over the table's FLOPs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: a worker's share with 2 workers on 2 cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=297, help="volumes in the epoch baseline")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = spread(json.loads(args.table.read_text())["rows"], args.archs)
    results = []
    for row in rows:
        r = measure(row, samples=args.samples, batch_size=args.batch_size, size=args.size,
                    repeats=args.repeats)
        results.append({"arch": row["arch"], "flops": row["flops"], "seconds": r})
        print(f"  {row['flops'] / 1e6:.0f} MFLOPs done", file=sys.stderr, flush=True)
    names = list(PROXIES)
    print(f"{args.threads} thread(s), proxies on {PROXY_BATCH} volumes at {args.size}³; "
          f"epoch: {args.samples} volumes, batch {args.batch_size}; fastest of {args.repeats}")
    print(format_table(
        ("architecture", "MFLOPs", *(f"{n} s" for n in names), "all four s", "epoch s", "four / epoch",
         "synflow f32 vs f64"),
        [(r["arch"][:38], f"{r['flops'] / 1e6:.0f}", *(f"{r['seconds'][n]:.3f}" for n in names),
          f"{sum(r['seconds'][n] for n in names):.3f}", f"{r['seconds']['epoch']:.2f}",
          f"{sum(r['seconds'][n] for n in names) / r['seconds']['epoch']:.3f}",
          f"{r['seconds']['synflow float64'] / r['seconds']['synflow']:.2f}x") for r in results]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
