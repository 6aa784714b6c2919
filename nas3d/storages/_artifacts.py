"""A study's artifact store (checkpoints, pictures): one location, recorded in the study.

A location is an absolute folder (``FileSystemArtifactStore``: local, or a filesystem every host
mounts at the same path) or ``s3://bucket[/prefix]`` (``optuna.artifacts.Boto3ArtifactStore``; the
endpoint and keys come from the usual AWS environment variables: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``). ``create_study`` records it
in the study's user attr :data:`nas3d.records.ARTIFACTS`; every worker, ``export``, ``retrain`` and the
dashboard open the study's store through :func:`study_artifact_store`, whatever folder they start in.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound

from nas3d import records
from nas3d.storages._spec import StorageSpec, _storage_file, resolve_storage, storage_home

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore
    from optuna.storages import BaseStorage

_logger = logging.getLogger("nas3d.storages")

S3_SCHEME = "s3://"

# optuna's upload_artifact types a file by its suffix, and the system's table (/etc/mime.types) calls
# ".pt" a SNES page table: a checkpoint is opaque bytes to anything but nas3d.
mimetypes.add_type("application/octet-stream", ".pt")


class ArtifactStoreUnavailable(ValueError):
    """The study's artifact store cannot be reached from here; the message is one line with the fix."""


def default_artifact_location(storage: str | StorageSpec | None = None) -> str:
    """Where a study's artifacts go when ``--artifacts`` is not given: ``$NAS3D_ARTIFACTS``, else
    ``artifacts/`` beside a SQLite or journal file, else ``<home>/artifacts``; absolute."""
    chosen = os.environ.get("NAS3D_ARTIFACTS", "").strip()
    if chosen:
        return chosen if chosen.startswith(S3_SCHEME) else str(Path(chosen).expanduser().resolve())
    base = _storage_file(resolve_storage(storage).url)
    return str((base.parent if base else storage_home()) / "artifacts")


def resolve_artifact_location(value: str | os.PathLike[str] | None, storage: str | StorageSpec | None) -> str:
    """The canonical location for ``--artifacts VALUE`` of a study in ``storage``.

    ``s3://bucket/prefix`` stays as given (without trailing slashes); a folder becomes absolute. A
    PostgreSQL study is shared by hosts whose working directories differ, so a relative folder is
    refused for it. Raises ``ValueError`` for a malformed value.
    """
    if value is None or not str(value).strip():
        return default_artifact_location(storage)
    text = str(value).strip()
    if text.startswith(S3_SCHEME):
        bucket, _, prefix = text[len(S3_SCHEME) :].partition("/")
        if not bucket:
            raise ValueError(f"--artifacts {text!r} names no bucket; write s3://BUCKET or s3://BUCKET/PREFIX")
        prefix = prefix.strip("/")
        return f"{S3_SCHEME}{bucket}/{prefix}" if prefix else f"{S3_SCHEME}{bucket}"
    if "://" in text:
        raise ValueError(f"--artifacts {text!r}: unsupported scheme; give a folder or s3://BUCKET/PREFIX")
    path = Path(text).expanduser()
    if not path.is_absolute() and resolve_storage(storage).kind == "postgresql":
        raise ValueError(
            f"--artifacts {text!r} is a relative folder, but a PostgreSQL study is shared by hosts whose "
            "working directories differ; give an absolute folder every host mounts, or s3://BUCKET/PREFIX"
        )
    return str(path.resolve())


def open_artifact_store(location: str) -> ArtifactStore:
    """The Optuna artifact store of a canonical location (nothing is contacted yet)."""
    if location.startswith(S3_SCHEME):
        bucket, _, prefix = location[len(S3_SCHEME) :].partition("/")
        return S3ArtifactStore(bucket, prefix)
    return FolderArtifactStore(location)


class FolderArtifactStore(FileSystemArtifactStore):
    """Optuna's folder store, whose writes leave a whole artifact or none.

    Optuna's own writes the artifact's final name directly, so a full disk leaves a 0-byte or cut
    file under an id the trial records. Here the bytes go to a hidden temporary name beside it,
    renamed once complete and removed on failure; the error names the artifact's path (a full disk's
    ``OSError`` names none).
    """

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        path = self._get_filepath(artifact_id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(content_body, f)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            # OSError(errno, ...) is the errno's subclass again (PermissionError, ...), with the path
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e

    def __repr__(self) -> str:
        return f"FolderArtifactStore({self._base_path})"


def artifact_write_errors() -> tuple[type[BaseException], ...]:
    """What a store's ``write`` raises when the store (not the caller) fails: an ``OSError`` for a
    folder, and botocore's errors for a bucket where boto3 is installed."""
    try:
        import botocore.exceptions
    except ImportError:
        return (OSError,)
    return (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


def describe_artifact_store(store: Any) -> str:
    """Where ``store`` writes, for a message: its folder or ``s3://bucket/prefix``."""
    if isinstance(store, S3ArtifactStore):
        return f"{S3_SCHEME}{store.bucket}/{store.prefix}".rstrip("/")
    base = getattr(store, "_base_path", None)
    return str(base) if base is not None else repr(store)


class S3ArtifactStore:
    """``Boto3ArtifactStore`` under a key prefix (Optuna's store writes at the bucket's root).

    The client is made from the AWS environment (endpoint, keys, region), as boto3 always does.
    """

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        from optuna.artifacts import Boto3ArtifactStore

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._store = Boto3ArtifactStore(bucket, client=client)
        self.client = self._store.client

    def _key(self, artifact_id: str) -> str:
        return f"{self.prefix}/{artifact_id}" if self.prefix else artifact_id

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self._store.open_reader(self._key(artifact_id))

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._store.write(self._key(artifact_id), content_body)

    def remove(self, artifact_id: str) -> None:
        self._store.remove(self._key(artifact_id))

    def __repr__(self) -> str:
        return f"S3ArtifactStore({S3_SCHEME}{self.bucket}/{self.prefix})"


def check_artifact_store(location: str) -> None:
    """Raise :class:`ArtifactStoreUnavailable` (one line) unless this process can write to ``location``.

    A folder must exist already: a recorded folder missing on this host means a shared mount is not
    mounted, and creating it would scatter checkpoints again. A bucket must answer ``HeadBucket``.
    """
    if not location.startswith(S3_SCHEME):
        path = Path(location)
        if not path.is_dir():
            raise ArtifactStoreUnavailable(
                f"the study's artifact folder {location} does not exist on this host; mount the shared "
                "folder there, or use a study whose --artifacts is s3://BUCKET/PREFIX"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise ArtifactStoreUnavailable(f"the study's artifact folder {location} is not writable here")
        return
    import boto3
    import botocore.config
    import botocore.exceptions

    bucket = location[len(S3_SCHEME) :].partition("/")[0]
    # A short probe: boto3's defaults (60 s connect timeout, retries) would make a typo'd endpoint
    # look like a hang instead of an error.
    config = botocore.config.Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2})
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
    try:
        boto3.client("s3", config=config).head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "?")
        raise ArtifactStoreUnavailable(
            f"cannot use the study's artifact bucket {bucket!r} at {endpoint} (S3 error {code}); create "
            "the bucket, or check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    except botocore.exceptions.BotoCoreError as e:
        reason = " ".join(str(e).split())
        raise ArtifactStoreUnavailable(
            f"cannot reach the study's artifact store {location} at {endpoint}: {reason}; set "
            "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for it"
        ) from None


def prepare_artifact_location(location: str) -> None:
    """Make a new study's artifact location usable: create its folder; check that its bucket answers."""
    if not location.startswith(S3_SCHEME):
        Path(location).mkdir(parents=True, exist_ok=True)
    check_artifact_store(location)


def study_artifact_location(storage: BaseStorage, study_name: str) -> str:
    """The artifact location recorded in study ``study_name`` (or, for a study created before
    locations were recorded, the default for this storage)."""
    study_id = storage.get_study_id_from_name(study_name)
    recorded = storage.get_study_user_attrs(study_id).get(records.ARTIFACTS)
    if recorded:
        return str(recorded)
    return default_artifact_location(getattr(storage, "url", None))


def study_artifact_store(storage: BaseStorage, study_name: str) -> ArtifactStore:
    """THE artifact store of study ``study_name``: every command that reads or writes its artifacts
    opens it here."""
    return open_artifact_store(study_artifact_location(storage, study_name))


class StorageArtifactStores:
    """The artifact stores of every study in a storage, as one store (for callers that know only the
    storage: the dashboard, and ``export`` before it asks for the study's store).

    Reads try each distinct recorded location (few: usually one) until one holds the artifact.
    Writes go to the only location, and are refused when studies disagree.
    """

    def __init__(self, storage_url: str | StorageSpec | None) -> None:
        self._spec = resolve_storage(storage_url)
        self._stores: list[tuple[str, ArtifactStore]] | None = None

    def locations(self) -> list[str]:
        return [location for location, _ in self._load()]

    def _load(self) -> list[tuple[str, ArtifactStore]]:
        if self._stores is None:
            from nas3d.storages._rdb import make_storage

            storage = make_storage(self._spec)
            found: list[str] = []
            for study in storage.get_all_studies():
                location = study.user_attrs.get(records.ARTIFACTS)
                if location and location not in found:
                    found.append(str(location))
            legacy = default_artifact_location(self._spec)
            if legacy not in found:
                found.append(legacy)  # studies created before locations were recorded
            self._stores = [(loc, open_artifact_store(loc)) for loc in found]
        return self._stores

    def open_reader(self, artifact_id: str) -> BinaryIO:
        for _, store in self._load():
            with contextlib.suppress(ArtifactNotFound, FileNotFoundError):
                return store.open_reader(artifact_id)
        raise ArtifactNotFound(f"artifact {artifact_id} is in none of {', '.join(self.locations())}")

    def _only(self) -> ArtifactStore:
        stores = self._load()
        recorded = stores if len(stores) == 1 else stores[:-1]
        if len(recorded) != 1:
            raise ValueError(
                f"studies in {self._spec} record different artifact stores ({', '.join(self.locations())}); "
                "open the one of your study with nas3d.storages.study_artifact_store"
            )
        location, store = recorded[0]
        if not location.startswith(S3_SCHEME):
            Path(location).mkdir(parents=True, exist_ok=True)
        return store

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._only().write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        for _, store in self._load():
            with contextlib.suppress(ArtifactNotFound, FileNotFoundError):
                store.remove(artifact_id)

    @property
    def _base_path(self) -> str:  # what `export` names in its not-found message
        return " or ".join(self.locations())


def artifact_store_for(
    storage_url: str | StorageSpec | None = None, path: str | os.PathLike[str] | None = None
) -> ArtifactStore:
    """An artifact store for a storage, for callers that do not know the study.

    ``path`` (or ``$NAS3D_ARTIFACTS``): that folder, created if missing. Otherwise the stores the
    storage's studies recorded (:class:`StorageArtifactStores`). Prefer :func:`study_artifact_store`.
    """
    chosen = path or os.environ.get("NAS3D_ARTIFACTS")
    if chosen and not str(chosen).startswith(S3_SCHEME):
        base = Path(chosen).expanduser().resolve()
        base.mkdir(parents=True, exist_ok=True)
        return FolderArtifactStore(base)
    if chosen:
        return open_artifact_store(resolve_artifact_location(chosen, storage_url))
    return StorageArtifactStores(storage_url)
