"""The data errors: each carries a one-line message that names the problem and what to do."""

from __future__ import annotations


class DatasetUnavailable(ValueError):
    """The dataset file is not on disk and could not be downloaded."""


class DatasetCorrupt(ValueError):
    """The dataset file exists but is not the MedMNIST file it should be."""


class ManifestError(DatasetCorrupt):
    """A manifest (labels CSV) or a volume it names cannot be used; the message names the CSV row."""


class ManifestChanged(ManifestError):
    """The manifest's files are not those the study was created with."""
