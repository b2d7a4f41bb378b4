"""Full-size clinic files made from a development-set X-ray, for the benchmarks: what a clinic's
CR/DR system exports (2,000-3,000 px, 12-bit detector data in 16-bit containers, DICOM), not the
development set's 256 px JPEGs. Deterministic by seed; nothing is committed, the files are
written where the benchmark session says.

    python -m benchmarks.clinic_files SOURCE_IMAGE OUT_DIR [--seed 0] [--kinds png16,dicom-3k]

Each file: the source upscaled (bicubic) to the kind's size, mapped to 12-bit detector counts,
with detector-like noise (signal-dependent quantum noise, per-column and per-row fixed-pattern
offsets), then stored as the kind says. `library_decode` is the plain library decode of the same
file (Pillow open + load; pydicom dcmread(...).pixel_array), the floor the device's decode is
measured against.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge_app import preprocess

BITS = 12
FULL = 2**BITS - 1
DARK, BRIGHT = 180, 3800        # detector counts of the source's black and white
GAIN = 0.8                      # quantum noise: variance = GAIN x counts
COLUMN_NOISE, ROW_NOISE = 4.0, 2.0   # std of the fixed-pattern offsets, counts
SLOPE, INTERCEPT = 0.5, -1024.0      # DICOM modality rescale of the stored values


@dataclass(frozen=True)
class Kind:
    name: str
    width: int
    height: int
    suffix: str
    what: str


KINDS = {k.name: k for k in (
    Kind("png8", 2048, 2500, ".png", "8-bit grey PNG"),
    Kind("png16", 2500, 2500, ".png", "16-bit PNG holding 12-bit data"),
    Kind("png-rgb", 2000, 2500, ".png", "grey stored as RGB PNG (CR export)"),
    Kind("jpeg95", 2500, 3000, ".jpg", "JPEG quality 95"),
    Kind("dicom-mono2", 2500, 2500, ".dcm", "DICOM MONOCHROME2, 12 bits stored, rescale, VOI window"),
    Kind("dicom-mono1", 2048, 2500, ".dcm", "DICOM MONOCHROME1, 12 bits stored, rescale, VOI window"),
    Kind("dicom-voilut", 2500, 2048, ".dcm", "DICOM MONOCHROME2, 12 bits stored, VOI LUT Sequence"),
    Kind("dicom-3k", 3000, 3000, ".dcm", "DICOM MONOCHROME2 3000x3000, 12 bits stored, rescale, VOI window"),
)}
PIPELINE_KIND = "dicom-mono2"   # the 2.5 k 16-bit DICOM of the whole-pipeline gate
LARGEST_KIND = "dicom-3k"       # the peak-RSS gate's file


def detector_counts(source, kind: Kind, rng: np.random.Generator) -> np.ndarray:
    """(height, width) uint16 12-bit counts of the source image, upscaled, with detector noise."""
    gray = preprocess.decode(source).astype(np.float32) / 255   # decode gives 8-bit grey
    big = np.asarray(Image.fromarray(gray).resize((kind.width, kind.height), Image.Resampling.BICUBIC),
                     np.float64)
    counts = DARK + np.clip(big, 0.0, 1.0) * (BRIGHT - DARK)
    counts += rng.normal(0.0, 1.0, counts.shape) * np.sqrt(GAIN * counts)
    counts += rng.normal(0.0, COLUMN_NOISE, (1, kind.width)) + rng.normal(0.0, ROW_NOISE, (kind.height, 1))
    return np.clip(np.round(counts), 0, FULL).astype(np.uint16)


def _voi_window(stored: np.ndarray) -> tuple[float, float]:
    """(centre, width) in rescaled units over the stored values' 1st-99th percentile, as a modality would set it."""
    lo, hi = np.percentile(stored[::8, ::8], [1, 99]) * SLOPE + INTERCEPT
    return round(float(lo + hi) / 2, 1), round(float(hi - lo), 1)


def _write_dicom(path: Path, stored: np.ndarray, photometric: str, **attrs) -> None:
    """An uncompressed DX image, explicit VR little endian, 16 bits allocated, 12 stored."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"   # Digital X-Ray Image, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[path.name])  # deterministic
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, BITS, BITS - 1, 0
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _voi_lut_item(counts: np.ndarray):
    """A VOI LUT Sequence item: a sigmoid over the stored values' 1st-99th percentile, 12 bits out."""
    from pydicom.dataset import Dataset

    lo, hi = np.percentile(counts[::8, ::8], [1, 99])
    x = np.arange(FULL + 1, dtype=np.float64)
    curve = 1.0 / (1.0 + np.exp(-8.0 * ((x - lo) / (hi - lo) - 0.5)))
    item = Dataset()
    item.LUTDescriptor = [FULL + 1, 0, BITS]   # entries, first stored value mapped, bits per entry
    item.LUTExplanation = "sigmoid 1-99 %"
    item.LUTData = np.round(curve * FULL).astype("<u2").tobytes()   # OW, little endian
    return item


def write_kind(source, kind: Kind, path: Path, rng: np.random.Generator) -> Path:
    return store(detector_counts(source, kind, rng), kind.name, path)


def store(counts: np.ndarray, kind: str, path: Path, *, compress_level: int = 6) -> Path:
    """12-bit detector counts written as the clinic file kind `kind` says (any size); PNGs at
    `compress_level` (Pillow's default 6; 1 writes several times faster, the same pixels)."""
    png = {"compress_level": compress_level}
    if kind == "png16":
        Image.fromarray(counts).save(path, **png)        # mode I;16: a 16-bit PNG, values 0-4095
    elif kind in ("png8", "png-rgb", "jpeg95"):
        grey = Image.fromarray((counts >> (BITS - 8)).astype(np.uint8))
        if kind == "png-rgb":
            grey.convert("RGB").save(path, **png)
        else:
            grey.save(path, **({"quality": 95} if kind == "jpeg95" else png))
    elif kind == "dicom-voilut":
        _write_dicom(path, counts, "MONOCHROME2", VOILUTSequence=[_voi_lut_item(counts)])
    elif kind.startswith("dicom-"):
        mono1 = kind == "dicom-mono1"
        stored = FULL - counts if mono1 else counts      # MONOCHROME1: bright where little reached the detector
        centre, width = _voi_window(stored)               # the window is on the stored values, rescaled
        _write_dicom(path, stored, "MONOCHROME1" if mono1 else "MONOCHROME2",
                     RescaleSlope=SLOPE, RescaleIntercept=INTERCEPT, RescaleType="US",
                     WindowCenter=centre, WindowWidth=width)
    else:
        raise ValueError(f"unknown clinic file kind {kind!r}; known: {sorted(KINDS)}")
    return path


def write(sources, out_dir: Path, *, seed: int = 0, kinds=None) -> dict[str, Path]:
    """{kind: file} in out_dir, the kinds' sources taken in turn from `sources` (image paths); a
    kind's file depends only on the seed and the sources, not on which other kinds are made."""
    sources = list(sources)
    names = list(kinds or KINDS)
    unknown = sorted(set(names) - set(KINDS))
    if unknown or not sources:
        raise ValueError(f"unknown clinic file kind(s) {unknown}; known: {sorted(KINDS)}" if unknown
                         else "no source images to make clinic files from")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = list(KINDS)
    return {name: write_kind(sources[order.index(name) % len(sources)], KINDS[name],
                             out_dir / f"{name}{KINDS[name].suffix}", np.random.default_rng([seed, order.index(name)]))
            for name in names}


def library_decode(path: Path) -> np.ndarray:
    """The plain library decode of a file, nothing else: the floor for the device's decode."""
    if Path(path).suffix == ".dcm":
        import pydicom

        return pydicom.dcmread(path).pixel_array
    with Image.open(path) as im:
        im.load()
        return im


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.clinic_files", description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+", type=Path, help="development-set images, used in turn")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", help=f"comma-separated, default all: {','.join(KINDS)}")
    args = p.parse_args(argv)
    for name, path in write(args.sources, args.out, seed=args.seed,
                            kinds=args.kinds.split(",") if args.kinds else None).items():
        print(f"{name:14s} {path}  {KINDS[name].what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
