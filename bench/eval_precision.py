"""How much bf16 logits move MedMNIST scores: ties and AUC of bf16-autocast evaluation vs float32.

Trains one network briefly in float32, then scores the test split twice with the same weights:
- ``bf16``: the logits computed under ``torch.autocast(dtype=bfloat16)`` and upcast to float32 before
  the softmax (what nas3d did before evaluation was made float32);
- ``float32``: ``nas3d.train.predict`` (autocast off, float32 logits, float32 softmax).
For each it prints how many samples share their positive-class score with another sample (ties), and
the AUC/ACC by ``medmnist.Evaluator`` on the real split (nas3d.metrics on synthetic data).

    python bench/eval_precision.py --data-root /work/shared/data            # AdrenalMNIST3D, CPU
    python bench/eval_precision.py --dataset synthetic --size 16             # no file needed
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from nas3d.data import SYNTHETIC, DataConfig, load_splits
from nas3d.model import build_model
from nas3d.retrain import test_metrics
from nas3d.seeds import seed_architectures
from nas3d.train import TrainConfig, predict, train_trial


def bf16_scores(model: torch.nn.Module, split, device: torch.device, batch_size: int) -> np.ndarray:
    """The old evaluation: bf16 logits under autocast, upcast, then softmax."""
    model.eval()
    out = []
    with torch.inference_mode():
        for index in split.batches(batch_size):
            images, _ = split.batch(index)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(images).float()
            out.append(torch.softmax(logits, dim=1))
    return torch.cat(out).cpu().numpy()


def ties(scores: np.ndarray) -> tuple[int, int]:
    """(samples whose score equals another sample's, distinct scores) of the positive-class column."""
    column = scores[:, -1] if scores.shape[1] == 2 else scores.max(1)
    _, counts = np.unique(column, return_counts=True)
    return int(counts[counts > 1].sum()), len(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="adrenalmnist3d")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--data-root")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    extra = {"synthetic_samples": 512} if args.dataset == SYNTHETIC else {}
    config = DataConfig(dataset=args.dataset, size=args.size, root=args.data_root, download=False, **extra)
    data = load_splits(config, device, for_search=False)
    torch.manual_seed(0)
    model = build_model(seed_architectures()["adrenalmnist3d"], data.in_channels, data.num_classes)
    start = time.perf_counter()
    result = train_trial(model, data, TrainConfig(max_epochs=args.epochs, patience=args.epochs, amp=False),
                         device)
    print(f"{config.dataset} {config.size}^3 on {device}: trained {result.epochs_run} epochs in float32 "
          f"({time.perf_counter() - start:.0f} s); test split of {len(data.test)} samples")
    old = bf16_scores(model, data.test, device, 128)
    new, _ = predict(model, data.test, device, 128)
    rows = []
    for name, scores in (("bf16 logits", old), ("float32", new)):
        tied, distinct = ties(scores)
        auc, acc = test_metrics(config, data.test, scores)
        rows.append((name, tied, distinct, auc, acc))
        print(f"{name:>12}: {tied:4d} of {len(scores)} samples tied ({distinct} distinct scores); "
              f"test AUC {auc:.6f} ACC {acc:.6f}")
    print(f"AUC drift bf16 - float32: {rows[0][3] - rows[1][3]:+.6f}; "
          f"ACC drift {rows[0][4] - rows[1][4]:+.6f}; max |score difference| {np.abs(old - new).max():.2e}")


if __name__ == "__main__":
    main()
