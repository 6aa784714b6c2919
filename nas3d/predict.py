"""``nas3d predict``: class probabilities from a checkpoint for your volumes, a CSV row per sample.

Volumes are prepared exactly as in training (:attr:`nas3d.checkpoint.Checkpoint.preprocessing`, done by
:func:`nas3d.data.prepare_for_model`); the forward pass is plain float32, no autocast.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas3d.checkpoint import Checkpoint, load_checkpoint
from nas3d.export import check_out
from nas3d.util import atomic_write

__all__ = ["predict_command", "predict_volumes", "size_note", "write_predictions"]

logger = logging.getLogger(__name__)


def predict_volumes(
    checkpoint: Checkpoint,
    samples: list[tuple[str, tuple[Path, ...]]],
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """Class probabilities ``(N, num_classes)`` of ``checkpoint``'s model for ``samples`` (``(where,
    files)`` each: a name for errors, and the volume files that are the sample's channels), prepared
    exactly as in training (:attr:`Checkpoint.preprocessing`). In float32, no autocast. Every volume is
    read and checked before the model runs: a bad one is a one-line ``ValueError`` naming it."""
    from nas3d.data import prepare_for_model

    images = prepare_for_model(samples, checkpoint.preprocessing)
    device = torch.device(device)
    model = checkpoint.build(device)
    out = []
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start:start + batch_size]).to(device)
            out.append(torch.softmax(model(x).float(), dim=1).cpu())
    return torch.cat(out).numpy()


def write_predictions(
    checkpoint_path: str | Path,
    out: str | Path,
    *,
    manifest: str | Path | None = None,
    volumes: Sequence[str | Path] = (),
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    overwrite: bool = False,
) -> tuple[Path, int]:
    """``nas3d predict``: one CSV row per sample of ``manifest`` (its image and label cells kept) or per
    volume file, with a probability column per class (named by class) and ``predicted``: for a binary
    model the positive class where its probability is above the checkpoint's threshold
    (:attr:`Checkpoint.threshold`, chosen on validation by ``nas3d retrain``; 0.5 where none is
    recorded), written in a ``threshold`` column; else the class of the highest one. Written
    atomically, after every volume was prepared; returns the path
    and the row count."""
    import csv
    import io

    from nas3d.data import read_manifest

    out = Path(out)
    if bool(manifest) == bool(volumes):
        raise ValueError("predict takes --manifest CSV or volume files, one of the two")
    check_out(out, overwrite, example="predictions.csv")
    checkpoint = load_checkpoint(checkpoint_path)
    classes = checkpoint.class_names
    if manifest:
        table = read_manifest(manifest, labels=False)
        keys = list(table.image_columns) + (["label"] if any(r.label for r in table.rows) else [])
        ids = [list(r.cells) + ([r.label or ""] if "label" in keys else []) for r in table.rows]
        samples = [(table.where(r), r.images) for r in table.rows]
    else:
        keys = ["image"]
        ids = [[str(v)] for v in volumes]
        samples = [(f"volume {v}", (Path(v),)) for v in volumes]
    threshold = [f"{checkpoint.threshold:.6g}"] if checkpoint.binary else []
    clash = sorted(set(keys + ["predicted", "threshold"]) & set(classes))
    if clash:
        raise ValueError(f"class name {clash[0]!r} is also a column name of the predictions; rename it")
    note = size_note(checkpoint, samples[0]) if samples else None
    if note:
        logger.warning(note)
    probabilities = predict_volumes(checkpoint, samples, device, batch_size)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*keys, *classes, "predicted", *(["threshold"] if threshold else [])])
    for row, p in zip(ids, probabilities, strict=True):
        label = int(p[1] > checkpoint.threshold) if checkpoint.binary else int(np.argmax(p))
        writer.writerow([*row, *(f"{v:.6f}" for v in p), classes[label], *threshold])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda file: file.write(buffer.getvalue().encode("utf-8")))
    return out, len(ids)


def size_note(checkpoint: Checkpoint, sample: tuple[str, tuple[Path, ...]]) -> str | None:
    """One line when the first sample's volumes are cubes of another size than the one the model was
    searched at (they are resized to it), with the model's FLOPs at both sizes; None otherwise."""
    from nas3d.costs import measure_costs
    from nas3d.data import read_sample

    where, files = sample
    shapes = {volume.array.shape[1:] for volume in read_sample(files, where=where)}
    searched = checkpoint.input_size
    if len(shapes) != 1 or len(set(next(iter(shapes)))) != 1 or next(iter(shapes))[0] == searched:
        return None  # not a cube (resampled by spacing anyway), or already the model's size
    size = int(next(iter(shapes))[0])
    at = {s: measure_costs(checkpoint.recipe, checkpoint.in_channels, checkpoint.num_classes, s,
                           with_thop=False).flops for s in (searched, size)}
    return (f"{where} is {size}³ but the model was searched at {searched}³: the volumes are resized to "
            f"{searched}³, where the model costs {at[searched] / 1e6:,.0f} M FLOPs a volume "
            f"({at[size] / 1e6:,.0f} M at {size}³)")


def predict_command(flags: dict[str, Any]) -> str:
    """``nas3d predict`` by its flags: :func:`write_predictions` on ``device`` (``cpu``, ``cuda`` or
    ``cuda:N``); what to tell the user."""
    from nas3d.train import torch_device

    out, rows = write_predictions(
        flags["checkpoint"], flags["out"], manifest=flags.get("manifest"), volumes=flags.get("volumes") or (),
        device=torch_device(flags.get("device") or "cpu"), batch_size=flags.get("batch_size") or 16,
        overwrite=flags.get("force", False),
    )
    classes = load_checkpoint(flags["checkpoint"]).class_names
    positive = f"; positive class {classes[1]!r}" if len(classes) == 2 else ""
    return f"predicted {rows} volume{'s' if rows != 1 else ''} into {out}{positive}"
