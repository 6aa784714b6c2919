"""A manifest: a labels CSV naming the user's volumes (see docs/own-data.md), parsed and checked row
by row, so every problem is one line that names its CSV line."""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nas3d.data.errors import DatasetUnavailable, ManifestError
from nas3d.data.splits import SPLITS
from nas3d.util import did_you_mean, one_line

CACHE_DIR = ".nas3d-cache"  # beside the CSV: prepared samples and file hashes
_IMAGE_COLUMN = re.compile(r"image(?:_(\d+))?")


def is_manifest(dataset: str) -> bool:
    """Whether ``dataset`` names a manifest (any value ending in ``.csv``) rather than a MedMNIST flag."""
    return dataset.lower().endswith(".csv")


@dataclass(frozen=True)
class ManifestRow:
    """One sample of a manifest: its CSV line (the header is line 1), its volumes, label and split."""

    line: int
    cells: tuple[str, ...]  # the image cells as written
    images: tuple[Path, ...]  # resolved against the CSV's folder
    label: str | None
    split: str | None


@dataclass(frozen=True)
class Manifest:
    path: Path
    image_columns: tuple[str, ...]
    rows: tuple[ManifestRow, ...]
    has_split: bool

    def where(self, row: ManifestRow) -> str:
        return f"{self.path} line {row.line}"

    @property
    def cache(self) -> Path:
        """The folder of the manifest's caches."""
        return self.path.parent / CACHE_DIR


def read_manifest(path: str | os.PathLike[str], *, labels: bool = True) -> Manifest:
    """Parse a manifest CSV (columns ``image``, ``image_2``, ..., ``label``, optional ``split``; other
    columns are ignored). ``labels=False`` (prediction) makes ``label`` optional. One-line
    :class:`ManifestError` for a missing file, missing columns, empty cells or an unknown split."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetUnavailable(f"manifest {path} not found; give the labels CSV's path (--dataset "
                                 "labels.csv), the same on every host") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {path} is not a readable UTF-8 CSV ({type(e).__name__}: "
                            f"{one_line(e, 120)})") from None
    try:
        table = list(csv.reader(text.splitlines()))
    except csv.Error as e:
        raise ManifestError(f"manifest {path} is not a valid CSV ({one_line(e)})") from None
    header = [h.strip() for h in table[0]] if table else []
    numbered = {}
    for index, name in enumerate(header):
        match = _IMAGE_COLUMN.fullmatch(name)
        if match:
            numbered[int(match.group(1) or 1)] = index
    needed = ("image", "label") if labels else ("image",)
    if any(name not in header for name in needed) or 1 not in numbered:
        raise ManifestError(
            f"manifest {path} needs the columns {', '.join(map(repr, needed))} (optional: 'split', and "
            f"'image_2', ... for more channels), but its header is {header!r}"
        )
    columns = tuple(sorted(numbered))
    if columns != tuple(range(1, len(columns) + 1)):
        raise ManifestError(f"manifest {path}: image columns must be image, image_2, image_3, ... without "
                            f"gaps, but got {[header[numbered[c]] for c in columns]}")
    label_at = header.index("label") if "label" in header else None
    split_at = header.index("split") if "split" in header else None
    rows = []
    for line, values in enumerate(table[1:], start=2):
        if not any(v.strip() for v in values):
            continue  # a blank line
        padded = [v.strip() for v in values] + [""] * (len(header) - len(values))

        def cell(i: int | None, padded: list[str] = padded) -> str:
            return padded[i] if i is not None else ""

        where = f"{path} line {line}"
        cells = tuple(cell(numbered[c]) for c in columns)
        for c, value in zip(columns, cells, strict=True):
            if not value:
                raise ManifestError(f"{where}: the {header[numbered[c]]!r} cell is empty")
        label = cell(label_at) if label_at is not None else None
        if label_at is not None and not label and labels:
            raise ManifestError(f"{where}: the 'label' cell is empty")
        split = cell(split_at).lower() if split_at is not None else None
        if split_at is not None and split not in SPLITS:
            raise ManifestError(f"{where}: split {cell(split_at)!r} is not one of {', '.join(SPLITS)}")
        images = tuple(Path(v).expanduser() if Path(v).expanduser().is_absolute() else path.parent / v
                       for v in cells)
        rows.append(ManifestRow(line, cells, images, _canonical_label(label) if label else None, split))
    if not rows:
        raise ManifestError(f"manifest {path} has a header but no rows")
    image_columns = tuple(header[numbered[c]] for c in columns)
    return Manifest(path, image_columns, tuple(rows), split_at is not None)


def _canonical_label(text: str) -> str:
    """An integer label in one spelling ("01" and "1" are one class); a name as written."""
    try:
        return str(int(text))
    except ValueError:
        return text


#: Labels that read as the negative class of a binary task (compared in lower case).
NEGATIVE_NAMES = frozenset({"normal", "healthy", "benign", "negative", "neg", "control", "controls", "absent",
                            "no", "none", "false", "non-disease", "nondisease", "no_finding", "no finding"})


def sorted_classes(labels: set[str]) -> tuple[str, ...]:
    """A manifest's labels in a stable order: integers numerically (0..K-1 stay themselves), else names
    alphabetically."""
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def class_order(
    manifest: Manifest, classes: tuple[str, ...] = (), positive: str = ""
) -> tuple[tuple[str, ...], str, str]:
    """The class names in index order, the positive class of a binary task ("" otherwise) and, when
    nas3d chose it by the rule below, why (else ""). One-line :class:`ManifestError` for a label
    that is not a class, naming its CSV line and the class it is closest to.

    ``classes`` (``data.classes``) gives the order, its second class positive. Else the manifest's
    labels are the classes; for a binary task the positive class (the second) is ``positive``
    (``data.positive_class``), else by this rule: of integer labels the higher; of names, the one
    that is not a negative-sounding name (:data:`NEGATIVE_NAMES`: normal, healthy, benign, ...);
    else the rarer class (the finding a screen looks for), and of two as common the alphabetically
    later one. Multi-class labels keep :func:`sorted_classes`' order."""
    counts = Counter(row.label for row in manifest.rows if row.label is not None)
    given = bool(classes)
    if given:
        for row in manifest.rows:
            if row.label not in classes:
                raise ManifestError(f"{manifest.where(row)}: label {row.label!r} is not one of the classes "
                                    f"{list(classes)} (data.classes){_near(row.label, classes)}")
    else:
        for row in manifest.rows:  # a label on one or two rows next to a common one is a typo
            label = row.label or ""
            near = did_you_mean(label, [c for c in counts if c != label and counts[c] > 2 * counts[label]])
            if counts[label] <= 2 and near:
                raise ManifestError(f"{manifest.where(row)}: label {label!r} is on {counts[label]} row(s) "
                                    f"only (a class needs 3); did you mean {near!r}?")
        classes = sorted_classes(set(counts))
    if len(classes) < 2:
        raise ManifestError(f"manifest {manifest.path}: every row has label {classes[0]!r}; a "
                            "classifier needs at least two classes")
    if positive and positive not in classes:
        raise ManifestError(f"data.positive_class {positive!r} is not one of the labels {list(classes)}"
                            f"{_near(positive, classes)}")
    if len(classes) != 2:
        if positive:
            raise ManifestError(f"data.positive_class is for a binary task, but manifest {manifest.path} has "
                                f"{len(classes)} classes; drop it")
        return classes, "", ""
    if given:
        if positive and positive != classes[1]:
            raise ManifestError(f"data.positive_class {positive!r} is the first of data.classes "
                                f"{list(classes)}; the second is the positive one: swap them, or drop one")
        return classes, classes[1], ""
    if positive:
        return (classes[0] if classes[1] == positive else classes[1], positive), positive, ""
    first, second = classes
    if all(re.fullmatch(r"-?\d+", c) for c in classes):
        return classes, second, f"of integer labels, the higher is positive; {first!r} is negative"
    negative = [c for c in classes if c.strip().lower() in NEGATIVE_NAMES]
    if len(negative) == 1:
        chosen = second if negative[0] == first else first
        return (negative[0], chosen), chosen, f"{negative[0]!r} reads as the negative class"
    if counts[first] != counts[second]:
        chosen = min(classes, key=lambda c: counts[c])
        other = first if chosen == second else second
        return (other, chosen), chosen, (f"the rarer class: {counts[chosen]} rows against {counts[other]}; "
                                          "neither name reads as negative")
    return classes, second, "the alphabetically later of two classes as common, neither name negative"


def _near(value: str | None, valid: tuple[str, ...]) -> str:
    close = did_you_mean(value or "", valid)
    return f"; did you mean {close!r}?" if close else ""
