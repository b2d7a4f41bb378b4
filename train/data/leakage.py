"""Leakage across splits: the same patient, or the same radiograph, in two splits.

A test score means little if the model has seen the patient, or the very film, in training.
Two checks:

- shared patients: one patient id in more than one split;
- near-duplicates: two images in different splits whose perceptual hashes differ in at most
  `max_distance` bits: re-encoded, rescaled, slightly cropped or brightened copies of one film.

The perceptual hash (pHash) is the sign pattern of an image's low spatial frequencies: the
image (or a window of it) shrunk to 32x32 grey, its 2-D DCT, and the 16x16 lowest frequencies
less the DC term (the overall brightness), each compared with their median: 255 bits, in four
uint64 words. Two choices differ from the textbook 8x8 pHash, both measured on the shared
development set:

- 16x16 frequencies, not 8x8: chest films are so alike at 8x8 that thousands of distinct
  cross-split pairs come as close as a re-encoded copy does;
- crop tolerance: each image is also hashed in 35 windows (each axis either whole or 95% of
  it, at 5 offsets), and two images are compared as the smaller of "A whole vs any window of
  B" and "B whole vs any window of A", so a copy with ~5% cut off any edges still matches.

Hashes are compared with XOR and popcount over uint64 arrays, in chunks, so a few thousand
images take seconds.

    python -m train.data.leakage DATA_DIR [--json OUT] [--max-distance N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from edge_app.errors import InputError
from edge_app.preprocess import decode
from train.data.dataset import load_dataset
from train.data.records import SPLITS, Record

# Bits (of 255) within which two images count as copies of one film. Measured on the shared set
# (3068 images; 500 copies per kind): copies re-encoded as JPEG q70, rescaled by 0.8-1.25,
# brightened or darkened by 8-12%, gamma-changed, cropped by 5% (one edge, or spread over the
# edges), or all of these at once, came within 28 bits (99% within 22); of the 2.2 million pairs
# of radiographs in different splits none came closer than 36, while the set's known copies of
# one film under two patient ids (kept in one split) lie at 2-24.
MAX_DISTANCE = 30
BASE = 64                           # every image is first shrunk to BASE x BASE; windows are cut from it
HASH_SIZE, LOW = 32, 16             # each window -> HASH_SIZE x HASH_SIZE -> LOW x LOW lowest frequencies
WINDOW, OFFSETS = 0.95, 5           # window side per axis (fraction of the image), offsets per axis
CHUNK = 64                          # rows per XOR block: CHUNK x images x windows x 4 words


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: `d @ x @ d.T` is the 2-D DCT of an n x n image x."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    d = np.sqrt(2 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2)
    return d


def _area_matrix(size: float, offset: float) -> np.ndarray:
    """(HASH_SIZE, BASE) area-averaging resampler of the span [offset, offset + size] of an axis
    (fractions of its length)."""
    start = (offset + size * np.arange(HASH_SIZE) / HASH_SIZE)[:, None] * BASE
    end = start + size * BASE / HASH_SIZE
    pixel = np.arange(BASE)[None, :]
    overlap = np.clip(np.minimum(end, pixel + 1) - np.maximum(start, pixel), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _projections() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 1-D span (the whole axis, or WINDOW of it at OFFSETS offsets), a LOW x BASE matrix
    (resample, then the low DCT rows); and the (y, x) spans of every window, the whole image first.

    A window's low frequencies are then `P[y] @ image @ P[x].T`: no resampled thumbnail is built.
    """
    spans = [(1.0, 0.0)] + [(WINDOW, o) for o in np.linspace(0, 1 - WINDOW, OFFSETS)]
    low_dct = _dct_matrix(HASH_SIZE)[:LOW]
    matrices = np.stack([low_dct @ _area_matrix(s, o) for s, o in spans]).astype(np.float32)
    y, x = np.divmod(np.arange(len(spans) ** 2), len(spans))
    return matrices, y, x


_PROJECTIONS, _WINDOW_Y, _WINDOW_X = _projections()


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A 2-D grey image area-averaged to BASE x BASE, whatever its aspect ratio."""
    small = Image.fromarray(np.asarray(image, dtype=np.float32))
    return np.asarray(small.resize((BASE, BASE), Image.BOX))


def phash(thumbnails: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Perceptual hashes of BASE x BASE thumbnails: (n, windows, 4) uint64; window 0 is the whole image."""
    hashes = []
    for start in range(0, len(thumbnails), chunk):
        x = thumbnails[start:start + chunk, None]                                   # (n, 1, B, B)
        columns = x @ _PROJECTIONS.transpose(0, 2, 1)                               # (n, spans, B, LOW)
        low = _PROJECTIONS[_WINDOW_Y] @ columns[:, _WINDOW_X]                       # (n, windows, LOW, LOW)
        low = low.reshape(*low.shape[:2], LOW * LOW)[..., 1:]                       # drop DC
        bits = low > np.median(low, axis=-1, keepdims=True)
        hashes.append(np.packbits(bits, axis=-1).view(np.uint64))  # 255 bits + 1 zero -> 4 words
    return np.concatenate(hashes) if hashes else np.zeros((0, len(_WINDOW_Y), 4), np.uint64)


def distances(whole: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """(len(whole), len(windows)) Hamming distances of whole-image hashes (n, 4) to the nearest
    window hash of each other image (m, windows, 4)."""
    m, k, _ = windows.shape
    flat = windows.reshape(m * k, -1)
    out = np.empty((len(whole), m), np.uint8)
    for start in range(0, len(whole), CHUNK):
        bits = np.bitwise_count(whole[start:start + CHUNK, None, :] ^ flat[None])
        distance = bits[..., 0] + bits[..., 1] + bits[..., 2] + bits[..., 3]  # <= 255: fits uint8
        out[start:start + CHUNK] = distance.reshape(-1, m, k).min(axis=-1)
    return out


@dataclass
class LeakageReport:
    shared_patients: list[dict] = field(default_factory=list)  # {patient_id, splits, files}
    near_duplicates: list[dict] = field(default_factory=list)  # {files: (a, b), splits: (sa, sb), distance}
    hash_failures: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    images_hashed: int = 0
    pairs_compared: int = 0
    max_distance: int = MAX_DISTANCE

    @property
    def ok(self) -> bool:
        """No patient and no near-duplicate image across splits (unreadable images are listed apart)."""
        return not self.shared_patients and not self.near_duplicates

    @property
    def counts(self) -> dict[str, int]:
        return {"shared_patients": len(self.shared_patients), "near_duplicates": len(self.near_duplicates),
                "hash_failures": len(self.hash_failures), "images_hashed": self.images_hashed,
                "pairs_compared": self.pairs_compared}

    def to_dict(self) -> dict:
        return {"ok": self.ok, "max_distance": self.max_distance, "counts": self.counts,
                "shared_patients": self.shared_patients,
                "near_duplicates": [{**d, "files": list(d["files"]), "splits": list(d["splits"])}
                                    for d in self.near_duplicates],
                "hash_failures": [list(f) for f in self.hash_failures]}

    @classmethod
    def from_dict(cls, data: dict) -> LeakageReport:
        counts = data["counts"]
        return cls(shared_patients=[{**p, "splits": list(p["splits"]), "files": list(p["files"])}
                                    for p in data["shared_patients"]],
                   near_duplicates=[{**d, "files": tuple(d["files"]), "splits": tuple(d["splits"])}
                                    for d in data["near_duplicates"]],
                   hash_failures=[tuple(f) for f in data["hash_failures"]],
                   images_hashed=counts["images_hashed"], pairs_compared=counts["pairs_compared"],
                   max_distance=data["max_distance"])

    def summary(self, limit: int = 10) -> str:
        """Counts, then up to `limit` examples of each problem, with paths relative to the data root."""
        files = [f for p in self.shared_patients for f in p["files"]]
        files += [f for d in self.near_duplicates for f in d["files"]] + [f for f, _ in self.hash_failures]
        root = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""

        def short(file: str) -> str:
            return os.path.relpath(file, root)

        lines = [f"leakage check: {'ok' if self.ok else 'LEAKAGE'}: {len(self.shared_patients)} patients "
                 f"in more than one split, {len(self.near_duplicates)} near-duplicate pairs across splits "
                 f"(pHash distance <= {self.max_distance}; {self.images_hashed} images, "
                 f"{self.pairs_compared} pairs), {len(self.hash_failures)} images not hashed"]
        if files:
            lines.append(f"  (files under {root})")
        sections = [
            ("shared patients", [f"{p['patient_id']}: {', '.join(p['splits'])}: "
                                 + ", ".join(map(short, p["files"][:4]))
                                 + (f", ... ({len(p['files'])} files)" if len(p["files"]) > 4 else "")
                                 for p in self.shared_patients]),
            ("near-duplicates", [f"{short(d['files'][0])} ({d['splits'][0]}) ~ {short(d['files'][1])} "
                                 f"({d['splits'][1]}): distance {d['distance']}"
                                 for d in self.near_duplicates]),
            ("not hashed", [f"{short(f)}: {reason}" for f, reason in self.hash_failures]),
        ]
        for title, items in sections:
            if items:
                lines.append(f"{title}:")
                lines += [f"  {item}" for item in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        return "\n".join(lines)


def shared_patients(records: list[Record]) -> list[dict]:
    """Patients whose images lie in more than one split."""
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        if record.patient_id is not None and record.split is not None:
            by_patient[record.patient_id].append(record)
    shared = []
    for patient_id, items in sorted(by_patient.items()):
        splits = {r.split for r in items}
        if len(splits) > 1:
            shared.append({"patient_id": patient_id, "splits": [s for s in SPLITS if s in splits],
                           "files": sorted(str(r.path) for r in items)})
    return shared


def near_duplicates(hashes: np.ndarray, records: list[Record], max_distance: int) -> tuple[list[dict], int]:
    """Pairs in different splits within `max_distance` bits, closest first; and the pairs compared."""
    splits = np.array([r.split for r in records], dtype=object)
    found, compared = [], 0
    for split_a, split_b in combinations(SPLITS, 2):
        a, b = np.flatnonzero(splits == split_a), np.flatnonzero(splits == split_b)
        compared += len(a) * len(b)
        if not (len(a) and len(b)):
            continue
        distance = np.minimum(distances(hashes[a, 0], hashes[b]), distances(hashes[b, 0], hashes[a]).T)
        for i, j in zip(*np.nonzero(distance <= max_distance)):
            found.append({"files": (str(records[a[i]].path), str(records[b[j]].path)),
                          "splits": (split_a, split_b), "distance": int(distance[i, j])})
    found.sort(key=lambda d: (d["distance"], d["files"]))
    return found, compared


def check_leakage(records: list[Record], *, max_distance: int = MAX_DISTANCE,
                  progress: bool = True) -> LeakageReport:
    """Shared patients and near-duplicate images across the splits of `records`."""
    records = [r for r in records if r.split is not None]
    thumbnails, hashed, failures = [], [], []
    for record in tqdm(records, desc="leakage: hashing", unit="img", disable=not progress):
        try:
            thumbnails.append(thumbnail(decode(record.path, draft_size=64)))
            hashed.append(record)
        except InputError as error:
            failures.append((str(record.path), f"{error.code}: {error.message}"))
    hashes = phash(np.stack(thumbnails) if thumbnails else np.zeros((0, BASE, BASE), np.float32))
    duplicates, compared = near_duplicates(hashes, hashed, max_distance)
    return LeakageReport(shared_patients=shared_patients(records), near_duplicates=duplicates,
                         hash_failures=failures, images_hashed=len(hashed), pairs_compared=compared,
                         max_distance=max_distance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.data.leakage",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("data", help="dataset folder (any layout load_dataset reads)")
    parser.add_argument("--json", metavar="OUT", help="also write the full report as JSON")
    parser.add_argument("--max-distance", type=int, default=MAX_DISTANCE,
                        help=f"pHash bits within which two images are copies (default: {MAX_DISTANCE})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    # Unreadable images need no second decode here: check_leakage lists them as hash failures.
    dataset = load_dataset(args.data, check_readable=False, progress=not args.no_progress)
    report = check_leakage(dataset.records, max_distance=args.max_distance, progress=not args.no_progress)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
