"""Content hashes of a manifest's files, cached by (path, size, mtime) in the process and, in the
manifest's cache folder (``hashes.json``), across processes: a worker starting on 10,000 volumes
hashes only the files that changed since any process last hashed them."""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path

from nas3d.data.errors import ManifestError
from nas3d.data.manifest import Manifest
from nas3d.util import atomic_write

HASHES_FILE = "hashes.json"

logger = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) for the life of the process."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=65536)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class StoredHashes:
    """sha256 of files kept in ``folder/hashes.json`` as ``{path: [size, mtime_ns, sha256]}``.

    An entry is used only while its file has the size and modification time it had when hashed, as
    for the in-process cache; any other file is hashed again. Processes that write at once each
    replace the file whole (atomically), so the worst case is a few hashes computed again later.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / HASHES_FILE
        self.changed = False
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            entries = {}  # none yet, or damaged: every file is hashed once more
        self.entries: dict[str, list] = entries if isinstance(entries, dict) else {}

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = str(path)
        entry = self.entries.get(key)
        if (isinstance(entry, list) and len(entry) == 3 and entry[:2] == [stat.st_size, stat.st_mtime_ns]
                and isinstance(entry[2], str)):
            return entry[2]
        digest = _sha256(key, stat.st_size, stat.st_mtime_ns)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        """Write the entries back when a file was hashed; a read-only data folder only costs the time."""
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(exist_ok=True)
            atomic_write(self.path, lambda file: file.write(json.dumps(self.entries).encode()))
        except OSError as e:
            logger.warning("could not cache file hashes in %s (%s); they are computed again next time",
                           self.path.parent, e.strerror or e)
        self.changed = False


def manifest_hashes(
    manifest: Manifest, stored: StoredHashes | None = None
) -> tuple[str, tuple[tuple[str, ...], ...]]:
    """The manifest's content hash (its CSV and every volume, in row order) and each row's volume
    hashes. A missing or unreadable volume is a one-line error naming its CSV row.

    Hashes are kept across processes in the manifest's cache folder: saved here, or, when ``stored``
    is given, added to it for the caller to save once the data has passed its checks (bad data
    leaves nothing behind)."""
    own = stored is None
    stored = StoredHashes(manifest.cache) if stored is None else stored
    digest = hashlib.sha256(b"nas3d-manifest/1\0")
    digest.update(stored.sha256(manifest.path).encode())
    per_row = []
    for row in manifest.rows:
        hashes = []
        for cell, image in zip(row.cells, row.images, strict=True):
            try:
                hashes.append(stored.sha256(image))
            except FileNotFoundError:
                raise ManifestError(f"{manifest.where(row)}: volume {cell!r} not found ({image})") from None
            except OSError as e:
                raise ManifestError(f"{manifest.where(row)}: volume {cell!r} is not readable "
                                    f"({e.strerror or type(e).__name__}: {image})") from None
            digest.update(hashes[-1].encode())
        per_row.append(tuple(hashes))
    if own:
        stored.save()
    return digest.hexdigest(), tuple(per_row)
