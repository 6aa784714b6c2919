"""docker-compose.yml, checked by structure (no Docker engine here)."""

from __future__ import annotations

from pathlib import Path

import yaml

from nas3d.storages import resolve_storage_url

REPO = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_and_their_wiring() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "s3", "dashboard", "worker"}
    for name in ("dashboard", "worker"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_dashboard_and_database_bind_to_loopback_only() -> None:
    services = compose()["services"]
    for name in ("dashboard", "postgres", "s3"):
        for port in services[name]["ports"]:
            assert port.startswith("127.0.0.1:"), (name, port)


def test_worker_storage_matches_the_database_and_shares_artifacts() -> None:
    services = compose()["services"]
    env = services["postgres"]["environment"]
    url = services["worker"]["environment"]["NAS3D_STORAGE"]
    expected = f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/"
    assert url == expected + env["POSTGRES_DB"]
    assert resolve_storage_url(url) == url
    assert url in services["dashboard"]["command"]


def test_workers_and_dashboard_share_the_s3_artifact_store() -> None:
    services = compose()["services"]
    worker, dashboard, s3 = services["worker"]["environment"], services["dashboard"], services["s3"]
    bucket = worker["NAS3D_ARTIFACTS"].removeprefix("s3://")
    assert worker["NAS3D_ARTIFACTS"] == f"s3://{bucket}" and "/" not in bucket  # the dashboard reads the root
    assert f"-bucket={bucket}" in s3["command"]  # created when the server starts
    port = next(p.split("=")[1] for p in s3["command"].split() if p.startswith("-s3.port="))
    assert worker["AWS_ENDPOINT_URL"] == f"http://s3:{port}" == dashboard["environment"]["AWS_ENDPOINT_URL"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert worker[key] == s3["environment"][key] == dashboard["environment"][key]
    assert f'bucket_name = \\"{bucket}\\"' in dashboard["command"] and "--from-config" in dashboard["command"]
    assert "s3data" in compose()["volumes"]


def test_worker_gets_gpus_and_stops_gracefully() -> None:
    worker = compose()["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert worker["stop_signal"] == "SIGTERM"
    assert worker["command"][0] == "launch"
    assert (REPO / "Dockerfile").exists() and worker["build"] == "."
    assert 'ENTRYPOINT ["nas3d"]' in (REPO / "Dockerfile").read_text()
