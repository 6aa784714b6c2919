"""The artifact store (checkpoints, pictures) that goes with a storage."""

from __future__ import annotations

import os
from pathlib import Path

from optuna.artifacts import FileSystemArtifactStore

from nas3d.storages._spec import StorageSpec, _storage_file, resolve_storage, storage_home


def artifact_store_for(
    storage_url: str | StorageSpec | None = None, path: str | os.PathLike[str] | None = None
) -> FileSystemArtifactStore:
    """The artifact store (checkpoints, configs) that goes with a storage.

    ``path``, else ``$NAS3D_ARTIFACTS``, else ``artifacts/`` beside a SQLite or journal file,
    else ``<home>/artifacts`` (PostgreSQL: point it at a folder every host shares). Created if missing.
    """
    chosen = path or os.environ.get("NAS3D_ARTIFACTS")
    if chosen:
        base = Path(chosen).expanduser().resolve()
    else:
        base = _storage_file(resolve_storage(storage_url).url)
        base = (base.parent if base else storage_home()) / "artifacts"
    base.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base)

