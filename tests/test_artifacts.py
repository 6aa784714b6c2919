"""One artifact store per study: recorded at creation, checked by workers, folder or S3 (real SeaweedFS)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from nas3d import records
from nas3d.storages import (
    ArtifactStoreUnavailable,
    S3ArtifactStore,
    artifact_store_for,
    check_artifact_store,
    make_storage,
    resolve_artifact_location,
    study_artifact_location,
    study_artifact_store,
)
from nas3d.study import create_study
from nas3d.testing.servers import free_port as _free_port
from tests.test_study import smoke_config


def test_a_study_records_one_absolute_artifact_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'nas3d.db'}"
    storage = make_storage(url)
    study = create_study(smoke_config(tmp_path, **{"study.name": "default"}), storage)
    assert study.user_attrs[records.ARTIFACTS] == str(tmp_path / "db" / "artifacts")  # beside the file

    monkeypatch.chdir(tmp_path)
    create_study(smoke_config(tmp_path, **{"study.name": "rel"}), storage, artifacts="shared/art")
    assert study_artifact_location(storage, "rel") == str(tmp_path / "shared" / "art")
    assert (tmp_path / "shared" / "art").is_dir()  # created with the study
    # every later command finds it, whatever folder it starts in
    monkeypatch.chdir(tmp_path / "db")
    assert study_artifact_store(storage, "rel")._base_path == tmp_path / "shared" / "art"
    create_study(smoke_config(tmp_path, **{"study.name": "rel"}), storage)  # reused as recorded
    with pytest.raises(ValueError, match=r"already exists with its artifacts in .*shared/art, not"):
        create_study(smoke_config(tmp_path, **{"study.name": "rel"}), storage, artifacts=str(tmp_path / "x"))


def test_artifact_locations_are_canonical_and_bad_ones_refused() -> None:
    pg = "postgresql://u@h/db"
    assert resolve_artifact_location("s3://bkt/a/b/", pg) == "s3://bkt/a/b"
    assert resolve_artifact_location("s3://bkt", pg) == "s3://bkt"
    assert resolve_artifact_location("/srv/nas3d", pg) == "/srv/nas3d"
    with pytest.raises(ValueError, match="names no bucket"):
        resolve_artifact_location("s3:///prefix", pg)
    with pytest.raises(ValueError, match="unsupported scheme"):
        resolve_artifact_location("gs://bkt", pg)


def test_a_postgresql_study_refuses_a_relative_artifact_folder(postgres_url: str, tmp_path: Path) -> None:
    storage = make_storage(postgres_url)
    config = smoke_config(tmp_path, **{"study.name": "pg-relative"})
    with pytest.raises(ValueError, match=r"'art' is a relative folder, but a PostgreSQL study is shared"):
        create_study(config, storage, artifacts="art")
    assert "pg-relative" not in [s.study_name for s in storage.get_all_studies()]  # nothing created


@pytest.mark.slow  # a `nas3d` subprocess: seconds of imports under load
def test_a_worker_that_cannot_reach_the_store_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nas3d.db'}"
    create_study(smoke_config(tmp_path, **{"study.name": "gone"}), make_storage(url),
                 artifacts=str(tmp_path / "mount"))
    (tmp_path / "mount").rmdir()  # the shared folder is not mounted on this host
    result = subprocess.run(
        [sys.executable, "-m", "nas3d", "worker", "--study-name", "gone", "--storage", url],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("nas3d: error")]
    assert errors == [
        f"nas3d: error: the study's artifact folder {tmp_path / 'mount'} does not exist on this host; mount "
        "the shared folder there, or use a study whose --artifacts is s3://BUCKET/PREFIX"
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_s3_artifacts_under_a_prefix_on_a_real_s3_server(s3_bucket: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nas3d.db'}"
    storage = make_storage(url)
    study = create_study(smoke_config(tmp_path), storage, artifacts=f"s3://{s3_bucket}/studies/smoke/")
    assert study.user_attrs[records.ARTIFACTS] == f"s3://{s3_bucket}/studies/smoke"
    store = study_artifact_store(storage, study.study_name)
    assert isinstance(store, S3ArtifactStore)
    trial = study.ask()
    (tmp_path / "blob.bin").write_bytes(b"weights")
    artifact_id = optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(tmp_path / "blob.bin"), study_or_trial=trial
    )
    keys = [o["Key"] for o in store.client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == [f"studies/smoke/{artifact_id}"]
    # a caller that knows only the storage (export, the dashboard) finds it too
    with artifact_store_for(url).open_reader(artifact_id) as f:
        assert f.read() == b"weights"
    with pytest.raises(ArtifactStoreUnavailable, match="S3 error 404"):
        check_artifact_store(f"s3://{s3_bucket}-missing")


def test_an_unreachable_s3_endpoint_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, "x")
    with pytest.raises(ArtifactStoreUnavailable) as caught:
        check_artifact_store("s3://bkt/p")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot reach the study's artifact store s3://bkt/p at http://127.0.0.1:")


def test_the_storage_wide_store_reads_every_recorded_location(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nas3d.db'}"
    storage = make_storage(url)
    ids = {}
    for name in ("a", "b"):
        study = create_study(smoke_config(tmp_path, **{"study.name": name}), storage,
                             artifacts=str(tmp_path / f"art-{name}"))
        (tmp_path / f"{name}.bin").write_bytes(name.encode())
        ids[name] = optuna.artifacts.upload_artifact(
            artifact_store=study_artifact_store(storage, name), file_path=str(tmp_path / f"{name}.bin"),
            study_or_trial=study.ask(),
        )
    store = artifact_store_for(url)
    for name, artifact_id in ids.items():
        with store.open_reader(artifact_id) as f:
            assert f.read() == name.encode()
    with pytest.raises(ValueError, match="record different artifact stores"):
        store.write("x", open(os.devnull, "rb"))  # noqa: SIM115
