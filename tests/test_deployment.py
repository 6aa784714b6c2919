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
    assert set(services) == {"postgres", "dashboard", "worker"}
    for name in ("dashboard", "worker"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_dashboard_and_database_bind_to_loopback_only() -> None:
    services = compose()["services"]
    for name in ("dashboard", "postgres"):
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
    worker_artifacts = services["worker"]["environment"]["NAS3D_ARTIFACTS"]
    assert any(v.split(":")[1] == worker_artifacts for v in services["worker"]["volumes"])
    assert "--artifact-dir /artifacts" in services["dashboard"]["command"]
    assert "artifacts" in compose()["volumes"]


def test_worker_gets_gpus_and_stops_gracefully() -> None:
    worker = compose()["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert worker["stop_signal"] == "SIGTERM"
    assert worker["command"][0] == "launch"
    assert (REPO / "Dockerfile").exists() and worker["build"] == "."
    assert 'ENTRYPOINT ["nas3d"]' in (REPO / "Dockerfile").read_text()
