"""The one image preprocessing of the project: file -> 8-bit grey -> square -> model input.

Training (`train.pipeline`) and the device (`edge_app.classifier`) both call this module, so
a model always sees, pixel for pixel, the tensor it was trained on. It needs only numpy and
Pillow; pydicom is imported lazily, for DICOM files only; TensorFlow is never imported.

The steps, each one function:

* `decode`: any supported file (or its bytes) -> 2-D uint8 grey image, at the file's own
  resolution or, given `draft_size`, integer-reduced to about twice it (JPEGs in the DCT
  domain). Every failure is an `InputError` with a stable code (see `edge_app.errors`).
* `fit_square8` / `fit_square`: grey image -> (size, size), by centre crop or by padding with
  black, with Pillow's fixed-point 8-bit resize.
* `normalise`: [0, 1] squares -> what the network expects, (..., size, size, channels).

`square` = `square8` (the optional border trim (`InputSpec.borders`) + the optional lung crop
(`InputSpec.lung_crop`, edge_app.lungs) + fit_square8 -> uint8) + `contrast_step` (the optional
contrast step, `InputSpec.contrast`) -> float32 [0, 1]; `load8` = decode + `square8` (what
training caches: it augments before the contrast step, as an acquisition would vary the image
before the device's CLAHE sees it); `load` = decode + `square`; `preprocess` = load + normalise.

Conventions worth knowing:

* Everything up to the (size, size) square is integer arithmetic (decode's reductions, the
  resize), or float maths on a few thousand values whose result is rounded to 8 bits; the
  contrast step and normalise are elementwise IEEE arithmetic. So the model input is
  bit-identical on x86 and ARM.
* 8-bit images keep their values. Deeper images (16-bit PNG/TIFF, Pillow modes 'I;16', 'I',
  'F') are stretched robustly (STRETCH_PERCENTILES), because 12-bit detector data is usually
  stored in 16-bit containers with an arbitrary range; a constant image gives zeros. DICOM
  uses its own VOI window or LUT when it has one (see `_decode_dicom`).
* Colour becomes ITU-R 601 luma (Pillow's 'L'); transparent pixels are composited on
  black (the same black `fit_square` pads with), never dropped.
* Colour JPEGs are decoded as YCbCr and their Y plane is used: it is the codec's own luma,
  identical to Pillow's `draft('L')` decode, and keeps Cb/Cr for the strict colour check,
  so strict and non-strict decoding give the same pixels.
* Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False (its default; this module never
  sets it) or truncated files would decode silently with grey fill instead of failing;
  libjpeg's own fill after an early end marker is detected (`_check_jpeg_fill`).
"""
from __future__ import annotations

import functools
import io
import math
import numbers
import os
import stat
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from edge_app.errors import InputError

PREPROCESSING_VERSION = "2"   # recorded in model cards; bump whenever output pixels change
                              # 2: 8-bit fixed-point resize (bit-identical on x86 and ARM), integer
                              # reduction in decode, robust 0.5/99.5 percentile stretch, pydicom VOI
NORMALISATIONS = ("unit", "symmetric", "caffe", "torch", "raw255")
FITS = ("crop", "pad")
CONTRASTS = ("none", "equalize", "clahe", "equalize-clahe")  # equalize: global histogram equalisation of
                                  # the square, which removes each scanner's own windowing/post-processing curve;
                                  # clahe: the same per tile, clipped (CLAHE), local contrast alike everywhere;
                                  # equalize-clahe: CLAHE of the equalised square (8 bits): both at once
LUNG_CROPS = ("none", "box", "mask")  # box: crop to the lung field found by a segmenter (edge_app.lungs);
                                  # mask: that box, black outside the lungs (see `lung_step`)
BORDERS = ("keep", "trim")        # trim: uniform rows/columns at the edges (scanner frames, letterboxing)
                                  # are cut off before fitting, so they neither shrink the anatomy nor
                                  # tell the model which scanner it was
CLAHE_TILES = 8                   # tiles per side
CLAHE_CLIP = 2.0                  # histogram clip limit, in multiples of a flat histogram (OpenCV's default)
BORDER_STD = 0.01                 # a row/column whose grey std is below this is uniform
BORDER_MAX_TRIM = 0.25            # never trim more than this share of a side from each edge
BORDER_SAMPLES = 1024             # pixels per row/column read to tell whether it is uniform

MIN_SIDE = 64                 # shorter side below this -> too_small
MAX_PIXELS = 50_000_000       # more pixels -> too_large, from the header: ~7070², 2.7x a 4300²
                              # flat-panel detector; below Pillow's bomb warning (89.5 MP), so its
                              # warning only ever fires for images refused anyway. Peak memory of
                              # `load` at the limit: ~0.15 GB for a 16-bit PNG (Pillow's image, read
                              # into numpy in strips, reduced before any float step; JPEGs drafted).
DEEP_STRIP_ROWS = 512        # deep (16-bit) images are read into numpy this many rows at a time
BLOCK_STRIP_ROWS = 128       # integer block means (and DICOM's unused-bits correction): rows at a time;
                             # 128 against 64: DICOM decode 6-12 % faster on x86 (fewer Python steps). A strip
                             # and its corrected copy of a 2 k-column film: ~1 MiB, a Pi 4's L2
STRETCH_PERCENTILES = (0.5, 99.5)  # deep images without a VOI window: these -> 0 and 255 (robust to
                                   # hot/dead pixels and burnt-in labels)
STRETCH_SAMPLE_PIXELS = 1 << 16    # the percentiles are taken on a fixed grid of about this many pixels
JPEG_FILL_VALUE = 128         # libjpeg's fill for rows it has no data for (a premature end of the file)
JPEG_FILL_ROWS = 0.01         # that fill over this share of the bottom rows (at least 2) -> truncated

# strict=True checks: "is this plausibly a radiograph?" (the device's; training uses strict=False)
MAX_MEAN_CHROMA = 0.10        # mean HSV chroma (max-min of R,G,B, in [0,1]) above this -> colour_photo.
                              # Grey (also as RGB/JPEG): ~0; X-ray + red arrow over 3% of it: 0.03;
                              # film with a warm cast (blue x0.85) ~0.10; colour photos seen: 0.12-0.25.
MAX_ASPECT_RATIO = 3.0        # longer/shorter side above this -> extreme_aspect_ratio
MIN_GREY_STD = 0.02           # std of the [0,1] grey values below this -> uniform_image
                              # (the development set's lowest is 0.053)
CHROMA_SAMPLE_PIXELS = 1 << 18  # the colour check looks at a fixed grid of about this many pixels
STD_SAMPLE_PIXELS = 1 << 16     # the uniform-image check reads a grid of at most this many (a 625 x 512 square
                                # of a clinic file: 0.19 -> 0.04 ms)

RESAMPLE = Image.Resampling.BILINEAR  # antialiased in Pillow (triangle filter); no ringing/overshoot
REDUCING_GAP = 3.0            # big downscales: integer box-reduce first, then resample (Pillow docs:
                              # 3.0 is indistinguishable from a full resample, and much faster)

FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "GIF")  # what Pillow may try (JPEG includes MPO): no EPS, PDF...
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
               b"MM\x00*")    # files that claim to be a supported image: undecodable -> corrupt
_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # stretched robustly (STRETCH_PERCENTILES)
_ALPHA_MODES = ("P", "PA", "LA", "La", "RGBA", "RGBa")       # composited on black
_COLOUR_MODES = ("RGB", "RGBX", "CMYK")

LUNG_MARGIN = 0.10            # InputSpec.lung_margin's default: the lung masks cover the aerated lung only
                              # (edge_app.lungs), so the box gets a tenth of its size on every side

CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)
TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: a square grey image, `channels` deep, normalised one way."""

    size: int                 # square side of the model input
    channels: int = 1         # 1, or 3 (grey replicated)
    normalisation: str = "unit"
    fit: str = "crop"         # crop: shorter side -> size, centre crop; pad: longer side -> size, black pad
    contrast: str = "none"    # none | equalize | clahe | equalize-clahe (see CONTRASTS)
    borders: str = "keep"     # keep | trim (see BORDERS)
    lung_crop: str = "none"   # none | box | mask (see LUNG_CROPS)
    lung_model: str = ""      # SHA-256 of the lung segmenter that lung_crop uses
    lung_margin: float = LUNG_MARGIN  # added around the lungs' box, a share of its height and width

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, numbers.Integral) or self.size < 1:
            raise ValueError(f"InputSpec.size must be a positive integer, got {self.size!r}")
        if (isinstance(self.channels, bool) or not isinstance(self.channels, numbers.Integral)
                or self.channels not in (1, 3)):
            raise ValueError(f"InputSpec.channels must be 1 or 3, got {self.channels!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"InputSpec.normalisation must be one of {NORMALISATIONS}, "
                             f"got {self.normalisation!r}")
        if self.normalisation in ("caffe", "torch") and self.channels != 3:
            raise ValueError(f"InputSpec.normalisation {self.normalisation!r} needs channels=3, "
                             f"got channels={self.channels}")
        if self.fit not in FITS:
            raise ValueError(f"InputSpec.fit must be one of {FITS}, got {self.fit!r}")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"InputSpec.contrast must be one of {CONTRASTS}, got {self.contrast!r}")
        if self.borders not in BORDERS:
            raise ValueError(f"InputSpec.borders must be one of {BORDERS}, got {self.borders!r}")
        if self.lung_crop not in LUNG_CROPS:
            raise ValueError(f"InputSpec.lung_crop must be one of {LUNG_CROPS}, got {self.lung_crop!r}")
        if self.lung_crop != "none" and not (len(self.lung_model) == 64
                                             and all(c in "0123456789abcdef" for c in self.lung_model)):
            raise ValueError(f"InputSpec.lung_crop {self.lung_crop!r} needs lung_model, the segmenter's "
                             f"SHA-256 (64 lower-case hex digits), got {self.lung_model!r}")
        if not (isinstance(self.lung_margin, numbers.Real) and 0.0 <= self.lung_margin <= 0.5):
            raise ValueError(f"InputSpec.lung_margin must be a share from 0 to 0.5, got {self.lung_margin!r}")
        object.__setattr__(self, "lung_margin", float(self.lung_margin))
        object.__setattr__(self, "size", int(self.size))        # numpy ints -> JSON-able ints
        object.__setattr__(self, "channels", int(self.channels))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        """The inverse of `to_dict`; unknown or missing fields are errors, not silently ignored."""
        if not isinstance(d, Mapping):
            raise ValueError(f"an input spec must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown InputSpec field(s) {unknown}; known: {sorted(known)}")
        if "size" not in d:
            raise ValueError("InputSpec.size is missing")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# decode

def decode(source, *, strict: bool = False, draft_size: int | None = None) -> np.ndarray:
    """A file (path or bytes) as a 2-D uint8 grey image.

    `draft_size`: the side the image will be fitted to. The image is then decoded or reduced
    by an integer factor whose shorter side stays >= 2 x draft_size (and >= MIN_SIDE): JPEGs
    in the DCT domain (1/2, 1/4, 1/8), everything else by an exact integer box mean, before
    any float step; full quality at the target size, at the cost of the plain decode.
    `strict`: also refuse images that are implausible as radiographs (colour photographs,
    extreme aspect ratios, near-uniform images); see the MAX_/MIN_ constants above.
    """
    if draft_size is not None and (isinstance(draft_size, bool) or draft_size < 1
                                   or not isinstance(draft_size, numbers.Integral)):
        raise ValueError(f"draft_size must be a positive integer or None, got {draft_size!r}")
    keep = None if draft_size is None else max(2 * int(draft_size), MIN_SIDE)
    path, stream = _open(source)
    with stream:
        head = stream.read(132)
        stream.seek(0)
        if _is_dicom(head):
            dicom = stream if isinstance(stream, io.BytesIO) else _CappedReads(stream)
            gray, rgb = _decode_dicom(dicom, path, strict, keep)
        else:
            gray, rgb = _decode_pillow(stream, path, head, strict, keep)
    if strict:
        _check_plausible(gray, rgb, path)
    return gray


def _open(source) -> tuple[Path | None, io.BufferedIOBase]:
    """(path or None, binary stream) for a path or bytes; not_found and empty are raised here."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InputError("empty", "the image data is empty (0 bytes)")
        return None, io.BytesIO(bytes(source))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or bytes, got {type(source).__name__}")
    path = Path(source)
    try:
        mode = os.stat(path).st_mode     # before opening: opening a FIFO blocks until a writer comes
        if stat.S_ISDIR(mode):
            raise InputError("not_found", "this is a folder, not an image file", path)
        if not stat.S_ISREG(mode):
            raise InputError("not_an_image", "this is not a regular file (a pipe, socket or device), "
                             "not an image file", path)
        stream = open(path, "rb")
    except FileNotFoundError:
        raise InputError("not_found", "no such file", path) from None
    except OSError as e:
        raise InputError("not_found", f"the file cannot be read ({e.strerror or e})", path) from None
    if os.fstat(stream.fileno()).st_size == 0:
        stream.close()
        raise InputError("empty", "the file is empty (0 bytes)", path)
    return path, stream


class _CappedReads:
    """A file whose read(n) asks for no more than what is left of it. pydicom reads an
    element's claimed length at once, and a file's read(n) allocates n bytes first: GBs for a
    broken length, a MemoryError where memory is limited (bytes' read(n) does not)."""

    def __init__(self, stream):
        self._stream = stream
        self._size = os.fstat(stream.fileno()).st_size

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return self._stream.read()
        return self._stream.read(min(n, max(0, self._size - self._stream.tell())))

    def __getattr__(self, name):      # seek, tell, name...: the file's own
        return getattr(self._stream, name)


def _is_dicom(head: bytes) -> bool:
    """The 'DICM' magic after the 128-byte preamble, or, for files without preamble, a first
    element in group 0002 (file meta) or 0008 (identification), little or big endian. The
    content alone decides, so a path and its bytes are always read the same way."""
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08")


def _check_geometry(width: int, height: int, path) -> None:
    """Size limits, from the header, before any pixel is decoded."""
    if width * height > MAX_PIXELS:
        raise InputError("too_large", f"the image is {width}x{height} pixels; the limit is "
                         f"{MAX_PIXELS:,} pixels", path)
    if min(width, height) < MIN_SIDE:
        raise InputError("too_small", f"the image is {width}x{height} pixels; its shorter side must "
                         f"be at least {MIN_SIDE} pixels", path)


def _reduction(width: int, height: int, keep: int | None) -> int:
    """The integer reduction factor that keeps the shorter side >= keep (1: none)."""
    return 1 if keep is None else max(1, min(width, height) // keep)


def _decode_pillow(stream, path, head: bytes, strict: bool, keep: int | None):
    """(grey uint8, RGB uint8 array or None) for everything Pillow reads; RGB only when strict."""
    with warnings.catch_warnings():
        # Pillow's own bomb check warns above 89.5 MP (> MAX_PIXELS): make that warning an
        # error, reported as too_large. catch_warnings restores the filters on exit.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(stream, formats=FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError("too_large", f"the image is too large to decode safely ({e})", path) from None
        except Image.UnidentifiedImageError:
            if head.startswith(_SIGNATURES):
                raise InputError("corrupt", "the file looks like an image but its header cannot be "
                                 "read", path) from None
            raise InputError("not_an_image", "not a supported image (JPEG, PNG, BMP, TIFF, GIF or "
                             "DICOM)", path) from None
        except Exception as e:  # noqa: BLE001 - a plugin may raise anything on a broken header
            raise InputError("corrupt", f"the image header cannot be read ({e})", path) from None
        with im:
            _check_geometry(*im.size, path)
            jpeg = im.format in ("JPEG", "MPO")
            if jpeg:
                _draft_jpeg(im, keep)
            try:
                im.load()
                ImageOps.exif_transpose(im, in_place=True)
                gray, rgb = _pillow_to_gray(im, path, strict, _reduction(*im.size, keep))
            except InputError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError) as e:
                raise InputError("too_large", f"the image is too large to decode safely ({e})",
                                 path) from None
            except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
                if isinstance(e, EOFError) or "truncated" in str(e).lower():
                    raise InputError("truncated", f"the image file is truncated ({e})", path) from None
                raise InputError("corrupt", f"the image data cannot be decoded ({e})", path) from None
            if jpeg:
                _check_jpeg_fill(im, path)
            return gray, rgb


def _draft_jpeg(im: Image.Image, keep: int | None) -> None:
    """Ask libjpeg for YCbCr (colour) or L, at the smallest DCT scale with both sides >= keep."""
    mode = "YCbCr" if im.mode == "RGB" else im.mode
    if keep is None:
        if mode != im.mode:
            im.draft(mode, None)
        return
    im.draft(mode, (keep, keep))


def _check_jpeg_fill(im: Image.Image, path) -> None:
    """libjpeg fills the rows after a premature end of the data (a cut file, an early end
    marker) with mid-grey and only warns; Pillow cannot see the warning, so the fill is looked
    for: the last JPEG_FILL_ROWS of the luma exactly JPEG_FILL_VALUE everywhere."""
    w, h = im.size
    rows = max(2, int(h * JPEG_FILL_ROWS))
    luma = im.getchannel(0) if im.mode in ("YCbCr", "CMYK") else im
    bottom = np.asarray(luma.crop((0, h - rows, w, h)))
    if bottom.ndim == 2 and (bottom == JPEG_FILL_VALUE).all():
        raise InputError("truncated", f"the JPEG data ends early: its last {rows} rows are the "
                         "decoder's grey fill", path)


def _pillow_to_gray(im: Image.Image, path, strict: bool, factor: int):
    """(grey uint8 reduced by `factor`, RGB uint8 array of the same when strict and the image
    has colour, else None)."""
    if im.mode in _DEEP_MODES:
        return _stretch(_deep_block_mean(im, factor, path), path), None
    if im.mode in ("1", "L"):
        return np.asarray(_reduce(im.convert("L"), factor)), None
    if im.mode == "YCbCr":   # a colour JPEG from _draft_jpeg: Y is the luma
        gray = np.asarray(_reduce(im.getchannel(0), factor))
        return gray, (np.asarray(_reduce(im.convert("RGB"), factor)) if strict else None)
    if im.mode in _ALPHA_MODES:
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        rgb = Image.alpha_composite(black, im.convert("RGBA")).convert("RGB")
    elif im.mode in _COLOUR_MODES:
        rgb = im if im.mode == "RGB" else im.convert("RGB")
    else:
        raise InputError("unsupported_mode", f"images in Pillow mode {im.mode!r} are not supported",
                         path)
    rgb = _reduce(rgb, factor)
    return np.asarray(rgb.convert("L")), (np.asarray(rgb) if strict else None)


def _reduce(im: Image.Image, factor: int) -> Image.Image:
    """Pillow's integer box reduction (exact integer arithmetic, the same on every CPU)."""
    return im if factor == 1 else im.reduce(factor)


def _deep_block_mean(im: Image.Image, factor: int, path) -> np.ndarray:
    """`_block_mean` of a deep Pillow image, read in strips of rows so that no second
    full-size copy of a 49 MP, 16-bit image is ever made."""
    w, h = im.size
    step = factor * max(1, DEEP_STRIP_ROWS // factor)
    end = h - h % factor
    strips = []
    for top in range(0, end, step):
        strip = np.asarray(im.crop((0, top, w, min(top + step, end))))
        if strip.dtype.kind == "f" and not np.isfinite(strip).all():
            raise InputError("corrupt", "the image has non-finite pixel values (NaN or infinity)", path)
        strips.append(_block_mean(strip, factor))
    return np.concatenate(strips)


def _block_mean(values: np.ndarray, factor: int, bits: int = 16, shift: int = 0) -> np.ndarray:
    """Means of factor x factor blocks (a partial last block is dropped), same dtype: integer
    images are summed exactly (16-bit ones in 32 bits: the sum of up to 256^2 values fits;
    the rows of `bits`-deep data in 16 bits where factor of them fit, twice as fast) and
    rounded, so the result is the same on every CPU.

    `shift`: integer values get pydicom's unused-bits correction first (`_correct_unused_bits`),
    strip by strip (BLOCK_STRIP_ROWS rows, kept in the CPU cache), so that no corrected
    full-size copy is ever made; the same integers as correcting the whole image first."""
    if factor == 1:
        return _correct_unused_bits(values, shift)
    h, w = values.shape[0] // factor, values.shape[1] // factor
    if values.dtype.kind == "f":
        return _block_mean_float(values, factor)
    acc = (np.uint32 if values.dtype.kind in "ub" else np.int32) if values.dtype.itemsize <= 2 else np.int64
    n = factor * factor
    # rows first, on whole rows and a strip at a time (cutting the columns first would copy
    # the image), then the columns: factor strided adds (a sum over a short last axis is slow);
    # `bits`-deep data in 16 bits wherever the sums cannot overflow them (twice as fast)
    deep16 = values.dtype == np.uint16
    rows = np.empty((h, values.shape[1]), np.uint16 if deep16 and factor * (2 ** bits - 1) < 2 ** 16 else acc)
    step = factor * max(1, BLOCK_STRIP_ROWS // factor)
    strip = np.empty((min(step, h * factor), values.shape[1]), values.dtype) if shift > 0 else None
    for top in range(0, h * factor, step):
        part = values[top:min(top + step, h * factor)]
        if strip is not None:
            part = _correct_unused_bits(part, shift, out=strip[:len(part)])
        part.reshape(-1, factor, part.shape[1]).sum(axis=1, dtype=rows.dtype,
                                                     out=rows[top // factor:top // factor + len(part) // factor])
    kind = np.uint16 if deep16 and n * (2 ** bits - 1) + n // 2 < 2 ** 16 else acc
    sums = np.empty((h, w), kind)
    np.add(rows[:, 0:w * factor:factor], rows[:, 1:w * factor:factor], out=sums, dtype=kind)
    for k in range(2, factor):
        np.add(sums, rows[:, k:w * factor:factor], out=sums, dtype=kind)
    sums += kind(n // 2)             # the rounded mean, in exact integers (floor division)
    sums //= kind(n)
    return sums.astype(values.dtype, copy=False)


def _block_mean_float(values: np.ndarray, factor: int) -> np.ndarray:
    """`_block_mean` of a float image, summed in float64."""
    h, w = values.shape[0] // factor, values.shape[1] // factor
    rows = values[:h * factor].reshape(h, factor, values.shape[1]).sum(axis=1, dtype=np.float64)
    sums = rows[:, 0:w * factor:factor].copy()
    for k in range(1, factor):
        sums += rows[:, k:w * factor:factor]
    return (sums / (factor * factor)).astype(values.dtype)


def _stretch(values: np.ndarray, path) -> np.ndarray:
    """Robust stretch to uint8: see `_robust_range`; a constant image -> zeros."""
    return _to_uint8(values, *_robust_range(values, path))


def _robust_range(values: np.ndarray, path) -> tuple[float, float]:
    """The STRETCH_PERCENTILES of a 2-D image, on a grid of about STRETCH_SAMPLE_PIXELS: the
    values that become 0 and 255, so that one hot or dead pixel cannot squash the film."""
    step = max(1, int(math.sqrt(values.size / STRETCH_SAMPLE_PIXELS)))
    lo, hi = (float(v) for v in np.percentile(values[::step, ::step], STRETCH_PERCENTILES))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError("corrupt", "the image has non-finite pixel values (NaN or infinity)", path)
    return lo, hi


def _to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[lo, hi] -> 0..255, rounded, clipped; zeros when hi <= lo."""
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    out = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _decode_dicom(stream, path, strict: bool, keep: int | None):
    """(grey uint8, RGB uint8 or None) of a DICOM file's first frame.

    Grey images: stored values, box-reduced (integer) -> pydicom's `apply_modality_lut`
    (RescaleSlope/Intercept or a Modality LUT) -> `apply_voi_lut` (the first VOI window, linear
    or not, or a VOI LUT), whose output range is scaled to 0..255; without a VOI the robust
    stretch (`_stretch`) -> MONOCHROME1 inverted, so that bone is always bright.
    Colour images (RGB, YBR_*): luma of the RGB values, scaled by their bit depth.
    Any attribute pydicom cannot interpret (non-numeric, unknown VR...) makes the file corrupt.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise InputError("dicom_unsupported", "this is a DICOM file but pydicom is not installed; "
                         "install pydicom (pip install 'cxr-edge[edge]')", path) from None
    def read(**options):
        try:
            return pydicom.dcmread(stream, force=True, **options)
        except Exception as e:  # noqa: BLE001 - pydicom raises many types on broken files
            code = "truncated" if isinstance(e, EOFError) else "corrupt"
            raise InputError(code, f"not a readable DICOM file ({e})", path) from None

    ds = read(stop_before_pixels=True)        # the attributes; the pixel data where it lies
    pixels = _DicomFrameRows.of(ds, stream, keep)
    if pixels is None:                        # anything but plain 16-bit grey: pydicom reads it all
        stream.seek(0)
        ds = read()
    try:
        if pixels is None and not all(keyword in ds for keyword in ("PixelData", "Rows", "Columns")):
            raise InputError("not_an_image", "the DICOM file holds no image (no PixelData, Rows, "
                             "Columns)", path)
        rows, cols = int(ds.Rows), int(ds.Columns)
        _check_geometry(cols, rows, path)
        _default_transfer_syntax(ds)
        pixels, shift = (pixels, pixels.shift) if pixels is not None else _dicom_first_frame(ds, path)
        factor = _reduction(cols, rows, keep)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if samples == 3 and pixels.ndim == 3:
            pixels = _correct_unused_bits(pixels, shift)
            top = 2 ** int(ds.get("BitsStored", 8)) - 1
            rgb8 = pixels if pixels.dtype == np.uint8 else _to_uint8(pixels, 0.0, top)
            rgb = _reduce(Image.fromarray(rgb8, "RGB"), factor)
            return np.asarray(rgb.convert("L")), (np.asarray(rgb) if strict else None)
        if samples != 1 or pixels.ndim != 2:
            raise InputError("unsupported_mode", f"DICOM images with {samples} samples per pixel are "
                             "not supported", path)
        _check_dicom_numbers(ds, path)
        bits = int(ds.BitsStored)
        if not 1 <= bits <= 16:
            raise InputError("dicom_unsupported", f"DICOM images with {bits} bits stored are not "
                             "supported (1 to 16)", path)
        low = -(2 ** (bits - 1)) if int(ds.get("PixelRepresentation", 0)) == 1 else 0
        index = _block_mean(pixels, factor, bits, shift)     # stored values, reduced: low.. -> 0..
        index = index if low == 0 else index - np.int32(low)
        # the modality and VOI stages of every possible stored value, then one lookup per pixel
        table = apply_modality_lut(np.arange(low, low + 2 ** bits, dtype=np.int32), ds)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            table = apply_voi_lut(table, ds)
            lo, hi = float(table.min()), float(table.max())    # what the window can output
        else:
            lo, hi = _robust_range(table[index], path)
        if not np.isfinite(table).all():
            raise InputError("corrupt", "the DICOM rescale or window gives non-finite values", path)
        lut = _to_uint8(table, lo, hi)
        mono1 = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed attribute can raise anything in pydicom
        raise InputError("corrupt", f"the DICOM image attributes cannot be interpreted ({e})",
                         path) from None
    if mono1:   # inverted in the table: one lookup per pixel
        lut = np.uint8(255) - lut
    return np.take(lut, index), None   # (np.take: twice as fast as lut[index] here)


class _DicomFrameRows:
    """The first frame of uncompressed 16-bit grey DICOM pixel data, read from the file a strip
    of rows at a time (`_block_mean` slices it from the top down): the image is never held in
    memory whole, nor written to fresh pages (page faults cost more than the reading here).

    `of` says whether a file qualifies: little-endian native encoding, one sample of 16 bits
    allocated (1-16 stored, either pixel representation), MONOCHROME1/2, and a Pixel Data
    element of defined length holding every frame pydicom would expect, complete in the file;
    and a reduction (factor > 1) to be made. Anything else is left to pydicom's `pixel_array`."""

    def __init__(self, stream, offset: int, rows: int, cols: int, signed: bool, shift: int):
        self.shape, self.dtype = (rows, cols), np.dtype("<i2" if signed else "<u2")
        self.shift, self.ndim = shift, 2
        self._stream, self._offset, self._buffer = stream, offset, None

    @classmethod
    def of(cls, ds, stream, keep: int | None):
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        try:
            _default_transfer_syntax(ds)
            implicit, little = ds.original_encoding
            if (not little or ds.file_meta.TransferSyntaxUID not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
                    or int(ds.SamplesPerPixel) != 1 or int(ds.BitsAllocated) != 16
                    or str(ds.PhotometricInterpretation).strip() not in ("MONOCHROME1", "MONOCHROME2")):
                return None
            rows, cols, stored = int(ds.Rows), int(ds.Columns), int(ds.BitsStored)
            signed, frames = int(ds.PixelRepresentation), int(ds.get("NumberOfFrames") or 1)
            if not (0 < rows < 2 ** 16 and 0 < cols < 2 ** 16 and 1 <= stored <= 16 and signed in (0, 1)
                    and frames >= 1 and _reduction(cols, rows, keep) > 1):
                return None
            start = stream.tell()
            head = stream.read(8 if implicit else 12)
            if implicit:
                group, element, length = struct.unpack("<HHI", head)
            else:
                group, element, vr, reserved, length = struct.unpack("<HH2sHI", head)
                if vr not in (b"OW", b"OB"):
                    return None
            size = (stream.getbuffer().nbytes if isinstance(stream, io.BytesIO)
                    else os.fstat(stream.fileno()).st_size)
            if ((group, element) != (0x7FE0, 0x0010) or length == 0xFFFFFFFF
                    or length < frames * rows * cols * 2 or start + len(head) + length > size):
                return None
        except Exception:  # noqa: BLE001 - whatever is unusual: pydicom's own reading decides
            return None
        return cls(stream, start + len(head), rows, cols, bool(signed), 16 - stored)

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows [start, stop) of the frame, read into a buffer that the next call reuses."""
        start, stop, _ = rows.indices(self.shape[0])
        if self._buffer is None or len(self._buffer) < stop - start:
            self._buffer = np.empty((stop - start, self.shape[1]), self.dtype)
        out = self._buffer[:stop - start]
        self._stream.seek(self._offset + 2 * start * self.shape[1])
        if self._stream.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise InputError("truncated", "the DICOM pixel data ended early while it was read")
        return out


def _default_transfer_syntax(ds) -> None:
    """A dataset without file meta (no preamble, no group 0002) is uncompressed: its transfer
    syntax is the encoding pydicom read it with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


_DICOM_NUMBERS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")


def _check_dicom_numbers(ds, path) -> None:
    """The rescale and window attributes, when present, must be finite numbers."""
    for keyword in _DICOM_NUMBERS:
        if keyword not in ds:
            continue
        value = ds[keyword].value
        multiple = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
        for item in value if multiple else [value]:
            try:
                number = float(item)
            except (TypeError, ValueError):
                raise InputError("corrupt", f"the DICOM attribute {keyword} is not a number "
                                 f"({item!r})", path) from None
            if not math.isfinite(number):
                raise InputError("corrupt", f"the DICOM attribute {keyword} is not finite ({item!r})",
                                 path)


def _dicom_first_frame(ds, path) -> tuple[np.ndarray, int]:
    """(the first frame's values, shift), decoding only that frame: the values are pydicom's
    `pixel_array` before its unused-bits correction, which is left to the caller
    (`_correct_unused_bits`, `_block_mean`): shift = BitsAllocated - BitsStored, 0 when
    pydicom has nothing to correct or corrected it already.

    Uncompressed little-endian data comes back as a read-only view of the PixelData bytes
    (pydicom's `view_only`), not a corrected full-size copy: a 3 k x 3 k 16-bit image is
    then held once in memory, not twice, and reduced strip by strip."""
    from pydicom.pixels import pixel_array
    try:
        syntax = ds.file_meta.TransferSyntaxUID
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        native = syntax.is_little_endian and not syntax.is_encapsulated and "PixelData" in ds
        shift = allocated - stored if native and 1 <= stored < allocated <= 64 else 0
    except Exception:  # noqa: BLE001 - pydicom's own decode below says what is wrong
        shift = 0
    try:
        if shift:   # what pydicom would correct (its "shift_correction" test)
            return pixel_array(ds, index=0, view_only=True, correct_unused_bits=False), shift
        return pixel_array(ds, index=0), 0
    except Exception as e:  # noqa: BLE001
        try:
            syntax = ds.file_meta.TransferSyntaxUID
            compressed = syntax.is_transfer_syntax and syntax.is_compressed
        except Exception:  # noqa: BLE001 - no file meta, or a UID that is not a transfer syntax
            compressed = False
        if compressed:
            raise InputError("dicom_unsupported", f"this DICOM's compression ({syntax.name}) cannot be "
                             f"decoded here; install pylibjpeg or GDCM, or export it uncompressed "
                             f"({e})", path) from None
        if "less than expected" in str(e) or "truncated" in str(e).lower():
            raise InputError("truncated", f"the DICOM pixel data is truncated ({e})", path) from None
        raise InputError("corrupt", f"the DICOM pixel data cannot be decoded ({e})", path) from None


def _correct_unused_bits(values: np.ndarray, shift: int, out: np.ndarray | None = None) -> np.ndarray:
    """pydicom's correction of the bits above BitsStored (a left, then a right shift by `shift`
    in the values' own dtype): unsigned values masked (the same bits, one pass), signed ones
    sign-extended. `shift` <= 0: the values as they are. Unsigned values whose unused bits are all
    clear (the usual case) are returned as they are: a max is read-only, half the cost of the mask."""
    if shift <= 0:
        return values
    if values.dtype.kind == "u":
        mask = values.dtype.type((1 << (8 * values.dtype.itemsize - shift)) - 1)
        if values.size and values.max() <= mask:
            return values
        return np.bitwise_and(values, mask, out=out)
    out = np.left_shift(values, shift, out=out)
    return np.right_shift(out, shift, out=out)


def _check_plausible(gray: np.ndarray, rgb: np.ndarray | None, path) -> None:
    """The strict checks, cheapest first."""
    h, w = gray.shape
    if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:
        raise InputError("extreme_aspect_ratio", f"the image is {w}x{h}: an aspect ratio beyond "
                         f"1:{MAX_ASPECT_RATIO:g} is not a chest X-ray", path)
    if rgb is not None:
        chroma = _mean_chroma(rgb)
        if chroma > MAX_MEAN_CHROMA:
            raise InputError("colour_photo", f"this looks like a colour photograph (mean chroma "
                             f"{chroma:.3f} > {MAX_MEAN_CHROMA}), not an X-ray", path)
    step = max(1, math.ceil(math.sqrt(gray.size / STD_SAMPLE_PIXELS)))
    std = _grey_std(gray[::step, ::step]) / 255
    if std < MIN_GREY_STD:
        raise InputError("uniform_image", f"the image is nearly uniform (grey std {std:.4f} < "
                         f"{MIN_GREY_STD}); nothing to screen", path)


def _grey_std(gray: np.ndarray) -> float:
    """The standard deviation of a uint8 image, from exact integer sums (one float step)."""
    n = gray.size
    total = int(gray.sum(dtype=np.uint64))
    wide = gray.astype(np.uint16)
    squares = int(np.multiply(wide, wide, out=wide).sum(dtype=np.uint64))   # 255^2 fits in 16 bits
    return math.sqrt(max(n * squares - total * total, 0) / (n * n))


def _mean_chroma(rgb: np.ndarray) -> float:
    """Mean of max(R,G,B) - min(R,G,B) in [0, 1], on a fixed grid of ~CHROMA_SAMPLE_PIXELS."""
    step = max(1, int(math.sqrt(rgb.shape[0] * rgb.shape[1] / CHROMA_SAMPLE_PIXELS)))
    red, green, blue = (rgb[::step, ::step, c] for c in range(3))   # (not max(axis=2): slow in numpy)
    chroma = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    return float(chroma.mean()) / 255.0   # max - min is never negative, so uint8 cannot wrap


# ---------------------------------------------------------------------------------------------
# fit, contrast, normalise

def grey8(gray: np.ndarray) -> np.ndarray:
    """A 2-D grey image as uint8: `decode`'s output unchanged, a [0, 1] float image rounded
    (x * 255); anything else is a ValueError."""
    gray = np.asarray(gray)
    if gray.ndim != 2 or 0 in gray.shape:
        raise ValueError(f"a grey image must be non-empty and 2-D, got shape {gray.shape}")
    if gray.dtype == np.uint8:
        return gray
    if gray.dtype.kind != "f" or not np.isfinite(gray).all() or gray.min() < 0 or gray.max() > 1:
        raise ValueError(f"a grey image must be uint8 or float in [0, 1], got {gray.dtype} in "
                         f"[{gray.min()}, {gray.max()}]")
    return np.rint(gray * np.float32(255)).astype(np.uint8)


def fit_square(gray: np.ndarray, size: int, fit: str = "crop") -> np.ndarray:
    """A (size, size) float32 image in [0, 1] (multiples of 1/255); see `fit_square8`."""
    return fit_square8(gray, size, fit) / np.float32(255)


def fit_square8(gray: np.ndarray, size: int, fit: str = "crop") -> np.ndarray:
    """A (size, size) uint8 image.

    crop: the centred square of side min(h, w) is resampled to size (shorter side -> size).
    pad: the whole image is resampled so its longer side is size, then centred on black.
    Resampling is Pillow's antialiased bilinear on an 8-bit ('L') image, which is fixed-point:
    the same bits on every CPU (a float resize differs in the last bit between x86 and ARM).
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    gray = grey8(gray)
    size = int(size)
    h, w = gray.shape
    image = Image.fromarray(np.ascontiguousarray(gray), "L")
    if fit == "crop":
        side = min(h, w)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        return np.asarray(image.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP))
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.zeros((size, size), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = image.resize((new_w, new_h), RESAMPLE,
                                                           reducing_gap=REDUCING_GAP)
    return out


def equalize(image: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a grey image (uint8, or [0, 1] as in `grey8`) -> float32 [0, 1],
    exact: each grey level -> the share of pixels at or below it. Any monotone grey curve (a
    scanner's windowing, gamma) gives the same output, up to the 8-bit rounding."""
    image = grey8(image)
    cdf = np.cumsum(np.bincount(image.ravel(), minlength=256)) / image.size
    return np.take(cdf.astype(np.float32), image)


def equalize8(image: np.ndarray) -> np.ndarray:
    """`equalize` rounded to 8 bits, in integers (the same bits on every CPU): uint8. What a monotone
    grey curve cannot change (as long as it merges no grey levels), for a step that needs 8 bits next."""
    image = grey8(image)
    cdf = np.cumsum(np.bincount(image.ravel(), minlength=256), dtype=np.int64)
    lut = ((cdf * 255 + image.size // 2) // image.size).astype(np.uint8)
    return np.take(lut, image)            # a gather with uint8 indices: 4 x faster than lut[image]


def clahe(image: np.ndarray, tiles: int = CLAHE_TILES, clip_limit: float = CLAHE_CLIP) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a grey image (uint8, or [0, 1] as in
    `grey8`) -> float32 [0, 1] (Zuiderveld 1994, as in OpenCV): each of tiles x tiles regions
    gets the equalisation of its own 256-bin histogram, clipped at `clip_limit` times a flat one
    so that noise in flat regions is not amplified, the clipped excess spread over all bins; a
    pixel's value is the bilinear blend of its four nearest tiles' mappings, so tile edges do
    not show. Histograms are integer, the rest elementwise IEEE arithmetic: the same bits on
    every CPU."""
    q = grey8(image)
    bins = 256
    h, w = q.shape
    th, tw = -(-h // tiles), -(-w // tiles)
    tile_bins, corners, weights = _clahe_geometry(h, w, tiles)
    padded = q   # to whole tiles: the reflected margin counts in the last tiles' histograms
    if (th * tiles, tw * tiles) != (h, w):
        padded = np.pad(q, ((0, th * tiles - h), (0, tw * tiles - w)), mode="reflect")
    hist = np.bincount((tile_bins + padded).ravel(), minlength=tiles * tiles * bins)
    hist = hist.reshape(tiles * tiles, bins).astype(np.float64)
    limit = max(clip_limit * th * tw / bins, 1.0)
    excess = np.maximum(hist - limit, 0.0).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / bins
    mapping = (np.cumsum(hist, axis=1) / (th * tw)).astype(np.float32).ravel()   # [tile row, tile col, bin]

    # the 4 corners summed in order, as (mapping[corners + q] * weights).sum(axis=0): the same float32
    # operations, the same bits; the indices are in range by construction ("clip" skips the check)
    blended = np.take(mapping, corners[0] + q, mode="clip")
    blended *= weights[0]
    for k in (1, 2, 3):
        term = np.take(mapping, corners[k] + q, mode="clip")
        term *= weights[k]
        blended += term
    return np.clip(blended, 0.0, 1.0, out=blended)


@functools.lru_cache(maxsize=8)
def _clahe_geometry(h: int, w: int, tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What CLAHE needs of an h x w image that depends on its shape only, computed once per
    shape: each pixel's histogram offset (its tile x 256, over the image padded to whole tiles),
    and `_clahe_blend`'s four nearest tiles and weights. Offsets in 16 bits where they fit (up to
    16 x 16 tiles): offset + grey level is then a 16-bit add, a third faster to gather with."""
    th, tw = -(-h // tiles), -(-w // tiles)
    tile = (np.arange(th * tiles)[:, None] // th) * tiles + np.arange(tw * tiles)[None, :] // tw
    tile_bins = tile.astype(_clahe_index(tiles)) * 256
    tile_bins.flags.writeable = False
    return (tile_bins, *_clahe_blend(h, w, tiles))


@functools.lru_cache(maxsize=8)
def _clahe_blend(h: int, w: int, tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel of an h x w image, its four nearest tiles (flat offsets into CLAHE's
    [tile row, tile col, 256 bins] mapping) and their bilinear weights, each (4, h, w): they
    depend on the shape only, so a model's input size computes them once."""
    def neighbours(n, tile):   # per pixel: lower and upper tile index, weight of the upper one
        centre = np.arange(n, dtype=np.float32) / tile - np.float32(0.5)   # OpenCV's convention
        low = np.floor(centre).astype(np.intp)
        weight = np.where((low >= 0) & (low < tiles - 1), centre - low, np.float32(0)).astype(np.float32)
        return np.clip(low, 0, tiles - 1), np.clip(low + 1, 0, tiles - 1), weight

    y0, y1, wy = neighbours(h, -(-h // tiles))
    x0, x1, wx = neighbours(w, -(-w // tiles))
    rows = [(y0 * tiles * 256)[:, None], (y1 * tiles * 256)[:, None]]
    cols = [(x0 * 256)[None, :], (x1 * 256)[None, :]]
    row_weights = [(np.float32(1) - wy)[:, None], wy[:, None]]
    col_weights = [(np.float32(1) - wx)[None, :], wx[None, :]]
    corners = np.stack([rows[i] + cols[j] for i in (0, 1) for j in (0, 1)]).astype(_clahe_index(tiles))
    weights = np.stack([row_weights[i] * col_weights[j] for i in (0, 1) for j in (0, 1)])
    for array in (corners, weights):
        array.flags.writeable = False     # shared by every call
    return corners, weights


def _clahe_index(tiles: int) -> type:
    """The integer type of CLAHE's flat indices into [tile row, tile col, 256 bins]."""
    return np.uint16 if tiles * tiles * 256 <= 1 << 16 else np.intp


def trim_borders(gray: np.ndarray) -> np.ndarray:
    """The image without uniform rows and columns at its edges (grey std < BORDER_STD), at most
    BORDER_MAX_TRIM of each side from each edge: black letterboxing, white scanner frames.
    Any grey image (see `grey8`); the result is uint8."""
    gray = grey8(gray)
    limit8 = BORDER_STD * 255

    def busy(lines: np.ndarray, axis: int) -> np.ndarray:   # std >= limit, in exact integers
        n = lines.shape[axis]                    # < 2 x BORDER_SAMPLES: 255^2 n fits in 32 bits
        squares = lines.astype(np.uint16)
        np.multiply(squares, squares, out=squares)                     # 255^2 fits in 16 bits
        total = lines.sum(axis=axis, dtype=np.uint32).astype(np.int64)
        n2var = n * squares.sum(axis=axis, dtype=np.uint32).astype(np.int64) - total * total
        return n2var >= (limit8 * n) ** 2

    # a row's std from at most ~BORDER_SAMPLES of its pixels (and a column's alike): a 7000-pixel
    # film costs no more than a small one, and uniformity shows as well
    col_step, row_step = max(1, gray.shape[1] // BORDER_SAMPLES), max(1, gray.shape[0] // BORDER_SAMPLES)
    rows = _kept_lines(gray.shape[0], lambda a, b: busy(gray[a:b, ::col_step], 1))
    sampled = gray[rows][::row_step]
    cols = _kept_lines(gray.shape[1], lambda a, b: busy(sampled[:, a:b], 0))
    return gray[rows, cols]


def _kept_lines(n: int, busy) -> slice:
    """The lines of n that `trim_borders` keeps: from each end, up to the first busy line (not
    uniform; `busy(a, b)` says which of lines a..b-1 are), at most BORDER_MAX_TRIM of n; all of
    them when no line is busy. Only the bands at the ends are read, a few lines at a time from
    the edge: a film without a border is decided by its first and last lines."""
    limit = int(n * BORDER_MAX_TRIM)
    start = stop = None
    a, size = 0, 8
    while start is None and a < limit:                  # the top (left) band, outwards in
        b = min(a + size, limit)
        found = np.flatnonzero(busy(a, b))
        start = a + int(found[0]) if found.size else None
        a, size = b, 2 * size
    b, size = n, 8
    while stop is None and b > n - limit:               # the bottom (right) band, outwards in
        a = max(b - size, n - limit)
        found = np.flatnonzero(busy(a, b))
        stop = a + int(found[-1]) + 1 if found.size else None
        b, size = a, 2 * size
    if start is None and stop is None and not busy(limit, n - limit).any():
        return slice(0, n)                               # nothing busy at all: left alone
    return slice(limit if start is None else start, n - limit if stop is None else stop)


# ---------------------------------------------------------------------------------------------
# lung step (InputSpec.lung_crop): the logic lives in edge_app.lungs, this is its place in `square`

def lung_step(gray: np.ndarray, spec: InputSpec, timings: dict | None = None) -> np.ndarray:
    """The image cropped to its lung field (after the border trim, before fitting the square).

    Refuses with InputError `no_chest_found` when no plausible lung field is found, `negative_image` for a
    film stored as its negative (edge_app.lungs.Segmenter.find); needs the segmenter named by spec.lung_model
    to be opened first (`edge_app.lungs.use`). `timings`: the segmenter's inference ms is added to it under
    "lungs" (the device reports it as its own stage)."""
    if spec.lung_crop == "none":
        return gray
    from edge_app import lungs   # lazily: lungs imports this module

    return lungs.crop(gray, spec, timings)


# ---------------------------------------------------------------------------------------------

def trimmed8(gray: np.ndarray, spec: InputSpec) -> np.ndarray:
    """[border trim] of any grey image (see `grey8`) as uint8: what the lung step sees."""
    return grey8(trim_borders(gray) if spec.borders == "trim" else gray)


def square8(gray: np.ndarray, spec: InputSpec, timings: dict | None = None) -> np.ndarray:
    """[border trim], [lung crop], fit_square8: the (size, size) uint8 image before the contrast
    step, from any grey image (see `grey8`). What training caches and augments. `timings`: see
    `lung_step`."""
    return fit_square8(lung_step(trimmed8(gray, spec), spec, timings), spec.size, spec.fit)


def contrast_step(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """spec.contrast (none | equalize | clahe | equalize-clahe) of a (size, size) grey image -> float32 [0, 1].
    The image is uint8 (`square8`) or float in [0, 1], which is rounded to 8 bits first
    (`grey8`), so an augmented training image goes through exactly the device's step."""
    if spec.contrast == "equalize":
        return equalize(image)
    if spec.contrast == "clahe":
        return clahe(image)
    if spec.contrast == "equalize-clahe":
        return clahe(equalize8(image))
    return grey8(image) / np.float32(255)


def square(gray: np.ndarray, spec: InputSpec) -> np.ndarray:
    """`square8` + `contrast_step`: the (size, size) float32 [0, 1] image before normalise, from
    any grey image (see `grey8`)."""
    return contrast_step(square8(gray, spec), spec)


def detail(square8_image: np.ndarray) -> float:
    """How much fine detail the model's square holds, whatever its contrast: the summed |Laplacian|
    over the summed |first differences| (both directions), on `square8`'s uint8 image. A film blurred
    or enlarged from a small copy scores far below every stored development film, and the model clears
    such films (docs/RESULTS.md, 2026-12-05 evening); the card's thresholds["detail"] (train.detail)
    turns them into a warning (decision.LOW_DETAIL). Integer sums: every CPU gets the same value."""
    u = np.asarray(square8_image)
    if u.ndim != 2 or min(u.shape) < 3:
        raise ValueError(f"detail needs a 2-D image of at least 3 x 3 pixels, got shape {u.shape}")
    u = u.astype(np.int16)
    dx, dy = u[:, 1:] - u[:, :-1], u[1:] - u[:-1]
    laplacian = (dx[1:-1, 1:] - dx[1:-1, :-1]) + (dy[1:, 1:-1] - dy[:-1, 1:-1])
    differences = int(np.abs(dx).sum(dtype=np.int64) + np.abs(dy).sum(dtype=np.int64))
    return int(np.abs(laplacian).sum(dtype=np.int64)) / differences if differences else 0.0


def normalise(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """[0, 1] squares (..., size, size) -> model inputs (..., size, size, channels), float32.

    unit: x. symmetric: 2x - 1 (MobileNetV2). raw255: 255x (Keras models that normalise
    inside: EfficientNet, MobileNetV3). caffe: 255x - ImageNet BGR means (ResNet).
    torch: (x - ImageNet mean) / std (DenseNet). Grey is replicated over the channels.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim < 2 or x.shape[-2:] != (spec.size, spec.size):
        raise ValueError(f"normalise expects (..., {spec.size}, {spec.size}) images, got {x.shape}")
    if spec.normalisation in ("caffe", "torch") and spec.channels != 3:
        raise ValueError(f"normalisation {spec.normalisation!r} needs channels=3, got {spec.channels}")
    if spec.normalisation == "caffe":
        return x[..., None] * np.float32(255) - CAFFE_BGR_MEAN          # broadcast over the 3 channels
    if spec.normalisation == "torch":
        return (x[..., None] - TORCH_MEAN) / TORCH_STD
    if spec.normalisation == "symmetric":
        x = x * np.float32(2) - np.float32(1)
    elif spec.normalisation == "raw255":
        x = x * np.float32(255)
    elif spec.normalisation != "unit":
        raise ValueError(f"unknown normalisation {spec.normalisation!r}; known: {NORMALISATIONS}")
    out = np.empty(x.shape + (spec.channels,), np.float32)
    for channel in range(spec.channels):         # grey: the same value in every channel, one plane at a
        out[..., channel] = x                    # time (3 x faster than broadcasting over a last axis of 3)
    return out


def load8(source, spec: InputSpec, *, strict: bool = False) -> np.ndarray:
    """decode + square8: the (size, size) uint8 image before the contrast step (what training
    caches, augments, then passes through `contrast_step`)."""
    return square8(decode(source, strict=strict, draft_size=spec.size), spec)


def load(source, spec: InputSpec, *, strict: bool = False) -> np.ndarray:
    """decode + square (= load8 + contrast_step): the (size, size) grey [0, 1] image before normalise."""
    return contrast_step(load8(source, spec, strict=strict), spec)


def preprocess(source, spec: InputSpec, *, strict: bool = False) -> np.ndarray:
    """The model input for one file: (size, size, channels) float32."""
    return normalise(load(source, spec, strict=strict), spec)
