"""Where studies live: storage strings → one spec → Optuna storages, study locks, artifact stores.

Accepted storage strings (``--storage`` flag, else env ``NAS3D_STORAGE``, else the default):

- empty / None: SQLite file ``<home>/nas3d.db``; ``<home>`` is env ``NAS3D_HOME`` if set, else
  ``./storage`` relative to the current working directory (the repo's ``storage/`` folder when run
  from the repo root).
- ``sqlite:///path.db``: one host, a few workers. Crash recovery via heartbeat.
- ``postgresql://user@host:port/db`` (or ``postgresql+psycopg://``, ``postgres://``): several hosts.
  Rewritten to the psycopg 3 driver. Crash recovery via heartbeat.
- ``journal:path.log``: Optuna's JournalStorage on a file. Single host, no heartbeat: a worker killed
  mid-trial leaves a RUNNING trial behind for good.

Crash recovery (RDB only): the worker's heartbeat thread writes every ``heartbeat_interval`` seconds;
the next ``study.optimize`` on any worker fails trials silent for ``grace_period`` seconds and
re-queues them (``nas3d.records.fail_and_requeue``); such a trial gets a failure reason, its retry none.
nas3d workers run their own heartbeat thread around ask/tell (``nas3d.heartbeat``).

Outages: a worker's storage retries every call through transient database errors for
``$NAS3D_STORAGE_RETRY_WINDOW`` seconds (default 600). Artifacts: one store per study, recorded in
it (``nas3d.storages._artifacts``).
"""

from nas3d.storages._artifacts import (
    ArtifactStoreUnavailable,
    FolderArtifactStore,
    S3ArtifactStore,
    StorageArtifactStores,
    artifact_store_for,
    artifact_write_errors,
    check_artifact_store,
    default_artifact_location,
    describe_artifact_store,
    open_artifact_store,
    prepare_artifact_location,
    resolve_artifact_location,
    study_artifact_location,
    study_artifact_store,
)
from nas3d.storages._faults import StorageInvalid, StorageMissing, StorageUnavailable, retry_transient
from nas3d.storages._locks import StudyLock, study_lock
from nas3d.storages._rdb import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_RETRY,
    DEFAULT_RETRY_WINDOW_S,
    RETRY_WINDOW_ENV,
    grace_period_for,
    make_storage,
    storage_retry_window,
)
from nas3d.storages._spec import (
    ACCEPTED_FORMS,
    StorageSpec,
    redact_url,
    resolve_storage,
    resolve_storage_url,
    storage_home,
)

__all__ = [
    "ACCEPTED_FORMS",
    "ArtifactStoreUnavailable",
    "DEFAULT_RETRY_WINDOW_S",
    "RETRY_WINDOW_ENV",
    "S3ArtifactStore",
    "StorageArtifactStores",
    "FolderArtifactStore",
    "artifact_write_errors",
    "check_artifact_store",
    "default_artifact_location",
    "describe_artifact_store",
    "open_artifact_store",
    "prepare_artifact_location",
    "resolve_artifact_location",
    "grace_period_for",
    "storage_retry_window",
    "study_artifact_location",
    "study_artifact_store",
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_MAX_RETRY",
    "StorageSpec",
    "StorageInvalid",
    "StorageMissing",
    "StorageUnavailable",
    "StudyLock",
    "artifact_store_for",
    "make_storage",
    "redact_url",
    "resolve_storage",
    "resolve_storage_url",
    "retry_transient",
    "storage_home",
    "study_lock",
]
