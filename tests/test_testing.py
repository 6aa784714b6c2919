"""nas3d.testing: the scratch storages that the fixtures and the benchmarks share."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from nas3d.testing.storages import connect, psycopg_url, scratch_storage, temporary_database


def test_psycopg_url_normalises_postgres_schemes_and_names_the_source_of_a_bad_one() -> None:
    for url in ("postgres://u@h:5/db", "postgresql://u@h:5/db", "postgresql+psycopg2://u@h:5/db"):
        assert psycopg_url(url) == "postgresql+psycopg://u@h:5/db"
    with pytest.raises(ValueError, match=r"--postgres-url must be a postgresql:// URL, but got 'mysql://h/db'"):
        psycopg_url("mysql://h/db", "--postgres-url")


def test_scratch_storage_rejects_unknown_backends(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'mysql'; valid: sqlite, postgresql"):
        with scratch_storage("mysql", tmp_path):
            pass
    with pytest.raises(ValueError, match="needs the server's URL"):
        with scratch_storage("postgresql", tmp_path):
            pass


def test_sqlite_scratch_storages_are_fresh_files_in_the_workdir(tmp_path: Path) -> None:
    with scratch_storage("sqlite", tmp_path, name_prefix="x_") as a, scratch_storage("sqlite", tmp_path) as b:
        assert a != b
        for url in (a, b):
            path = Path(make_url(url).database)
            assert path.parent == tmp_path and not path.exists()
        assert Path(make_url(a).database).name.startswith("x_")


def test_temporary_database_is_dropped_even_with_a_connection_left_open(postgres_server: str) -> None:
    def exists(name: str) -> bool:
        with connect(postgres_server) as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            return row is not None

    with temporary_database(postgres_server, "nas3d_test_tmp_") as url:
        name = make_url(url).database
        assert name.startswith("nas3d_test_tmp_") and exists(name)
        left_open = connect(url)  # as a test's pooled engine or a killed worker would leave it
        assert left_open.execute("SELECT current_database()").fetchone() == (name,)
    assert not exists(name)
    left_open.close()
