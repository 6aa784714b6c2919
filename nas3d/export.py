"""``nas3d export``: a trial's checkpoint copied out of the study's artifact store, and models as ONNX.

Every file written here (and by ``nas3d predict`` and ``nas3d retrain``) goes through :func:`check_out`:
an existing result is replaced only with ``--force``. A file appears whole or not at all, and a checkpoint
export that cannot draw the picture asked for (no Graphviz, or a failing ``dot``) writes neither file.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from nas3d import records
from nas3d.checkpoint import Checkpoint, load_checkpoint
from nas3d.drawing import PICTURE_SUFFIX, PictureUnavailable, architecture_svg, check_dot
from nas3d.storages import StorageSpec, make_storage, resolve_storage
from nas3d.study import load_trial
from nas3d.util import atomic_path, atomic_write, one_line

__all__ = ["ONNX_OPSET", "check_out", "export_checkpoint", "export_command", "export_model", "export_onnx",
           "export_trial", "exported_line"]


def check_out(path: str | Path, overwrite: bool, *, example: str | None = None) -> Path:
    """Refuse to write ``path`` where it exists, unless ``overwrite`` (``--force``); with ``example`` (a
    file name to suggest), refuse a folder as well. One-line ``ValueError``s naming the fix."""
    path = Path(path)
    if example is not None and path.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file path, e.g. {path / example}")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass --force to overwrite it, or choose another --out")
    return path


def _no_checkpoint_reason(trial: FrozenTrial, study_name: str) -> str:
    state = trial.state.name.lower()
    attrs = trial.user_attrs
    if trial.state in (TrialState.RUNNING, TrialState.WAITING):
        return f"it is {state}; export it once it completes"
    if trial.state == TrialState.COMPLETE and records.CHECKPOINT_MISSING in attrs:
        why = one_line(attrs[records.CHECKPOINT_MISSING])
        return (f"its scores stand, but the artifact store did not take its checkpoint ({why}); retrain "
                f"its recorded architecture to get one: nas3d retrain --study-name {study_name} --trial "
                f"{trial.number}")
    if trial.state == TrialState.COMPLETE:
        return "it completed without one (its worker had no artifact store)"
    verb = {"PRUNED": "was pruned", "FAIL": "failed"}.get(trial.state.name, f"is {state}")
    reason = f"it {verb} ({one_line(records.failure_reason(trial, 'no reason recorded'))})"
    if records.DUPLICATE_OF in attrs:
        reason += f"; export trial {attrs[records.DUPLICATE_OF]}, which trained this architecture"
    return reason


def export_checkpoint(
    storage: optuna.storages.BaseStorage | StorageSpec | str | None,
    artifact_store: Any,
    study_name: str,
    number: int,
    out: str | Path,
    *,
    overwrite: bool = False,
    picture: bool = False,
) -> tuple[FrozenTrial, Checkpoint]:
    """Copy trial ``number``'s checkpoint out of the artifact store to ``out``; returns the trial and
    the checkpoint as loaded back. The file appears whole or not at all, and an existing ``out`` is
    replaced only with ``overwrite`` and only by a file that loads and is that trial's architecture.
    With ``picture``, the architecture's picture goes beside it (``out`` with suffix ``.svg``): both
    files or neither (without Graphviz's ``dot``, a one-line ``ValueError`` before anything is written).

    ``storage`` may be a storage string or spec, opened read-only (it must exist); ``artifact_store``
    None means the one that goes with it."""
    from optuna.artifacts import download_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound

    out = check_out(out, overwrite, example=f"trial-{number}.pt")
    drawing = out.with_suffix(PICTURE_SUFFIX) if picture else None
    if drawing is not None:
        check_out(drawing, overwrite)
        _picture_or_fix(check_dot)
    if not isinstance(storage, optuna.storages.BaseStorage):
        from nas3d.storages import artifact_store_for

        spec = resolve_storage(storage)
        storage = make_storage(spec, must_exist=True)
        artifact_store = artifact_store if artifact_store is not None else artifact_store_for(spec)
    trial = load_trial(storage, study_name, number)
    artifact_id = trial.user_attrs.get(records.CHECKPOINT_ARTIFACT)
    if artifact_id is None:
        raise LookupError(f"trial {trial.number} of study {study_name!r} has no checkpoint: "
                          + _no_checkpoint_reason(trial, study_name))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out) as partial:
            download_artifact(artifact_store=artifact_store, file_path=str(partial), artifact_id=artifact_id)
            checkpoint = load_checkpoint(partial)  # only a file that loads replaces ``out``
            _check_identity(checkpoint, trial, study_name)
            if drawing is not None and checkpoint.architecture is not None:
                # Drawn and written before the checkpoint takes its place: a failure leaves neither.
                svg = _picture_or_fix(lambda: architecture_svg(checkpoint.architecture,
                                                               title=f"{study_name} trial {trial.number}"))
                atomic_write(drawing, lambda file: file.write(svg))
    except ArtifactNotFound:
        raise LookupError(
            f"trial {trial.number}'s checkpoint (artifact {artifact_id}) is not in the artifact store "
            f"{getattr(artifact_store, '_base_path', '?')}; point $NAS3D_ARTIFACTS at the folder the "
            "workers wrote to"
        ) from None
    return trial, checkpoint


def _picture_or_fix(draw: Any) -> Any:
    """``draw()``, with Graphviz's absence (or failure) as the one-line error of ``--picture``."""
    try:
        return draw()
    except PictureUnavailable as e:
        raise ValueError(f"--picture: {e}, or drop --picture") from None


def _check_identity(checkpoint: Checkpoint, trial: FrozenTrial, study_name: str) -> None:
    """Refuse a stored checkpoint that is not this trial's: another trial's file, or another architecture."""
    recorded = (checkpoint.metadata.get("study"), checkpoint.metadata.get("trial"))
    if recorded != (study_name, trial.number):
        raise ValueError(f"the checkpoint stored for trial {trial.number} of study {study_name!r} records "
                         f"study {recorded[0]!r} trial {recorded[1]!r}; the artifact store is mixed up")
    arch = checkpoint.architecture
    if arch is None or arch.arch_hash() != trial.user_attrs.get(records.ARCH_HASH):
        raise ValueError(f"the checkpoint stored for trial {trial.number} of study {study_name!r} holds "
                         f"{checkpoint.recipe.describe()}, not the trial's "
                         f"{trial.user_attrs.get(records.ARCH)}")


def exported_line(study_name: str, number: int, out: Any, checkpoint: Any) -> str:
    """What ``nas3d export`` says about the checkpoint it wrote."""
    metrics = checkpoint.metadata.get("metrics", {})
    return (f"exported trial {number} of study {study_name!r} to {out}: {checkpoint.recipe.describe()}, "
            f"val_auc {metrics.get('val_auc', float('nan')):.4f}, {metrics.get('flops', 0) / 1e6:.1f} MFLOPs")


def export_trial(storage: Any, study_name: str, number: int, out: str | Path, overwrite: bool = False,
                 picture: bool = False, *, fmt: str | None = None, onnx: str | Path | None = None) -> str:
    """``nas3d export``: :func:`export_checkpoint` from ``storage`` (string or spec) and its
    artifact store, and the model as ONNX to ``onnx`` (or to ``out`` with ``fmt="onnx"``, the
    checkpoint then not kept); returns what to tell the user."""
    if fmt == "onnx":
        if onnx is not None:
            raise ValueError("--format onnx writes the ONNX file to --out; drop --onnx, or --format")
        onnx, out = out, None  # type: ignore[assignment]
    if out is None and onnx is None:
        raise ValueError("export needs --out FILE (the checkpoint), or --onnx FILE")
    if onnx is not None:
        check_out(onnx, overwrite, example="model.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        # The storage is opened read-only (it must exist) with the artifact store that goes with it.
        target = out if out is not None else Path(tmp) / f"trial-{number}.pt"
        trial, checkpoint = export_checkpoint(storage, None, study_name, number, target, overwrite=overwrite,
                                              picture=picture and out is not None)
        if onnx is not None:
            export_onnx(checkpoint, onnx)
    drawn = picture and out is not None and checkpoint.architecture is not None
    notes = f"; picture {Path(target).with_suffix(PICTURE_SUFFIX)}" if drawn else ""
    notes += f"; ONNX {onnx}" if onnx else ""
    return exported_line(study_name, trial.number, out if out is not None else onnx, checkpoint) + notes


def export_model(checkpoint_path: str | Path, out: str | Path | None, fmt: str | None,
                 onnx: str | Path | None, overwrite: bool = False) -> str:
    """``nas3d export --checkpoint FILE --format onnx --out model.onnx`` (or ``--onnx model.onnx``)."""
    if fmt not in (None, "onnx"):
        raise ValueError(f"a checkpoint file exports to ONNX only (--format onnx), not --format {fmt}")
    if out is not None and onnx is not None:
        raise ValueError("give the ONNX file once: --out model.onnx or --onnx model.onnx")
    target = out if out is not None else onnx
    if target is None:
        raise ValueError("--checkpoint needs --out model.onnx with --format onnx, or --onnx model.onnx")
    if out is not None and fmt is None:
        raise ValueError("export --checkpoint writes ONNX: add --format onnx (or give --onnx FILE)")
    check_out(target, overwrite, example="model.onnx")
    checkpoint = load_checkpoint(checkpoint_path)
    export_onnx(checkpoint, target)
    return (f"exported {checkpoint.recipe.describe()} from {checkpoint_path} to {target} (ONNX, input "
            f"(batch, {checkpoint.in_channels}, {checkpoint.input_size}, {checkpoint.input_size}, "
            f"{checkpoint.input_size}); classes {', '.join(checkpoint.class_names)})")


def export_command(flags: dict[str, Any], storage: Any) -> str:
    """``nas3d export`` by its flags: :func:`export_model` of a ``checkpoint`` file, else
    :func:`export_trial` of ``trial`` of ``study_name`` in ``storage``; what to tell the user."""
    if flags.get("checkpoint"):
        return export_model(flags["checkpoint"], flags.get("out"), flags.get("format"), flags.get("onnx"),
                            flags.get("force", False))
    if flags.get("trial") is None:
        raise ValueError("--study-name needs --trial N (the trial number `nas3d status` shows)")
    return export_trial(storage, flags["study_name"], flags["trial"], flags.get("out"),
                        flags.get("force", False), flags.get("picture", False), fmt=flags.get("format"),
                        onnx=flags.get("onnx"))


class _WithProbabilities(nn.Module):
    """The exported graph: logits and their softmax, so an ONNX user needs no post-processing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1)


#: ONNX opset of exported models (onnxruntime >= 1.14 runs it).
ONNX_OPSET = 17


def export_onnx(checkpoint: Checkpoint, path: str | Path) -> Path:
    """Write ``checkpoint``'s model as ONNX to ``path``, atomically: input ``input`` float32
    ``(batch, C, S, S, S)`` with a dynamic batch axis, outputs ``logits`` and ``probabilities``
    ``(batch, num_classes)``. The class names and preprocessing go into the model's metadata
    (``nas3d.classes``, ``nas3d.preprocessing``, JSON), and a binary model's decision threshold
    (``nas3d.threshold``: the positive class where its probability is above it), so the file is usable
    on its own."""
    import json

    import onnx



    model = _WithProbabilities(checkpoint.build("cpu")).eval()
    size = checkpoint.input_size
    example = torch.zeros(1, checkpoint.in_channels, size, size, size)
    with atomic_path(path) as partial, warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False): it needs only torch, exports a ResNet here in ~3 s
        # where the torch.export-based one took ~19 s and needs onnxscript; deprecated, not yet removed.
        warnings.simplefilter("ignore", DeprecationWarning)
        # InstanceNorm3d without running stats uses batch statistics in eval mode too; the exporter
        # warns that it exports it "with train=True", which is exactly that.
        warnings.filterwarnings("ignore", "ONNX export mode is set to TrainingMode.EVAL", UserWarning)
        # Shape checks inside InstanceNorm and F.interpolate, constant for a fixed volume size.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model, (example,), str(partial), dynamo=False, opset_version=ONNX_OPSET,
            input_names=["input"], output_names=["logits", "probabilities"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}},
        )
        graph = onnx.load(str(partial))
        for key, value in (("nas3d.classes", json.dumps(list(checkpoint.class_names))),
                           ("nas3d.preprocessing", json.dumps(checkpoint.preprocessing.to_dict())),
                           ("nas3d.model", checkpoint.recipe.describe()),
                           *([("nas3d.threshold", repr(checkpoint.threshold))] if checkpoint.binary else [])):
            graph.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(partial))
    return Path(path)
