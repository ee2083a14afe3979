"""Image folder trees as build entries: folder-per-class splits and flat folders with a labels file.

Why both layouts: ImageNet's train split is ``train/<wnid>/*.JPEG``, while its validation split
usually arrives flat (``val/ILSVRC2012_val_00000001.JPEG``) with a labels file. Class names are
the sorted folder names of the reference split (index = label), so train and val agree. Files
are listed, not read: reading and checking happen in the build workers. Files that have no
label are reported as skipped; hidden files (``.DS_Store``) are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

from asnn_dist.data.buildplan import Entry, make_key, unique_keys
from asnn_dist.data.errors import DataError


class FolderSource:
    """Reads entries whose ``ref`` is a path relative to ``root``."""

    def __init__(self, root: str) -> None:
        self.root = root

    def read(self, entry: Entry) -> bytes:
        with open(os.path.join(self.root, str(entry.ref)), "rb") as f:
            return f.read()

    def describe(self, entry: Entry) -> str:
        return os.path.join(self.root, str(entry.ref))


def _files(folder: Path) -> list[Path]:
    """Regular, non-hidden files under ``folder`` (recursively), sorted for a stable order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / n for n in sorted(filenames) if not n.startswith("."))
    return found


def _entries(root: Path, files: list[Path], labels: list[int]) -> list[Entry]:
    relative = [f.relative_to(root).as_posix() for f in files]
    keys = unique_keys([make_key(r) for r in relative])
    return [Entry(key=k, label=y, ref=r, size=f.stat().st_size)
            for k, y, r, f in zip(keys, labels, relative, files)]


def class_names(root: str) -> list[str]:
    """Sorted names of the class folders in ``root``; DataError when there are none."""
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"{root}: folder not found; pass the folder that holds one sub-folder per class")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{root}: no class folders inside; expected <root>/<class>/<image files>")
    return names


def scan_class_folders(root: str, classes: list[str] | None = None) -> tuple[list[str], list[Entry]]:
    """(classes, entries) of a folder-per-class tree; ``classes`` fixes the label order."""
    found = class_names(root)
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(
            f"{root}: class folders {unknown[:5]} are not among the {len(classes)} known classes; "
            "build the split with the class list of the training split"
        )
    folder = Path(root)
    files: list[Path] = []
    labels: list[int] = []
    for name in found:
        these = _files(folder / name)
        files.extend(these)
        labels.extend([classes.index(name)] * len(these))
    return classes, _entries(folder, files, labels)


def _stem(name: str) -> str:
    """File name without folder and extension: labels files name files with or without both."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def read_labels_file(path: str, classes: list[str]) -> dict[str, int]:
    """File stem -> class index from a labels file.

    One sample per line, ``<file name> <class>`` separated by whitespace or a comma; ``<class>``
    is a class name (e.g. a WordNet id such as ``n01440764``) or a 0-based class index. Extra
    fields after the class are ignored (so Kaggle's ``LOC_val_solution.csv`` works), as are a
    header line, blank lines and ``#`` comments.
    """
    index = {name: i for i, name in enumerate(classes)}
    labels: dict[str, int] = {}
    header_seen = False
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exn:
        raise DataError(f"{path}: cannot read the labels file ({exn.strerror or exn})") from None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.replace(",", " ").split()
        if len(fields) < 2:
            raise DataError(f"{path}:{number}: expected '<file name> <class>', got {text!r}")
        name, cls = fields[0], fields[1]
        if cls in index:
            label = index[cls]
        elif cls.isdigit() and int(cls) < len(classes):
            label = int(cls)
        elif not labels and not header_seen:
            header_seen = True  # a header line such as "ImageId,PredictionString"
            continue
        else:
            raise DataError(
                f"{path}:{number}: class {cls!r} is neither one of the {len(classes)} class names "
                f"nor an index 0..{len(classes) - 1}; check the labels file matches the classes"
            )
        labels[_stem(name)] = label
    if not labels:
        raise DataError(f"{path}: no labels found; expected lines '<file name> <class>'")
    return labels


def scan_flat_folder(root: str, labels_file: str, classes: list[str]) -> tuple[list[Entry], list[str]]:
    """(entries, problems) of a flat image folder labelled by ``labels_file``.

    Files without a line in the labels file are left out and listed in ``problems``.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"{root}: folder not found; pass the folder with the validation images")
    labels = read_labels_file(labels_file, classes)
    files: list[Path] = []
    found: list[int] = []
    problems: list[str] = []
    for f in _files(folder):
        stem = _stem(f.name)
        if stem in labels:
            files.append(f)
            found.append(labels[stem])
        else:
            problems.append(f"{f}: no label in {labels_file}")
    if not files:
        raise DataError(f"{root}: none of the files has a label in {labels_file}; check both paths")
    return _entries(folder, files, found), problems


def has_class_folders(root: str) -> bool:
    """Whether ``root`` holds class sub-folders (else it is a flat folder of images)."""
    return any(p.is_dir() and not p.name.startswith(".") for p in Path(root).iterdir())
