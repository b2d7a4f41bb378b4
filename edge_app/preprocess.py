"""The one image preprocessing of the project: file -> grey [0, 1] -> square -> model input.

Training (`train.pipeline`) and the device (`edge_app.classifier`) both call this module, so
a model always sees, pixel for pixel, the tensor it was trained on. It needs only numpy and
Pillow; pydicom is imported lazily, for DICOM files only; TensorFlow is never imported.

The steps, each one function:

* `decode`: any supported file (or its bytes) -> 2-D float32 grey image in [0, 1], at the
  file's own resolution (JPEGs may be decoded at a reduced scale, see `draft_size`).
  Every failure is an `InputError` with a stable code (see `edge_app.errors`).
* `fit_square`: grey image -> (size, size), by centre crop or by padding with black.
* `normalise`: [0, 1] squares -> what the network expects, (..., size, size, channels).

`square` = the optional border trim (`InputSpec.borders`) + the optional lung crop
(`InputSpec.lung_crop`, edge_app.lungs) + fit_square + the optional contrast step
(`InputSpec.contrast`); `load` = decode + `square` (what training caches); `preprocess` =
load + normalise.

Conventions worth knowing:

* 8-bit images are divided by 255. Deeper images (16-bit PNG/TIFF, Pillow modes 'I;16',
  'I', 'F') are min-max stretched over their own range, because 12-bit detector data is
  usually stored in 16-bit containers with an arbitrary range; a constant image gives
  zeros. DICOM uses its own VOI window when it has one (see `_decode_dicom`).
* Colour becomes ITU-R 601 luma (Pillow's 'L'); transparent pixels are composited on
  black (the same black `fit_square` pads with), never dropped.
* Colour JPEGs are decoded as YCbCr and their Y plane is used: it is the codec's own luma,
  identical to Pillow's `draft('L')` decode, and keeps Cb/Cr for the strict colour check,
  so strict and non-strict decoding give the same pixels.
* Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False (its default; this module never
  sets it) or truncated files would decode silently with grey fill instead of failing.
"""
from __future__ import annotations

import io
import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from edge_app.errors import InputError

PREPROCESSING_VERSION = "1"   # recorded in model cards; bump whenever output pixels change
NORMALISATIONS = ("unit", "symmetric", "caffe", "torch", "raw255")
FITS = ("crop", "pad")
CONTRASTS = ("none", "equalize", "clahe")  # equalize: global histogram equalisation of the square,
                                  # which removes each scanner's own windowing/post-processing curve;
                                  # clahe: the same per tile, clipped (CLAHE), local contrast alike everywhere
LUNG_CROPS = ("none", "box", "mask")  # box: crop to the lung field found by a segmenter (edge_app.lungs);
                                  # mask: that box, black outside the lungs (see `lung_step`)
BORDERS = ("keep", "trim")        # trim: uniform rows/columns at the edges (scanner frames, letterboxing)
                                  # are cut off before fitting, so they neither shrink the anatomy nor
                                  # tell the model which scanner it was
CLAHE_TILES = 8                   # tiles per side
CLAHE_CLIP = 2.0                  # histogram clip limit, in multiples of a flat histogram (OpenCV's default)
CLAHE_BINS = 256
BORDER_STD = 0.01                 # a row/column whose grey std is below this is uniform
BORDER_MAX_TRIM = 0.25            # never trim more than this share of a side from each edge
BORDER_SAMPLES = 1024             # pixels per row/column read to tell whether it is uniform

MIN_SIDE = 64                 # shorter side below this -> too_small
MAX_PIXELS = 50_000_000       # more pixels -> too_large, from the header: ~7070², 2.7x a 4300²
                              # flat-panel detector; below Pillow's bomb warning (89.5 MP), so its
                              # warning only ever fires for images refused anyway. Peak memory of
                              # `load` at the limit: ~0.4 GB for a 16-bit PNG (JPEGs are drafted).

# strict=True checks: "is this plausibly a radiograph?" (the device's; training uses strict=False)
MAX_MEAN_CHROMA = 0.10        # mean HSV chroma (max-min of R,G,B, in [0,1]) above this -> colour_photo.
                              # Grey (also as RGB/JPEG): ~0; X-ray + red arrow over 3% of it: 0.03;
                              # film with a warm cast (blue x0.85) ~0.10; colour photos seen: 0.12-0.25.
MAX_ASPECT_RATIO = 3.0        # longer/shorter side above this -> extreme_aspect_ratio
MIN_GREY_STD = 0.02           # std of the [0,1] grey values below this -> uniform_image
                              # (the development set's lowest is 0.053)
CHROMA_SAMPLE_PIXELS = 1 << 18  # the colour check looks at a fixed grid of about this many pixels

RESAMPLE = Image.Resampling.BILINEAR  # antialiased in Pillow (triangle filter); no ringing/overshoot
REDUCING_GAP = 3.0            # big downscales: integer box-reduce first, then resample (Pillow docs:
                              # 3.0 is indistinguishable from a full resample, and much faster)

FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "GIF")  # what Pillow may try (JPEG includes MPO): no EPS, PDF...
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
               b"MM\x00*")    # files that claim to be a supported image: undecodable -> corrupt
_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # stretched over their own range
_ALPHA_MODES = ("P", "PA", "LA", "La", "RGBA", "RGBa")       # composited on black
_COLOUR_MODES = ("RGB", "RGBX", "CMYK")

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
    contrast: str = "none"    # none | equalize | clahe (see CONTRASTS)
    borders: str = "keep"     # keep | trim (see BORDERS)
    lung_crop: str = "none"   # none | box | mask (see LUNG_CROPS)
    lung_model: str = ""      # SHA-256 of the lung segmenter that lung_crop uses

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
    """A file (path or bytes) as a 2-D float32 grey image in [0, 1].

    `draft_size`: the side the image will be fitted to; JPEGs are then decoded at a reduced
    DCT scale (1/2, 1/4, 1/8) whose shorter side stays >= 2 x draft_size (and >= MIN_SIDE),
    which makes huge photos fast and keeps full quality at the target size.
    `strict`: also refuse images that are implausible as radiographs (colour photographs,
    extreme aspect ratios, near-uniform images); see the MAX_/MIN_ constants above.
    """
    if draft_size is not None and (isinstance(draft_size, bool) or draft_size < 1
                                   or not isinstance(draft_size, numbers.Integral)):
        raise ValueError(f"draft_size must be a positive integer or None, got {draft_size!r}")
    path, stream = _open(source)
    with stream:
        head = stream.read(132)
        stream.seek(0)
        if _is_dicom(head, path):
            gray, rgb = _decode_dicom(stream, path, strict)
        else:
            gray, rgb = _decode_pillow(stream, path, head, strict, draft_size)
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
        stream = open(path, "rb")
    except FileNotFoundError:
        raise InputError("not_found", "no such file", path) from None
    except IsADirectoryError:
        raise InputError("not_found", "this is a folder, not an image file", path) from None
    except OSError as e:
        raise InputError("not_found", f"the file cannot be read ({e.strerror or e})", path) from None
    if os.fstat(stream.fileno()).st_size == 0:
        stream.close()
        raise InputError("empty", "the file is empty (0 bytes)", path)
    return path, stream


def _is_dicom(head: bytes, path: Path | None) -> bool:
    """The 'DICM' magic after the 128-byte preamble, or a .dcm name (files without preamble)."""
    named = path is not None and path.suffix.lower() in (".dcm", ".dicom")
    return head[128:132] == b"DICM" or (named and not head.startswith(_SIGNATURES))


def _check_geometry(width: int, height: int, path) -> None:
    """Size limits, from the header, before any pixel is decoded."""
    if width * height > MAX_PIXELS:
        raise InputError("too_large", f"the image is {width}x{height} pixels; the limit is "
                         f"{MAX_PIXELS:,} pixels", path)
    if min(width, height) < MIN_SIDE:
        raise InputError("too_small", f"the image is {width}x{height} pixels; its shorter side must "
                         f"be at least {MIN_SIDE} pixels", path)


def _decode_pillow(stream, path, head: bytes, strict: bool, draft_size: int | None):
    """(grey, RGB uint8 array or None) for everything Pillow reads; RGB only when strict."""
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
            if im.format in ("JPEG", "MPO"):
                _draft_jpeg(im, draft_size)
            try:
                im.load()
                ImageOps.exif_transpose(im, in_place=True)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError) as e:
                raise InputError("too_large", f"the image is too large to decode safely ({e})",
                                 path) from None
            except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
                if isinstance(e, EOFError) or "truncated" in str(e).lower():
                    raise InputError("truncated", f"the image file is truncated ({e})", path) from None
                raise InputError("corrupt", f"the image data cannot be decoded ({e})", path) from None
            return _pillow_to_gray(im, path, strict)


def _draft_jpeg(im: Image.Image, draft_size: int | None) -> None:
    """Ask libjpeg for YCbCr (colour) or L, at the smallest DCT scale that keeps quality."""
    mode = "YCbCr" if im.mode == "RGB" else im.mode
    if draft_size is None:
        if mode != im.mode:
            im.draft(mode, None)
        return
    keep = max(2 * int(draft_size), MIN_SIDE)   # Pillow picks the largest scale with both sides >= keep
    im.draft(mode, (keep, keep))


def _pillow_to_gray(im: Image.Image, path, strict: bool):
    """(grey float32 [0,1], RGB uint8 array when strict and the image has colour, else None)."""
    if im.mode in _DEEP_MODES:
        return _stretch(np.asarray(im), path), None
    if im.mode in ("1", "L"):
        return _unit8(im.convert("L")), None
    if im.mode == "YCbCr":   # a colour JPEG from _draft_jpeg: Y is the luma
        return _unit8(im.getchannel(0)), (np.asarray(im.convert("RGB")) if strict else None)
    if im.mode in _ALPHA_MODES:
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        rgb = Image.alpha_composite(black, im.convert("RGBA")).convert("RGB")
    elif im.mode in _COLOUR_MODES:
        rgb = im.convert("RGB")
    else:
        raise InputError("unsupported_mode", f"images in Pillow mode {im.mode!r} are not supported",
                         path)
    return _unit8(rgb.convert("L")), (np.asarray(rgb) if strict else None)


def _unit8(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float32) / np.float32(255)


def _stretch(values: np.ndarray, path) -> np.ndarray:
    """Min-max stretch of the image's own range to [0, 1] (float32); a constant image -> zeros."""
    lo, hi = float(values.min()), float(values.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError("corrupt", "the image has non-finite pixel values (NaN or infinity)", path)
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    out = values.astype(np.float32)                  # one float copy, then in place: memory
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _decode_dicom(stream, path, strict: bool):
    """(grey, RGB float [0,1] or None) of a DICOM file's first frame.

    Grey images: stored values -> RescaleSlope/Intercept (modality units, e.g. HU) -> the
    first VOI window (WindowCenter/WindowWidth, DICOM PS3.3 C.11.2.1.2 linear function) when
    present, else the min-max range -> MONOCHROME1 inverted, so that bone is always bright.
    Modality/VOI LUT sequences and non-linear VOI functions are not applied.
    Colour images (RGB, YBR_*): luma of the RGB values, scaled by their bit depth.
    """
    try:
        import pydicom
    except ImportError:
        raise InputError("dicom_unsupported", "this is a DICOM file but pydicom is not installed; "
                         "install pydicom (pip install 'cxr-edge[edge]')", path) from None
    try:
        ds = pydicom.dcmread(stream, force=True)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on broken files
        code = "truncated" if isinstance(e, EOFError) else "corrupt"
        raise InputError(code, f"not a readable DICOM file ({e})", path) from None
    if not all(keyword in ds for keyword in ("PixelData", "Rows", "Columns")):
        raise InputError("not_an_image", "the DICOM file holds no image (no PixelData, Rows, "
                         "Columns)", path)
    rows, cols = int(ds.Rows), int(ds.Columns)
    _check_geometry(cols, rows, path)
    pixels = _dicom_first_frame(ds, path)

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 3:
        rgb = pixels.astype(np.float32) / np.float32(2 ** int(ds.get("BitsStored", 8)) - 1)
        rgb = np.clip(rgb, 0.0, 1.0)
        gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(gray, 0.0, 1.0).astype(np.float32), (rgb if strict else None)
    if samples != 1 or pixels.ndim != 2:
        raise InputError("unsupported_mode", f"DICOM images with {samples} samples per pixel are not "
                         "supported", path)
    values = pixels.astype(np.float64) * _dicom_number(ds, "RescaleSlope", 1.0) \
        + _dicom_number(ds, "RescaleIntercept", 0.0)
    centre, width = _dicom_number(ds, "WindowCenter", None), _dicom_number(ds, "WindowWidth", None)
    if centre is not None and width is not None and width >= 1:
        gray = np.clip((values - (centre - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
    else:
        gray = _stretch(values, path)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        gray = np.float32(1) - gray
    return gray, None


def _dicom_first_frame(ds, path) -> np.ndarray:
    """The first frame's stored values, decoding only that frame where pydicom can (>= 3.0)."""
    try:
        try:
            from pydicom.pixels import pixel_array
        except ImportError:  # pydicom 2.x decodes all frames
            pixels = ds.pixel_array
            return pixels[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels
        return pixel_array(ds, index=0)
    except Exception as e:  # noqa: BLE001
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed:
            raise InputError("dicom_unsupported", f"this DICOM's compression ({syntax.name}) cannot be "
                             f"decoded here; install pylibjpeg or GDCM, or export it uncompressed "
                             f"({e})", path) from None
        if "less than expected" in str(e) or "truncated" in str(e).lower():
            raise InputError("truncated", f"the DICOM pixel data is truncated ({e})", path) from None
        raise InputError("corrupt", f"the DICOM pixel data cannot be decoded ({e})", path) from None


def _dicom_number(ds, keyword: str, default):
    """A numeric attribute (the first value when multi-valued), or `default` when absent/blank."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    if isinstance(value, Sequence) and not isinstance(value, str):   # pydicom's MultiValue
        if len(value) == 0:
            return default
        value = value[0]
    return float(value)


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
    std = float(gray.std(dtype=np.float64))
    if std < MIN_GREY_STD:
        raise InputError("uniform_image", f"the image is nearly uniform (grey std {std:.4f} < "
                         f"{MIN_GREY_STD}); nothing to screen", path)


def _mean_chroma(rgb: np.ndarray) -> float:
    """Mean of max(R,G,B) - min(R,G,B) in [0, 1], on a fixed grid of ~CHROMA_SAMPLE_PIXELS."""
    step = max(1, int(math.sqrt(rgb.shape[0] * rgb.shape[1] / CHROMA_SAMPLE_PIXELS)))
    sample = rgb[::step, ::step]
    chroma = sample.max(axis=2) - sample.min(axis=2)   # never negative, so uint8 cannot wrap
    return float(chroma.mean()) / (255.0 if rgb.dtype == np.uint8 else 1.0)


# ---------------------------------------------------------------------------------------------
# fit, normalise

def fit_square(gray: np.ndarray, size: int, fit: str = "crop") -> np.ndarray:
    """A (size, size) float32 image in [0, 1].

    crop: the centred square of side min(h, w) is resampled to size (shorter side -> size).
    pad: the whole image is resampled so its longer side is size, then centred on black.
    Resampling is Pillow's antialiased bilinear on a float ('F') image: deterministic.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    gray = np.ascontiguousarray(gray, dtype=np.float32)
    if gray.ndim != 2 or 0 in gray.shape:
        raise ValueError(f"fit_square needs a non-empty 2-D grey image, got shape {gray.shape}")
    size = int(size)
    h, w = gray.shape
    image = Image.fromarray(gray)  # mode 'F'
    if fit == "crop":
        side = min(h, w)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        out = np.asarray(image.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP))
    else:
        scale = size / max(h, w)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        inner = np.asarray(image.resize((new_w, new_h), RESAMPLE, reducing_gap=REDUCING_GAP))
        out = np.zeros((size, size), np.float32)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        out[top:top + new_h, left:left + new_w] = inner
    return np.clip(out, 0.0, 1.0, dtype=np.float32)


def equalize(image: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a [0, 1] image, exact: each value -> the share of pixels at or
    below it. Any monotone grey curve (a scanner's windowing, gamma) gives the same output."""
    _, inverse, counts = np.unique(image, return_inverse=True, return_counts=True)
    cdf = np.cumsum(counts, dtype=np.float64) / image.size
    return cdf[inverse].reshape(image.shape).astype(np.float32)


def clahe(image: np.ndarray, tiles: int = CLAHE_TILES, clip_limit: float = CLAHE_CLIP,
          bins: int = CLAHE_BINS) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a [0, 1] image (Zuiderveld 1994, as in
    OpenCV): each of tiles x tiles regions gets the equalisation of its own histogram, clipped at
    `clip_limit` times a flat one so that noise in flat regions is not amplified, the clipped
    excess spread over all bins; a pixel's value is the bilinear blend of its four nearest tiles'
    mappings, so tile edges do not show."""
    h, w = image.shape
    q = np.minimum((np.asarray(image, np.float32) * np.float32(bins)).astype(np.int32), bins - 1)
    th, tw = -(-h // tiles), -(-w // tiles)
    padded = np.pad(q, ((0, th * tiles - h), (0, tw * tiles - w)), mode="reflect")
    blocks = padded.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles * tiles, th * tw)
    offsets = np.arange(tiles * tiles)[:, None] * bins
    hist = np.bincount((blocks + offsets).ravel(), minlength=tiles * tiles * bins)
    hist = hist.reshape(tiles * tiles, bins).astype(np.float64)
    limit = max(clip_limit * th * tw / bins, 1.0)
    excess = np.maximum(hist - limit, 0.0).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / bins
    mapping = (np.cumsum(hist, axis=1) / (th * tw)).astype(np.float32).ravel()   # [tile row, tile col, bin]

    def neighbours(n, tile):   # per pixel: lower and upper tile index, weight of the upper one
        centre = np.arange(n, dtype=np.float32) / tile - np.float32(0.5)   # OpenCV's convention
        low = np.floor(centre).astype(np.int32)
        weight = np.where((low >= 0) & (low < tiles - 1), centre - low, np.float32(0)).astype(np.float32)
        return np.clip(low, 0, tiles - 1), np.clip(low + 1, 0, tiles - 1), weight

    y0, y1, wy = neighbours(h, th)
    x0, x1, wx = neighbours(w, tw)
    rows0, rows1 = (y0 * tiles * bins)[:, None], (y1 * tiles * bins)[:, None]   # flat indices
    cols0, cols1 = x0 * bins + q, x1 * bins + q
    wy = wy[:, None]
    top = mapping[rows0 + cols0] * (1 - wx) + mapping[rows0 + cols1] * wx
    bottom = mapping[rows1 + cols0] * (1 - wx) + mapping[rows1 + cols1] * wx
    return np.clip(top * (1 - wy) + bottom * wy, 0.0, 1.0)


def trim_borders(gray: np.ndarray) -> np.ndarray:
    """The image without uniform rows and columns at its edges (grey std < BORDER_STD), at most
    BORDER_MAX_TRIM of each side from each edge: black letterboxing, white scanner frames."""
    def kept(stds: np.ndarray) -> slice:
        limit = int(len(stds) * BORDER_MAX_TRIM)
        busy = np.flatnonzero(stds >= BORDER_STD)
        if busy.size == 0:
            return slice(0, len(stds))
        return slice(min(busy[0], limit), len(stds) - min(len(stds) - 1 - busy[-1], limit))

    # a row's std from at most ~BORDER_SAMPLES of its pixels (and a column's alike): a 7000-pixel
    # film costs no more than a small one, and uniformity shows as well
    col_step, row_step = max(1, gray.shape[1] // BORDER_SAMPLES), max(1, gray.shape[0] // BORDER_SAMPLES)
    rows = kept(gray[:, ::col_step].std(axis=1))
    cols = kept(gray[rows][::row_step].std(axis=0))
    return gray[rows, cols]


# ---------------------------------------------------------------------------------------------
# lung step (InputSpec.lung_crop): the logic lives in edge_app.lungs, this is its place in `square`

def lung_step(gray: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The image cropped to its lung field (after the border trim, before fitting the square).

    Refuses with InputError `no_chest_found` when no plausible lung field is found; needs the
    segmenter named by spec.lung_model to be opened first (`edge_app.lungs.use`)."""
    if spec.lung_crop == "none":
        return gray
    from edge_app import lungs   # lazily: lungs imports this module

    return lungs.crop(gray, spec)


# ---------------------------------------------------------------------------------------------

def square(gray: np.ndarray, spec: InputSpec) -> np.ndarray:
    """[border trim], [lung crop], fit_square, [contrast]: the (size, size) [0, 1] image before normalise."""
    if spec.borders == "trim":
        gray = trim_borders(gray)
    gray = lung_step(gray, spec)
    out = fit_square(gray, spec.size, spec.fit)
    if spec.contrast == "equalize":
        return equalize(out)
    return clahe(out) if spec.contrast == "clahe" else out


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
    x = np.repeat(x[..., None], spec.channels, axis=-1)
    if spec.normalisation == "unit":
        out = x
    elif spec.normalisation == "symmetric":
        out = x * np.float32(2) - np.float32(1)
    elif spec.normalisation == "raw255":
        out = x * np.float32(255)
    elif spec.normalisation == "caffe":
        out = x * np.float32(255) - CAFFE_BGR_MEAN
    elif spec.normalisation == "torch":
        out = (x - TORCH_MEAN) / TORCH_STD
    else:
        raise ValueError(f"unknown normalisation {spec.normalisation!r}; known: {NORMALISATIONS}")
    return out.astype(np.float32, copy=False)


def load(source, spec: InputSpec, *, strict: bool = False) -> np.ndarray:
    """decode + square: the (size, size) grey [0, 1] image training caches."""
    return square(decode(source, strict=strict, draft_size=spec.size), spec)


def preprocess(source, spec: InputSpec, *, strict: bool = False) -> np.ndarray:
    """The model input for one file: (size, size, channels) float32."""
    return normalise(load(source, spec, strict=strict), spec)
