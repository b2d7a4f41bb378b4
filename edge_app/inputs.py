"""The image inputs of `predict`, `validate` and `bench`: files as given, folders searched recursively.

In a folder an image is a file named like one (IMAGE_SUFFIXES) or a DICOM file whatever its name
(the 'DICM' magic after the 128-byte preamble: PACS exports are often extensionless). Other files
are returned as skipped, so that a caller can say so; hidden files and folders are ignored.
A file named on the command line is always taken: whether it is an image is decode's call.
"""
from __future__ import annotations

import os
from pathlib import Path

from edge_app.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".dcm", ".dicom")


def collect(paths) -> tuple[list[str], list[str]]:
    """(images, skipped files) for files and folders, in the order given, each folder sorted.

    A folder without a single image raises InputError("no_images")."""
    images, skipped = [], []
    for path in map(Path, paths):
        if not path.is_dir():
            images.append(str(path))
            continue
        found = 0
        for file in _files_under(path):
            if file.suffix.lower() in IMAGE_SUFFIXES or _has_dicom_magic(file):
                images.append(str(file))
                found += 1
            else:
                skipped.append(str(file))
        if not found:
            raise InputError("no_images", "no image files (JPEG, PNG, DICOM, ...) in this folder", path)
    return images, skipped


def _files_under(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root, n) for n in sorted(names) if not n.startswith(".")]
    return files


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False
