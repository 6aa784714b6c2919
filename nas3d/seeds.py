"""The architectures the seed study published, carried in the package as data."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from nas3d.architecture import Architecture

_ARCH_KEYS = ("stacks", "cells_per_stack", "initial_filters", "ops", "edges")


@cache
def seed_document() -> dict[str, Any]:
    """The raw seed-architectures document (``about``, ``ops_order_in_seed``, ``architectures``)."""
    return json.loads((Path(__file__).parent / "resources" / "seed_architectures.json").read_text())


def seed_architectures() -> dict[str, Architecture]:
    """The seed study's best architecture per dataset flag, e.g. ``{"organmnist3d": ...}``."""
    return {
        entry["dataset"]: Architecture.from_dict({k: entry[k] for k in _ARCH_KEYS})
        for entry in seed_document()["architectures"]
    }
