"""Training throughput: nas3d's on-device loop against the seed study's DataLoader loop, in one run.

Both loops train the same model (same initial weights, same optimizer settings) on the same synthetic
MedMNIST-shaped volumes. The baseline reads them the way the seed did: a ``medmnist.OrganMNIST3D``
dataset object (opened from a synthetic npz written under the real file name ``organmnist3d.npz``;
medmnist checks md5 only when downloading, so it reads the file as it would the real one) → a
``torch.utils.data.DataLoader`` → a host-to-device copy per batch. The nas3d loop is
``nas3d.train.train_epoch``, the loop ``train_trial`` runs, on a ``Split`` built from the same arrays.
Epochs of the two are interleaved so drift in machine speed hits both alike. The nas3d loop runs with
``TrainConfig``'s defaults (channels_last_3d; bf16 autocast on CUDA; float32 on the CPU unless
``--cpu-bf16``; ``--no-amp`` and ``--no-channels-last`` turn the defaults off, ``--model linear``
isolates the data path) while the baseline runs as the seed did, in float32 and channels-first.

    python bench/train_throughput.py --device cpu --threads 2
    python bench/train_throughput.py --device cuda --samples 971 --json out.json

``--cpu-variants`` measures instead the trainer's own loop on the CPU in several settings against its
defaults (channels_last_3d, eager, all cores, oneDNN on), on architectures of the real-data table
(``--table``, the cheapest, median and dearest row) or the seed architectures: with and without
``torch.compile``, channels-first, fewer threads, and ``torch.backends.mkldnn`` off. Variants are
interleaved epoch by epoch, and each reports its speed as a ratio to the defaults of the same run:

    python bench/train_throughput.py --cpu-variants --table bench/data/arch_table_adrenalmnist3d_28.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import medmnist
import numpy as np
import torch
import torch.nn.functional as F
from medmnist.info import INFO
from torch import nn
from torch.utils.data import DataLoader, Subset

from nas3d.data import Split, write_synthetic_npz
from nas3d.model import build_model as build_network
from nas3d.seeds import seed_architectures
from nas3d.train import TrainConfig, autocast_dtype, train_epoch

FLAG = "organmnist3d"


def _small(in_channels: int, num_classes: int) -> nn.Module:
    """A seed-sized cell network: stem, two convs at full resolution, pool, one conv, classifier."""
    return nn.Sequential(
        nn.Conv3d(in_channels, 16, 3, padding=1),
        nn.BatchNorm3d(16),
        nn.ReLU(),
        nn.Conv3d(16, 16, 3, padding=1),
        nn.InstanceNorm3d(16, affine=True),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Conv3d(16, 32, 3, padding=1),
        nn.InstanceNorm3d(32, affine=True),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def _tiny(in_channels: int, num_classes: int) -> nn.Module:
    """One narrow conv: little compute, so the data path dominates."""
    return nn.Sequential(
        nn.Conv3d(in_channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


def _linear(in_channels: int, num_classes: int) -> nn.Module:
    """No convolution at all: the time left is the data path and the loop itself."""
    return nn.Sequential(nn.AdaptiveAvgPool3d(4), nn.Flatten(), nn.Linear(in_channels * 64, num_classes))


def _seed(flag: str) -> Callable[[int, int], nn.Module]:
    """A seed study's published architecture, built by nas3d."""
    arch = seed_architectures()[flag]
    return lambda in_channels, num_classes: build_network(arch, in_channels, num_classes)


#: --model choices: stand-in CNNs of known cost, and the seed study's architectures ("seed-<flag>").
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "small": _small,
    "tiny": _tiny,
    "linear": _linear,
    **{f"seed-{flag}": _seed(flag) for flag in seed_architectures()},
}


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    return MODELS[name](in_channels, num_classes)


class _GpuUtilisation:
    """Mean GPU utilisation while the block runs, sampled every 50 ms; None where it cannot be read.

    Uses ``torch.cuda.utilization`` (needs pynvml) or else ``nvidia-smi -lms``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._smi: subprocess.Popen[str] | None = None

    def __enter__(self) -> _GpuUtilisation:
        if self.device.type != "cuda":
            return self
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        try:
            torch.cuda.utilization(index)
        except Exception:  # no pynvml, or NVML refused: fall back to nvidia-smi
            smi = shutil.which("nvidia-smi")
            if smi is not None:
                cmd = [smi, "-i", str(index), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
                self._smi = subprocess.Popen([*cmd, "-lms", "50"], stdout=subprocess.PIPE, text=True)
                self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            self._thread = threading.Thread(target=self._poll_nvml, args=(index,), daemon=True)
        if self._thread is not None:
            self._thread.start()
        return self

    def _poll_nvml(self, index: int) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(float(torch.cuda.utilization(index)))

    def _read_smi(self) -> None:
        assert self._smi is not None and self._smi.stdout is not None
        for line in self._smi.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait()
        if self._thread is not None:
            self._thread.join(timeout=2)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dataloader_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device
) -> None:
    """The seed study's loop: per-sample numpy in the dataset, collate, copy each batch to the device."""
    model.train()
    for inputs, targets in loader:
        inputs = inputs.to(device).float()  # medmnist's 3D __getitem__ yields float64 volumes
        targets = targets.to(device).squeeze(1).long()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
    _sync(device)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train_trial sets it; the baseline gets it too
    num_classes, in_channels = len(INFO[FLAG]["label"]), INFO[FLAG]["n_channels"]

    with tempfile.TemporaryDirectory() as root:
        write_synthetic_npz(
            # the real file name, so medmnist's class opens it as it would the real one
            Path(root) / (f"{FLAG}.npz" if args.size == 28 else f"{FLAG}_{args.size}.npz"),
            num_classes=num_classes,
            n_train=args.samples,
            n_val=num_classes,
            n_test=num_classes,
            size=args.size,
            seed=0,
        )
        dataset = medmnist.OrganMNIST3D(split="train", root=root, size=args.size)
        split = Split.from_arrays(dataset.imgs, dataset.labels, task=INFO[FLAG]["task"], device=device)
    # medmnist's __len__ asserts the real split size; a Subset serves any other --samples, item by
    # item through the same __getitem__.
    source = (
        dataset if args.samples == INFO[FLAG]["n_samples"]["train"] else Subset(dataset, range(args.samples))
    )
    loader = DataLoader(source, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)

    torch.manual_seed(0)
    reference = build_model(args.model, in_channels, num_classes)
    models = {"dataloader": copy.deepcopy(reference).to(device), "nas3d": copy.deepcopy(reference).to(device)}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    defaults = TrainConfig()  # the nas3d loop runs as train_trial would, less what the flags turn off
    amp_dtype = autocast_dtype(device, defaults.amp and not args.no_amp, cpu_bf16=args.cpu_bf16)
    channels_last = defaults.channels_last and not args.no_channels_last
    if channels_last:
        models["nas3d"].to(memory_format=torch.channels_last_3d)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator().manual_seed(0)

    def nas3d_epoch() -> None:
        train_epoch(
            models["nas3d"],
            split,
            optimizers["nas3d"],
            scaler,
            batch_size=args.batch_size,
            generator=generator,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
        )  # ends in .item(): synchronised

    epochs = {
        "dataloader": lambda: _dataloader_epoch(
            models["dataloader"], loader, optimizers["dataloader"], device
        ),
        "nas3d": nas3d_epoch,
    }
    for _ in range(args.warmup):  # cudnn autotuning, allocator growth, first-touch page faults
        for epoch in epochs.values():
            epoch()
    seconds = dict.fromkeys(epochs, 0.0)
    utilisation: dict[str, list[float]] = {name: [] for name in epochs}
    peak_mib: dict[str, float | None] = dict.fromkeys(epochs)
    for _ in range(args.epochs):
        for name, epoch in epochs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with _GpuUtilisation(device) as gpu:
                start = time.perf_counter()
                epoch()
                seconds[name] += time.perf_counter() - start
            utilisation[name] += gpu.samples
            if device.type == "cuda":
                peak_mib[name] = max(peak_mib[name] or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)

    results = {
        name: {
            "samples_per_second": args.samples * args.epochs / seconds[name],
            "seconds_per_epoch": seconds[name] / args.epochs,
            "gpu_utilisation_percent": sum(u) / len(u) if (u := utilisation[name]) else None,
            "peak_memory_mib": peak_mib[name],
        }
        for name in epochs
    }
    return {
        "config": {
            **vars(args),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "amp_dtype": str(amp_dtype) if amp_dtype else None,
            "channels_last_3d": channels_last,
        },
        "results": results,
        "ratio": results["nas3d"]["samples_per_second"] / results["dataloader"]["samples_per_second"],
    }


def _table(report: dict) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    cfg = report["config"]
    lines = [
        f"device {cfg['device_name']}, model {cfg['model']}, {cfg['samples']} samples of {cfg['size']}³, "
        f"batch {cfg['batch_size']}, {cfg['epochs']} timed epochs, {cfg['threads']} threads, "
        f"nas3d loop: amp {cfg['amp_dtype']}, channels_last_3d {cfg['channels_last_3d']}",
        f"{'loop':<12}{'samples/s':>12}{'s/epoch':>10}{'GPU util %':>12}{'peak MiB':>10}",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"{name:<12}{r['samples_per_second']:>12.1f}{r['seconds_per_epoch']:>10.3f}"
            f"{cell(r['gpu_utilisation_percent'], '.0f'):>12}{cell(r['peak_memory_mib'], '.0f'):>10}"
        )
    lines.append(f"nas3d / dataloader: {report['ratio']:.2f}x")
    return "\n".join(lines)


ROW_CHOICES = ("cheapest", "median", "dearest")


def _variant_architectures(table: Path | None, which: tuple[str, ...] = ROW_CHOICES) -> dict[str, nn.Module]:
    """Name -> untrained network: rows of the table by FLOPs (``which`` of its cheapest, median and
    dearest), or the seed ones."""
    from nas3d.architecture import Architecture

    if table is None:
        return {f"seed-{flag}": _seed(flag)(1, 2) for flag in ("adrenalmnist3d", "synapsemnist3d")}
    rows = sorted(json.loads(table.read_text())["rows"], key=lambda r: r["flops"])
    by_name = {"cheapest": rows[0], "median": rows[len(rows) // 2], "dearest": rows[-1]}
    picked = {id(by_name[w]): by_name[w] for w in which}.values()
    out = {}
    for row in picked:
        torch.manual_seed(0)
        out[f"{row['arch']} ({row['flops'] / 1e6:.0f} MFLOPs)"] = build_network(
            Architecture.from_json(row["arch_json"]), 1, 2)
    return out


def run_cpu_variants(args: argparse.Namespace) -> dict:
    """The trainer's epoch in each CPU setting, against its defaults; ratios > 1 are faster."""
    cores = torch.get_num_threads()
    variants = {
        "defaults": {},
        "channels-first": {"channels_last": False},
        "torch.compile": {"compile": True},
        "mkldnn off": {"mkldnn": False},
        **{f"{t} thread{'s' * (t > 1)}": {"threads": t}
           for t in sorted({1, max(1, cores // 2)}) if t != cores},
    }
    if args.skip:
        unknown = set(args.skip) - set(variants) | ({"defaults"} & set(args.skip))
        if unknown:
            raise SystemExit(f"--skip: cannot skip {sorted(unknown)}; variants: {', '.join(variants)}")
        variants = {name: v for name, v in variants.items() if name not in args.skip}
    with tempfile.TemporaryDirectory() as root:
        path = write_synthetic_npz(Path(root) / "volumes.npz", num_classes=2, n_train=args.samples,
                                   n_val=2, n_test=2, size=args.size, seed=0)
        with np.load(path) as npz:
            split = Split.from_arrays(npz["train_images"], npz["train_labels"], task="binary-class",
                                      device="cpu")
    report: dict = {"threads": cores, "samples": args.samples, "batch_size": args.batch_size, "models": {}}
    for model_name, reference in _variant_architectures(args.table, tuple(args.rows)).items():
        runs = {}
        for name, v in variants.items():
            model = copy.deepcopy(reference)
            if v.get("channels_last", True):
                model.to(memory_format=torch.channels_last_3d)
            runnable = torch.compile(model) if v.get("compile") else model
            runs[name] = (v, model, runnable, torch.optim.Adam(model.parameters(), lr=1e-3))
        seconds, first = dict.fromkeys(variants, 0.0), {}

        def epoch(name: str, runs: dict = runs) -> float:
            v, _, runnable, optimizer = runs[name]
            torch.set_num_threads(v.get("threads", cores))
            start = time.perf_counter()
            with torch.backends.mkldnn.flags(enabled=v.get("mkldnn", True)):
                train_epoch(runnable, split, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                            batch_size=args.batch_size, generator=torch.Generator().manual_seed(0),
                            channels_last=v.get("channels_last", True))
            torch.set_num_threads(cores)
            return time.perf_counter() - start

        for name in variants:  # warm-up: oneDNN primitives, and torch.compile's compilation
            first[name] = epoch(name)
            print(f"  {model_name}: {name} warmed up in {first[name]:.1f} s", file=sys.stderr, flush=True)
        for _ in range(args.epochs):
            for name in variants:
                seconds[name] += epoch(name)
        base = seconds["defaults"]
        report["models"][model_name] = {
            name: {"seconds_per_epoch": seconds[name] / args.epochs,
                   "speed_vs_defaults": base / seconds[name], "first_epoch_seconds": first[name]}
            for name in variants
        }
    return report


def _variants_table(report: dict) -> str:
    lines = [f"CPU, {report['threads']} threads by default, {report['samples']} samples of batch "
             f"{report['batch_size']}; speed as a ratio to the trainer's defaults (channels_last_3d, eager, "
             "all threads, oneDNN on) in the same run"]
    for model_name, variants in report["models"].items():
        lines.append(f"\n{model_name}")
        lines.append(f"  {'variant':<16}{'s/epoch':>10}{'vs defaults':>13}{'first epoch s':>15}")
        for name, r in variants.items():
            lines.append(f"  {name:<16}{r['seconds_per_epoch']:>10.2f}{r['speed_vs_defaults']:>12.2f}x"
                         f"{r['first_epoch_seconds']:>15.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--samples", type=int, default=INFO[FLAG]["n_samples"]["train"])
    parser.add_argument("--size", type=int, choices=(28, 64), default=28)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs of each loop")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs of each loop first")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the baseline")
    parser.add_argument("--model", choices=tuple(MODELS), default="small")
    parser.add_argument("--no-amp", action="store_true", help="nas3d loop in float32 on CUDA too")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="nas3d loop in bf16 on a CPU with native bf16 (TrainConfig.cpu_bf16)")
    parser.add_argument(
        "--no-channels-last", action="store_true", help="nas3d loop channels-first, as the baseline"
    )
    parser.add_argument("--cpu-variants", action="store_true",
                        help="the trainer's loop in several CPU settings against its defaults (see above)")
    parser.add_argument("--table", type=Path, help="with --cpu-variants: the architecture table to draw from")
    parser.add_argument("--skip", type=lambda text: [v.strip() for v in text.split(",")], default=[],
                        help="with --cpu-variants: variants to leave out, e.g. 'torch.compile'")
    parser.add_argument("--rows", type=lambda text: [v.strip() for v in text.split(",")],
                        default=list(ROW_CHOICES),
                        help="with --cpu-variants --table: which rows, of cheapest,median,dearest")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.cpu_variants:
        unknown_rows = sorted(set(args.rows) - set(ROW_CHOICES))
        if unknown_rows or not args.rows:
            parser.error(f"--rows: {unknown_rows or 'none given'}; choose from {', '.join(ROW_CHOICES)}")
        if args.threads:
            torch.set_num_threads(args.threads)
        report = run_cpu_variants(args)
        print(_variants_table(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    report = run(args)
    print(_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
