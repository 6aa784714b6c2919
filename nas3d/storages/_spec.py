"""Storage strings: the accepted forms, the default home, and their one resolution into a spec."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

ACCEPTED_FORMS = (
    "'' (default SQLite under $NAS3D_HOME or ./storage), 'sqlite:///path.db', "
    "'postgresql://user@host:port/db', 'postgresql+psycopg://...', 'journal:path.log'"
)
_PG_PREFIXES = ("postgresql://", "postgres://", "postgresql+psycopg://")


def storage_home() -> Path:
    """The folder for the default database and artifacts: ``$NAS3D_HOME``, else ``./storage``."""
    return Path(os.environ.get("NAS3D_HOME") or "storage").expanduser().resolve()


def resolve_storage_url(explicit: str | StorageSpec | None) -> str:
    """The canonical storage string for ``explicit``, else ``$NAS3D_STORAGE``, else the default.

    PostgreSQL URLs get the psycopg 3 driver; journal paths become absolute. Nothing is created here
    (opening the storage creates its file). Raises a one-line ``ValueError`` for a malformed or
    unsupported string, before anything is written.
    """
    if isinstance(explicit, StorageSpec):
        return explicit.url
    value = (explicit or "").strip() or os.environ.get("NAS3D_STORAGE", "").strip()
    if not value:
        return f"sqlite:///{storage_home() / 'nas3d.db'}"
    if value.startswith("sqlite:"):
        return _check_sqlite(value)
    if value.startswith(_PG_PREFIXES):
        return _check_postgresql("postgresql+psycopg://" + value.split("://", 1)[1], value)
    if value.startswith("journal:") and value[len("journal:") :].strip():
        return "journal:" + str(Path(value[len("journal:") :].strip()).expanduser().resolve())
    raise ValueError(f"unsupported storage {redact_url(value)!r}; accepted forms: {ACCEPTED_FORMS}")


def _check_sqlite(value: str) -> str:
    # sqlite://name.db parses as host "name.db" and an in-memory database: every study would vanish
    # when the process exits. A file needs three slashes (four for an absolute path).
    path = value.removeprefix("sqlite:").lstrip("/")
    if not value.startswith("sqlite:///") or not path or path == ":memory:":
        example = f"sqlite:///{path or 'nas3d.db'}"
        raise ValueError(
            f"storage {value!r} names no database file; a SQLite URL has three slashes before a relative "
            f"path ({example}) and four before an absolute one (sqlite:////abs/path/nas3d.db)"
        )
    return value


def _check_postgresql(url: str, given: str) -> str:
    form = "postgresql://user[:password]@host[:port]/database"
    try:
        parsed = make_url(url)
        port = parsed.port  # a non-numeric port fails here, as int()
    except Exception:
        raise ValueError(f"storage {_redact_text(given)!r} is not a PostgreSQL URL; expected {form}"
                         ) from None
    if not parsed.host or not parsed.database:
        missing = "host" if not parsed.host else "database name"
        raise ValueError(f"storage {redact_url(url)!r} has no {missing}; expected {form}")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"storage {redact_url(url)!r}: port {port} is outside 1-65535; expected {form}")
    return url


def _redact_text(value: str) -> str:
    """``value`` with any password between ``://user:`` and ``@`` masked, for URLs that do not parse."""
    scheme, sep, rest = value.partition("://")
    credentials, at, host = rest.rpartition("@")
    if sep and at and ":" in credentials:
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return value


def redact_url(value: str) -> str:
    try:
        return make_url(value).render_as_string(hide_password=True)
    except Exception:
        return value


def _storage_file(url: str) -> Path | None:
    if url.startswith("journal:"):
        return Path(url[len("journal:") :])
    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite" and sa_url.database not in (None, "", ":memory:"):
        return Path(sa_url.database).expanduser().resolve()
    return None


@dataclass(frozen=True)
class StorageSpec:
    """A storage string resolved once: what workers and commands pass around.

    ``url`` is canonical (psycopg 3 driver, absolute journal path); ``kind`` is ``"sqlite"``,
    ``"postgresql"`` or ``"journal"``.
    """

    url: str

    @property
    def kind(self) -> str:
        if self.url.startswith("journal:"):
            return "journal"
        return "postgresql" if self.url.startswith("postgresql") else "sqlite"

    @property
    def file(self) -> Path | None:
        """The database or journal file, for the embedded kinds."""
        return _storage_file(self.url)

    @property
    def redacted(self) -> str:
        return redact_url(self.url)

    def __str__(self) -> str:
        return self.redacted


def resolve_storage(explicit: str | StorageSpec | None) -> StorageSpec:
    """The :class:`StorageSpec` of ``--storage`` (else ``$NAS3D_STORAGE``, else the default)."""
    if isinstance(explicit, StorageSpec):
        return explicit
    return StorageSpec(resolve_storage_url(explicit))
