"""edge_app.preprocess on real files: every format, every error code, the geometry, the maths.

Inputs are written into tmp_path with Pillow, numpy and pydicom; one real chest X-ray comes
from the shared development set (the `shared_data` fixture of tests/conftest.py, which fails,
never skips, when the set is missing).
"""
from __future__ import annotations

import io
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

from edge_app import preprocess as pp
from edge_app.errors import InputError

pytestmark = pytest.mark.device  # make test-device: no TensorFlow


# --- helpers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xray_file(shared_data):
    """One real chest X-ray (256x256 8-bit grey JPEG) from the shared set."""
    files = sorted((shared_data / "test" / "normal").iterdir())
    assert files, f"no images in {shared_data / 'test' / 'normal'}"
    return files[0]


@pytest.fixture(scope="module")
def xray(xray_file) -> np.ndarray:
    """Its 8-bit pixels, as Pillow decodes them."""
    with Image.open(xray_file) as im:
        assert im.mode == "L"
        return np.asarray(im).copy()


def save(path, image: Image.Image, **params):
    image.save(path, **params)
    return path


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A non-uniform 8-bit grey test image: a ramp plus noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, w)[None, :] + np.linspace(0, 40, h)[:, None]
    return np.clip(ramp + rng.integers(0, 16, (h, w)), 0, 255).astype(np.uint8)


def colourful(h: int, w: int) -> np.ndarray:
    """A saturated RGB test image (hue sweep): a colour photograph stand-in."""
    hue = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    value = np.linspace(80, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    hsv = np.stack([hue, np.full_like(hue, 200), value], -1)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def error_code(source, **kw) -> str:
    with pytest.raises(InputError) as info:
        pp.decode(source, **kw)
    return info.value.code


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def grey_png(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit grey PNG with a hand-made header and the given compressed data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def black_png(width: int, height: int) -> bytes:
    """A complete, valid black PNG of any size, built row by row (kilobytes, not the image)."""
    z = zlib.compressobj(6)
    row = bytes(width + 1)   # filter byte 0 + zero pixels
    return grey_png(width, height, b"".join(z.compress(row) for _ in range(height)) + z.flush())


def write_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", *, bits_stored=12, **attrs):
    """A minimal uncompressed DICOM (CR) file: 16-bit grey, or 8-bit RGB when pixels are (h, w, 3)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3
    frames = pixels.shape[0] if pixels.ndim == 3 and not colour else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else photometric
    if colour:
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint8 if colour else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_ramp(h=80, w=96) -> np.ndarray:
    """12-bit stored values, 100..3995, varying across the image."""
    return np.linspace(100, 3995, h * w).reshape(h, w).round().astype(np.uint16)


# --- decoding: formats --------------------------------------------------------------------------

def test_real_xray_decodes_to_its_own_pixels_and_passes_strict(xray_file, xray):
    gray = pp.decode(xray_file, strict=True)
    assert gray.dtype == np.uint8 and gray.shape == xray.shape
    np.testing.assert_array_equal(gray, xray)
    np.testing.assert_array_equal(pp.decode(xray_file.read_bytes()), gray)   # bytes == path
    np.testing.assert_array_equal(pp.decode(str(xray_file)), gray)


def test_8bit_formats_give_the_same_pixels(tmp_path, xray):
    expected = xray
    grey = Image.fromarray(xray)
    lossless = {
        "png": save(tmp_path / "x.png", grey),
        "bmp": save(tmp_path / "x.bmp", grey),
        "tiff": save(tmp_path / "x.tiff", grey),
        "tiff_lzw": save(tmp_path / "x_lzw.tiff", grey, compression="tiff_lzw"),
        "gif": save(tmp_path / "x.gif", grey),
        "rgb_png": save(tmp_path / "rgb.png", grey.convert("RGB")),   # grey stored as RGB
        "palette_png": save(tmp_path / "p.png", grey.convert("P")),
    }
    for name, path in lossless.items():
        np.testing.assert_array_equal(pp.decode(path), expected, err_msg=name)
    jpeg = pp.decode(save(tmp_path / "x.jpg", grey, quality=95))
    assert np.abs(jpeg.astype(float) - expected).mean() < 2.5


def robust_stretch(values: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """The documented deep-image stretch, written out: the 0.5/99.5 percentiles of `grid` (the
    values the decoder samples; default all of them) -> 0 and 255, rounded, clipped."""
    lo, hi = np.percentile(values if grid is None else grid, (0.5, 99.5))
    return np.clip(np.rint((values.astype(np.float64) - lo) * (255 / (hi - lo))), 0, 255).astype(np.uint8)


def test_16bit_png_with_12bit_content_is_stretched_robustly(tmp_path):
    values = np.linspace(100, 3995, 100 * 120).reshape(100, 120).round().astype(np.uint16)
    expected = robust_stretch(values)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    for path in (save(tmp_path / "x16.png", image), save(tmp_path / "x16.tiff", image),
                 save(tmp_path / "i32.tiff", Image.fromarray(values.astype(np.int32) - 2000)),
                 save(tmp_path / "f32.tiff", Image.fromarray(values.astype(np.float32) / 7))):
        gray = pp.decode(path)
        assert gray.dtype == np.uint8 and gray.min() == 0 and gray.max() == 255, path.name
        assert np.abs(gray.astype(int) - expected).max() <= 1, path.name   # f32: rounding of /7
    constant = pp.decode(save(tmp_path / "flat16.png", Image.fromarray(np.full((70, 70), 900, np.uint16))))
    np.testing.assert_array_equal(constant, np.zeros((70, 70), np.uint8))   # no division by zero


def test_one_hot_pixel_does_not_squash_a_12bit_film(tmp_path, xray):
    """Outside attack (7): one pixel at 65535 in a 12-bit film stored in a 16-bit PNG made the
    min-max stretch map the whole film to ~0 (uniform_image, or a wildly different score)."""
    film = (xray.astype(np.uint16) * 16 + 8)                   # 12-bit data, 8..4088
    hot = film.copy()
    hot[100, 100] = 65535
    dead = film.copy()
    dead[5, 200] = 0
    spec = pp.InputSpec(size=128, channels=3, normalisation="symmetric")
    reference = pp.preprocess(save(tmp_path / "film.png", Image.fromarray(film)), spec, strict=True)
    for name, image in (("hot", hot), ("dead", dead)):
        x = pp.preprocess(save(tmp_path / f"{name}.png", Image.fromarray(image)), spec, strict=True)
        assert np.abs(x - reference).mean() < 0.01, name       # the same film, one pixel apart


def test_exif_orientation_is_honoured(tmp_path):
    pixels = np.zeros((80, 120), np.uint8)          # landscape, bright block top-left
    pixels[:32, :40] = 255
    exif = Image.Exif()
    exif[0x0112] = 6                                 # "rotate 90° clockwise to display"
    path = save(tmp_path / "rotated.jpg", Image.fromarray(pixels), exif=exif, quality=95)
    gray = pp.decode(path)
    assert gray.shape == (120, 80)                   # portrait after rotation
    expected = np.rot90(pixels, k=-1).astype(np.float32)
    assert np.abs(gray - expected).mean() < 5
    assert gray[:40, -32:].mean() > 230 and gray[40:].mean() < 25   # the block is now top-right


def test_gif_first_frame(tmp_path):
    frames = [Image.fromarray(textured(70, 90, seed)) for seed in (1, 2)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(pp.decode(path), np.asarray(frames[0]))


def test_colour_becomes_luma_and_alpha_is_composited_on_black(tmp_path):
    rgb = colourful(80, 100)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(pp.decode(save(tmp_path / "c.png", Image.fromarray(rgb))), expected)

    rgba = np.dstack([rgb, np.full((80, 100), 255, np.uint8)])
    rgba[:, :50, 3] = 0                               # left half fully transparent
    gray = pp.decode(save(tmp_path / "c_alpha.png", Image.fromarray(rgba, "RGBA")))
    assert np.all(gray[:, :50] == 0)
    np.testing.assert_array_equal(gray[:, 50:], expected[:, 50:])


def test_colour_jpeg_uses_the_codecs_luma_as_drafted_to_l(tmp_path):
    path = save(tmp_path / "c.jpg", Image.fromarray(colourful(300, 400)), quality=90)
    with Image.open(path) as im:
        im.draft("L", (128, 128))
        expected = np.asarray(im)
    np.testing.assert_array_equal(pp.decode(path, draft_size=64), expected)


def test_unsupported_mode(tmp_path):
    path = save(tmp_path / "lab.tiff", Image.fromarray(colourful(80, 80)).convert("LAB"))
    assert error_code(path) == "unsupported_mode"


# --- decoding: DICOM ----------------------------------------------------------------------------

def test_dicom_monochrome2_and_monochrome1(tmp_path):
    values = dicom_ramp()
    stretched = robust_stretch(values)
    mono2 = pp.decode(write_dicom(tmp_path / "m2.dcm", values, "MONOCHROME2"))
    assert mono2.dtype == np.uint8 and mono2.shape == values.shape
    np.testing.assert_array_equal(mono2, stretched)
    mono1 = pp.decode(write_dicom(tmp_path / "m1.dcm", values, "MONOCHROME1"))
    np.testing.assert_array_equal(mono1, 255 - stretched)          # inverted: bone bright


def test_dicom_rescale_then_first_window(tmp_path):
    values = dicom_ramp()
    hu = values * 2.0 - 1024                          # slope 2, intercept -1024
    c, w = 500.0, 2000.0
    expected = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255   # DICOM PS3.3 C.11.2.1.2
    path = write_dicom(tmp_path / "w.dcm", values, RescaleSlope=2, RescaleIntercept=-1024,
                       WindowCenter=[c, 40], WindowWidth=[w, 400])  # first of several windows
    gray = pp.decode(path)
    assert np.abs(gray - expected).max() <= 0.51
    assert gray.min() == 0 and gray.max() == 255 and 50 < gray.mean() < 230   # both ends clipped
    # without a window: the rescaled values are stretched (an affine rescale changes nothing)
    no_window = pp.decode(write_dicom(tmp_path / "nw.dcm", values, RescaleSlope=2, RescaleIntercept=-1024))
    np.testing.assert_array_equal(no_window, robust_stretch(hu))


def test_dicom_voi_lut_sequence_and_sigmoid_window_are_pydicoms_own(tmp_path):
    """The VOI stage is pydicom's `apply_voi_lut`: a VOI LUT sequence and a SIGMOID window
    work, and the output range of the LUT/window is what maps to 0..255."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_voi_lut

    values = dicom_ramp()
    path = write_dicom(tmp_path / "lut.dcm", values)
    ds = dcmread(path)
    item = Dataset()
    lut = (np.sqrt(np.arange(4096) / 4095) * 1023).round().astype(np.uint16)   # a gamma-like curve, 10 bits
    item.LUTDescriptor = [4096, 0, 10]
    item.add_new(0x00283006, "US", lut.tolist())           # LUTData
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    np.testing.assert_array_equal(pp.decode(path), np.rint(lut[values] * (255 / 1023)).astype(np.uint8))

    sigmoid = write_dicom(tmp_path / "sig.dcm", values, WindowCenter=2000, WindowWidth=1500,
                          VOILUTFunction="SIGMOID")
    ds = dcmread(sigmoid)
    lo, hi = apply_voi_lut(np.array([0.0, 4095.0]), ds)     # what the window outputs for 12 bits
    expected = (apply_voi_lut(values.astype(np.float64), ds) - lo) * (255 / (hi - lo))
    assert np.abs(pp.decode(sigmoid) - expected).max() <= 0.51


def block_means(values: np.ndarray, factor: int) -> np.ndarray:
    """Rounded means of factor x factor blocks (partial blocks dropped), written out in int64."""
    h, w = values.shape[0] // factor, values.shape[1] // factor
    sums = values[:h * factor, :w * factor].astype(np.int64).reshape(h, factor, w, factor).sum(axis=(1, 3))
    return (sums + factor * factor // 2) // (factor * factor)


@pytest.mark.parametrize("signed", [False, True])
def test_dicom_bits_above_bits_stored_are_ignored_at_every_reduction(tmp_path, signed):
    """Stored values with junk in the 4 unused high bits: pydicom's pixel_array masks them
    (unsigned) or sign-extends bit 11 (signed); decode, which corrects them itself on a view of
    the pixel data, strip by strip while it reduces, gives the image of the clean values."""
    import pydicom

    rng = np.random.default_rng(11)
    low = -2048 if signed else 0
    clean = (rng.integers(0, 4096, (1000, 1402)) + low).astype(np.int16 if signed else np.uint16)
    junk = clean.view(np.uint16) & np.uint16(0x0FFF) | (rng.integers(0, 16, clean.shape) << 12).astype(np.uint16)
    path = write_dicom(tmp_path / "junk.dcm", junk, PixelRepresentation=int(signed))
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, clean)   # pydicom's own reading
    for draft, factor in ((None, 1), (224, 2), (100, 5), (60, 8)):          # 1000 // max(2 x draft, 64)
        means = block_means(clean, factor)
        step = max(1, int((means.size / pp.STRETCH_SAMPLE_PIXELS) ** 0.5))
        np.testing.assert_array_equal(pp.decode(path, draft_size=draft),
                                      robust_stretch(means, means[::step, ::step]), err_msg=f"factor {factor}")


@pytest.mark.parametrize("dtype, bits", [(np.uint8, 8), (np.uint16, 12), (np.uint16, 10), (np.uint16, 16),
                                         (np.int16, 12), (np.int16, 16), (np.int32, 20), (np.uint32, 32)])
def test_block_mean_is_the_exact_rounded_mean(dtype, bits):
    """Every integer depth and reduction factor (16-bit sums where they cannot overflow, 32 or
    64 bits elsewhere), with and without the unused-bits correction: the int64 rounded mean."""
    rng = np.random.default_rng(bits)
    info = np.iinfo(dtype)
    for factor in (2, 3, 4, 5, 7, 8, 16):
        shape = (67 * factor + 3, 45 * factor + 1)    # rows over several strips; partial blocks dropped
        top = min(int(info.max), 2 ** bits - 1 if info.min == 0 else 2 ** (bits - 1) - 1)
        values = rng.integers(-top - 1 if info.min else 0, top, shape, endpoint=True).astype(dtype)
        reduced = pp._block_mean(values, factor, bits)
        assert reduced.dtype == values.dtype
        np.testing.assert_array_equal(reduced, block_means(values, factor), err_msg=f"factor {factor}")
        shift = 8 * values.dtype.itemsize - bits
        if shift and values.dtype.itemsize <= 2:     # junk above `bits`: corrected as pydicom does
            raw = values.view(np.uint8 if dtype == np.uint8 else np.uint16) | np.array(
                rng.integers(0, 2 ** shift, shape) << bits).astype(np.uint8 if dtype == np.uint8 else np.uint16)
            np.testing.assert_array_equal(pp._block_mean(raw.view(dtype), factor, bits, shift),
                                          block_means(values, factor), err_msg=f"factor {factor}, shift")
            one_junk = values.view(raw.dtype).copy()     # clean bits but one pixel's: still corrected
            one_junk[-4, 2] |= one_junk.dtype.type(1 << bits)
            for stored in (values.view(raw.dtype), one_junk):
                np.testing.assert_array_equal(pp._block_mean(stored.view(dtype), factor, bits, shift),
                                              block_means(values, factor), err_msg=f"factor {factor}, shift")


def test_3k_16bit_dicom_is_never_held_whole_while_decoding(tmp_path):
    """A 3,000 x 3,000 12-bit DICOM (17 MiB of pixel data), decoded for a model in a fresh
    process: the peak resident memory grows by less than half the pixel data (it is read and
    reduced a strip at a time; 30bd3e5 grew by 43 MiB: the file's bytes and pydicom's corrected
    copy), and the whole process stays under the [clinic] peak-RSS gate of benchmarks/gates.toml
    (which also holds a model)."""
    import tomllib

    values = (np.random.default_rng(2).integers(0, 4096, (3000, 3000))).astype(np.uint16)
    path = write_dicom(tmp_path / "3k.dcm", values, WindowCenter=2048, WindowWidth=4096)
    code = ("import sys; import numpy; import pydicom.pixels; from edge_app import preprocess as pp\n"
            f"{PEAK_MIB}\n"
            "before = peak_mib(); pp.decode(sys.argv[1], strict=True, draft_size=224); print(before, peak_mib())")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True, cwd=Path(pp.__file__).parents[1])
    before, peak = map(float, out.stdout.split())
    pixel_mib = values.nbytes / 2 ** 20
    assert peak - before < 0.5 * pixel_mib, f"peak memory grew by {peak - before:.0f} MiB ({pixel_mib:.0f} MiB of pixels)"
    gates = tomllib.loads((Path(pp.__file__).parents[1] / "benchmarks" / "gates.toml").read_text())
    assert peak < gates["clinic"]["max_peak_rss_mib"]


@pytest.mark.parametrize("case", ["explicit", "implicit", "16_bits_stored", "two_frames", "odd_size", "signed_junk"])
def test_dicom_pixels_read_in_strips_are_pydicoms(tmp_path, monkeypatch, case):
    """Plain 16-bit grey files are read from the file a strip at a time (`_DicomFrameRows`);
    the image is the one pydicom's own `pixel_array` gives (the path taken for every other
    file), from a path and from bytes, at every reduction."""
    from pydicom.uid import ImplicitVRLittleEndian

    shape = (1001, 1399) if case == "odd_size" else (900, 1200)
    values = pattern(*shape, 4095).astype(np.uint16)
    attrs = {"WindowCenter": 1800, "WindowWidth": 2500}
    if case == "16_bits_stored":
        values, attrs = pattern(*shape, 65535).astype(np.uint16), {"bits_stored": 16}
    elif case == "two_frames":
        values = np.stack([values, values[::-1]])
    elif case == "signed_junk":
        values = (pattern(*shape, 4095) - 2048).astype(np.int16).view(np.uint16) | np.uint16(0x5000)
        attrs = {"PixelRepresentation": 1}
    path = write_dicom(tmp_path / f"{case}.dcm", values, **attrs)
    if case == "implicit":
        from pydicom import dcmread

        ds = dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    for draft in (None, 224, 100):
        in_strips = pp.decode(path, draft_size=draft)
        np.testing.assert_array_equal(pp.decode(path.read_bytes(), draft_size=draft), in_strips)
        with monkeypatch.context() as m:
            m.setattr(pp._DicomFrameRows, "of", classmethod(lambda cls, ds, stream, keep: None))
            np.testing.assert_array_equal(pp.decode(path, draft_size=draft), in_strips, err_msg=f"draft {draft}")
    read = []
    monkeypatch.setattr(pp._DicomFrameRows, "__getitem__",
                        lambda self, rows, get=pp._DicomFrameRows.__getitem__: read.append(rows) or get(self, rows))
    pp.decode(path, draft_size=224)
    assert read                                                  # the strips were taken


def test_dicom_detected_by_magic_multiframe_colour(tmp_path):
    values = dicom_ramp()
    frames = np.stack([values, values[::-1]])
    data = write_dicom(tmp_path / "multi.dcm", frames).read_bytes()
    np.testing.assert_array_equal(pp.decode(data), robust_stretch(values))   # bytes, first frame
    renamed = tmp_path / "no_suffix.img"
    renamed.write_bytes(data)
    np.testing.assert_array_equal(pp.decode(renamed), robust_stretch(values))

    rgb = colourful(80, 96)
    gray = pp.decode(write_dicom(tmp_path / "rgb.dcm", rgb))
    np.testing.assert_array_equal(gray, np.asarray(Image.fromarray(rgb).convert("L")))   # ITU-R 601 luma
    assert error_code(tmp_path / "rgb.dcm", strict=True) == "colour_photo"


def test_dicom_without_pydicom_says_what_to_install(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "m2.dcm", dicom_ramp())
    monkeypatch.setitem(sys.modules, "pydicom", None)          # `import pydicom` now fails
    with pytest.raises(InputError) as info:
        pp.decode(path)
    assert info.value.code == "dicom_unsupported"
    assert "pip install" in info.value.message and info.value.path == str(path)


def test_dicom_size_is_checked_before_its_pixels(tmp_path):
    path = write_dicom(tmp_path / "small.dcm", dicom_ramp(40, 96))
    assert error_code(path) == "too_small"
    from pydicom import dcmread
    ds = dcmread(path)
    ds.Rows = ds.Columns = 8000                    # 64 MP declared, a few KB of pixel data
    ds.save_as(tmp_path / "huge.dcm")
    assert error_code(tmp_path / "huge.dcm") == "too_large"


def test_truncated_dicom(tmp_path):
    data = write_dicom(tmp_path / "full.dcm", dicom_ramp()).read_bytes()
    (tmp_path / "half.dcm").write_bytes(data[: len(data) // 2])
    assert error_code(tmp_path / "half.dcm") == "truncated"


# --- strict checks ------------------------------------------------------------------------------

def test_strict_refuses_colour_photos_but_not_grey_or_annotated_xrays(tmp_path, xray):
    photo = Image.fromarray(colourful(240, 320))
    for path in (save(tmp_path / "photo.png", photo), save(tmp_path / "photo.jpg", photo, quality=90)):
        assert pp.decode(path).shape == (240, 320)                     # fine for training
        assert error_code(path, strict=True) == "colour_photo"

    for chroma, passes in ((0.5 * pp.MAX_MEAN_CHROMA, True), (1.5 * pp.MAX_MEAN_CHROMA, False)):
        x = xray.astype(np.float64) / 255                # tinted film: blue/green reduced by k * x
        k = chroma / x.mean()
        tinted = (np.stack([x, x * (1 - k), x * (1 - k)], -1) * 255).round().astype(np.uint8)
        path = save(tmp_path / f"tinted_{chroma:.2f}.png", Image.fromarray(tinted))
        if passes:
            pp.decode(path, strict=True)
        else:
            assert error_code(path, strict=True) == "colour_photo"

    grey_rgb = Image.fromarray(xray).convert("RGB")
    pp.decode(save(tmp_path / "grey_rgb.jpg", grey_rgb, quality=90), strict=True)

    annotated = grey_rgb.copy()                                        # a red arrow, ~3% of the area
    ImageDraw.Draw(annotated).polygon([(150, 40), (230, 40), (230, 30), (250, 50), (230, 70),
                                       (230, 60), (150, 60)], fill=(255, 0, 0))
    for path in (save(tmp_path / "arrow.png", annotated), save(tmp_path / "arrow.jpg", annotated)):
        gray = pp.decode(path, strict=True)
        assert gray.shape == xray.shape


def test_strict_aspect_ratio_uniformity(tmp_path):
    narrow = save(tmp_path / "narrow.png", Image.fromarray(textured(64, 200)))   # 1:3.125
    assert pp.decode(narrow).shape == (64, 200)
    assert error_code(narrow, strict=True) == "extreme_aspect_ratio"
    pp.decode(save(tmp_path / "ok.png", Image.fromarray(textured(64, 192))), strict=True)   # 1:3

    rng = np.random.default_rng(0)
    flat = np.clip(128 + rng.normal(0, 1, (100, 100)), 0, 255).astype(np.uint8)   # std ~0.004
    path = save(tmp_path / "flat.png", Image.fromarray(flat))
    assert pp.decode(path).shape == (100, 100)
    assert error_code(path, strict=True) == "uniform_image"


# --- errors ---------------------------------------------------------------------------------------

def test_error_codes_carry_the_path(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image\n" * 20)
    (tmp_path / "scan.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" * 10)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    save(tmp_path / "small.png", Image.fromarray(textured(63, 200)))
    cases = [("not_found", "missing.png"), ("not_found", "."), ("empty", "empty.png"),
             ("not_an_image", "notes.txt"), ("not_an_image", "scan.pdf"),
             ("corrupt", "corrupt.png"), ("too_small", "small.png")]
    for code, name in cases:
        path = tmp_path / name
        with pytest.raises(InputError) as info:
            pp.decode(path)
        assert (info.value.code, info.value.path) == (code, str(path)), name
        assert info.value.message
    assert error_code(b"") == "empty"
    assert error_code(b"hello world" * 20) == "not_an_image"
    with pytest.raises(TypeError):
        pp.decode(12345)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files(tmp_path, xray, fmt):
    buffer = io.BytesIO()
    Image.fromarray(xray).save(buffer, fmt)
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert error_code(path) == "truncated"


def test_huge_images_are_refused_from_the_header_without_decoding(tmp_path):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    filters_before = list(warnings.filters)
    cases = {
        "pillow_bomb_error": grey_png(20000, 20000, zlib.compress(bytes(20001))),    # 400 MP
        "pillow_bomb_warning": grey_png(10000, 10000, zlib.compress(bytes(10001))),  # 100 MP
        "own_limit": black_png(7100, 7100),          # 50.4 MP, complete and valid: only MAX_PIXELS refuses it
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # no DecompressionBombWarning may escape
        for name, data in cases.items():
            path = tmp_path / f"{name}.png"
            path.write_bytes(data)
            assert len(data) < 100_000
            assert error_code(path) == "too_large", name
    assert warnings.filters == filters_before
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024  # KiB on Linux
    assert grown_mib < 40, f"peak memory grew by {grown_mib:.0f} MiB"


# --- defects found by an outside attack ---------------------------------------------------------

def decode_within(seconds: float, source):
    """decode in a daemon thread: a hang fails the test instead of blocking the suite."""
    result = {}

    def run():
        try:
            result["value"] = pp.decode(source)
        except Exception as e:  # noqa: BLE001 - handed to the test
            result["error"] = e
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"decode({source}) hangs"
    return result


def test_pipes_sockets_and_devices_are_refused_before_opening(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)                                   # opening it for reading would block forever
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "image.sock"))
    try:
        for path in (fifo, tmp_path / "image.sock", Path("/dev/zero")):
            error = decode_within(10, path).get("error")
            assert isinstance(error, InputError) and error.code == "not_an_image", path
            assert "not a regular file" in error.message and error.path == str(path)
    finally:
        server.close()


def dicom_patched(tmp_path, old: bytes, new: bytes, **attrs):
    """A valid DICOM whose bytes `old` (present once) are replaced by `new` of the same length."""
    data = write_dicom(tmp_path / "valid.dcm", dicom_ramp(), **attrs).read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path = tmp_path / "patched.dcm"
    path.write_bytes(data.replace(old, new))
    return path


@pytest.mark.parametrize("old, new, message", [
    (b"12345", b"abc  ", "WindowCenter is not a number"),
    (b"1.0 ", b"abc ", "RescaleSlope is not a number"),
    (b"1.0 ", b"nan ", "RescaleSlope is not finite"),
    (b"1.0 ", b"inf ", "RescaleSlope is not finite"),
    (b"1.0 ", b"-inf", "RescaleSlope is not finite"),
    (b"\x28\x00\x50\x10DS", b"\x28\x00\x50\x10ZZ", "Unknown Value Representation"),   # WindowCenter's VR
    (b"\x28\x00\x01\x01US", b"\x28\x00\x01\x01ZZ", "Unknown Value Representation"),   # BitsStored's VR
    (b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.5.1.1\x00", "not supported"),  # a UID, not a syntax
])
def test_malformed_dicom_attributes_are_corrupt_not_tracebacks(tmp_path, old, new, message):
    path = dicom_patched(tmp_path, old, new, WindowCenter="12345", WindowWidth="3000",
                         RescaleSlope="1.0", RescaleIntercept="0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)        # no NaN arithmetic on the way
        with pytest.raises(InputError) as info:
            pp.decode(path)
    assert info.value.code == "corrupt" and message in info.value.message


def test_dicom_without_preamble_or_file_meta_reads_the_same_as_path_and_bytes(tmp_path):
    values = dicom_ramp()
    data = write_dicom(tmp_path / "full.dcm", values).read_bytes()
    expected = pp.decode(data)
    from pydicom import dcmread
    ds = dcmread(tmp_path / "full.dcm")
    del ds.file_meta                                  # a bare dataset, implicit VR little endian
    ds.save_as(tmp_path / "bare.raw", enforce_file_format=False, implicit_vr=True, little_endian=True)
    for name, body in (("no_preamble.img", data[132:]), ("bare.raw", (tmp_path / "bare.raw").read_bytes())):
        path = tmp_path / name
        path.write_bytes(body)
        np.testing.assert_array_equal(pp.decode(path), expected, err_msg=name)
        np.testing.assert_array_equal(pp.decode(body), expected, err_msg=name)


def jpeg_ended_early(xray, share: float, progressive: bool = False) -> bytes:
    """A 1024 px JPEG of the film cut after `share` of its bytes, with an end-of-image marker."""
    buffer = io.BytesIO()
    Image.fromarray(xray).resize((1024, 1024)).save(buffer, "JPEG", quality=95, progressive=progressive)
    data = buffer.getvalue()
    return data[: int(len(data) * share)] + b"\xff\xd9"


@pytest.mark.parametrize("share", [0.6, 0.3, 0.95])
def test_jpeg_ended_early_is_truncated_not_screened(xray, share):
    """Outside attack (6): libjpeg fills the missing rows with grey and only warns."""
    data = jpeg_ended_early(xray, share)
    with Image.open(io.BytesIO(data)) as im:
        assert (np.asarray(im)[-8:] == 128).all()     # the decoder's fill, decoded without an error
    for draft_size in (None, 224, 64):
        with pytest.raises(InputError) as info:
            pp.decode(data, draft_size=draft_size)
        assert info.value.code == "truncated" and "grey fill" in info.value.message


def test_films_with_a_grey_or_black_bottom_edge_are_not_truncated(tmp_path, xray):
    film = np.asarray(Image.fromarray(xray).resize((512, 512))).copy()
    for value in (0, 127, 255):
        film[-40:] = value                            # a uniform band, not the decoder's fill
        path = save(tmp_path / f"band{value}.jpg", Image.fromarray(film), quality=100)
        pp.decode(path, strict=True)
    film[-3:] = 128                                   # the fill value, but fewer rows than a block
    pp.decode(save(tmp_path / "thin.png", Image.fromarray(film)), strict=True)


PEAK_MIB = ("def peak_mib():\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024")


def test_16bit_png_at_the_pixel_limit_stays_within_its_documented_memory(tmp_path):
    """MAX_PIXELS's comment promises ~0.15 GB at the limit (it was 660 MiB): measured in a fresh process."""
    z = zlib.compressobj(6)
    side = 7000                                       # 49 MP, under MAX_PIXELS
    row = bytes(2 * side + 1)
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", b"".join(z.compress(row) for _ in range(side)) + z.flush())
            + png_chunk(b"IEND", b""))
    path = tmp_path / "big16.png"
    path.write_bytes(data)
    code = ("import sys; from edge_app import preprocess as pp\n"   # VmHWM, not ru_maxrss: a child
            f"{PEAK_MIB}\n"            # started by subprocess (vfork) inherits the parent's ru_maxrss
            "base = peak_mib(); pp.load(sys.argv[1], pp.InputSpec(size=224)); print(peak_mib() - base)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True, cwd=Path(pp.__file__).parents[1])
    grown_mib = float(out.stdout)
    assert grown_mib < 0.15 * 1024, f"peak memory grew by {grown_mib:.0f} MiB"


# --- draft / determinism ----------------------------------------------------------------------------

def test_jpeg_draft_keeps_twice_the_target_and_is_deterministic(tmp_path):
    big = Image.fromarray(textured(1600, 2400)).convert("RGB")
    path = save(tmp_path / "big.jpg", big, quality=90)
    drafted = pp.decode(path, draft_size=224)
    assert drafted.shape == (800, 1200)                       # 1/2 scale: 1/4 would be 400 < 448
    assert pp.decode(path, draft_size=150).shape == (400, 600)   # 1/4: 1/8 would be 200 < 300
    assert pp.decode(path, draft_size=100).shape == (200, 300)   # 1/8: exactly 2 x 100
    assert pp.decode(path, draft_size=8).shape == (67, 100)      # 1/8, libjpeg's smallest scale,
                                                                 # then an integer 1/3: MIN_SIDE
    assert pp.decode(path).shape == (1600, 2400)
    np.testing.assert_array_equal(drafted, pp.decode(path, draft_size=224))
    spec = pp.InputSpec(size=224, channels=3, normalisation="symmetric")
    np.testing.assert_array_equal(pp.preprocess(path, spec), pp.preprocess(path, spec, strict=True))
    full = pp.fit_square(pp.decode(path), 224)
    assert np.abs(pp.load(path, spec) - full).mean() < 0.01   # drafting costs no visible quality


def test_other_formats_are_reduced_to_twice_the_target_by_an_exact_integer_mean(tmp_path):
    film = textured(1500, 2000)
    png = save(tmp_path / "big.png", Image.fromarray(film))
    reduced = pp.decode(png, draft_size=224)                   # 1500 // 448 = 3
    np.testing.assert_array_equal(reduced, np.asarray(Image.fromarray(film).reduce(3)))
    deep = (film.astype(np.uint16) * 16 + 7)                  # 12-bit data in a 16-bit PNG
    reduced16 = pp.decode(save(tmp_path / "big16.png", Image.fromarray(deep)), draft_size=224)
    sums = deep[:, :1998].reshape(500, 3, 666, 3).sum(axis=(1, 3), dtype=np.int64)
    means = (sums + 4) // 9                                    # rounded block means
    np.testing.assert_array_equal(reduced16, robust_stretch(means, means[::2, ::2]))   # percentiles on a
                                                               # grid of <= STRETCH_SAMPLE_PIXELS
    dicom = pp.decode(write_dicom(tmp_path / "big.dcm", deep), draft_size=224)
    np.testing.assert_array_equal(dicom, reduced16)
    assert pp.decode(png, draft_size=1000).shape == (1500, 2000)   # no reduction below 2 x target


# --- fit_square ------------------------------------------------------------------------------------

def test_fit_square_crop_geometry():
    landscape = np.zeros((200, 400), np.float32)
    landscape[:, 90:150] = 1           # the centre crop keeps columns 100..299: the stripe is its left 1/4
    out = pp.fit_square(landscape, 100, "crop")
    assert out.shape == (100, 100) and out.dtype == np.float32
    assert np.all(out[:, :24] == 1) and np.all(out[:, 26:] == 0)
    np.testing.assert_allclose(out[:, 24] + out[:, 25], 1.0, atol=1e-6)   # edge centred at 25
    portrait = np.zeros((400, 200), np.float32)
    portrait[:90] = 1                  # above the kept rows 100..299 (and the filter's reach)
    assert np.all(pp.fit_square(portrait, 50, "crop") == 0)


def test_fit_square_pad_geometry():
    out = pp.fit_square(np.ones((200, 400), np.float32), 100, "pad")   # -> 50x100, rows 25..74
    assert out.shape == (100, 100) and out.dtype == np.float32
    assert np.all(out[:25] == 0) and np.all(out[75:] == 0)
    np.testing.assert_allclose(out[25:75], 1.0, atol=1e-6)
    tall = pp.fit_square(np.ones((300, 100), np.float32), 90, "pad")   # -> 90x30, columns 30..59
    assert np.all(tall[:, :30] == 0) and np.all(tall[:, 60:] == 0)
    np.testing.assert_allclose(tall[:, 30:60], 1.0, atol=1e-6)


def test_fit_square_range_dtype_and_arguments():
    rng = np.random.default_rng(1)
    noisy = rng.random((333, 517)).astype(np.float64)
    for fit in pp.FITS:
        for size in (64, 224, 600):                 # down and up
            out = pp.fit_square(noisy, size, fit)
            assert out.shape == (size, size) and out.dtype == np.float32
            assert out.min() >= 0 and out.max() <= 1
            np.testing.assert_array_equal(out, pp.fit_square(noisy, size, fit))
    np.testing.assert_array_equal(pp.fit_square8(noisy, 224), pp.fit_square8(pp.grey8(noisy), 224))
    for bad in (noisy * 1.5, noisy - 0.1, np.full((70, 70), np.nan), noisy.astype(np.int32)):
        with pytest.raises(ValueError, match="uint8 or float in"):     # never silently clipped
            pp.fit_square(bad, 64)
    with pytest.raises(ValueError):
        pp.fit_square(noisy, 64, "stretch")
    with pytest.raises(ValueError):
        pp.fit_square(noisy[None], 64)
    with pytest.raises(ValueError):
        pp.fit_square(noisy, 0)


# --- normalise --------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalisation, channels, expected", [
    ("unit", 1, lambda x: x[..., None]),
    ("unit", 3, lambda x: np.stack([x] * 3, -1)),
    ("symmetric", 3, lambda x: np.stack([2 * x - 1] * 3, -1)),
    ("raw255", 1, lambda x: 255 * x[..., None]),
    ("caffe", 3, lambda x: np.stack([255 * x - m for m in (103.939, 116.779, 123.68)], -1)),
    ("torch", 3, lambda x: np.stack([(x - m) / s for m, s in
                                     zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))], -1)),
])
def test_normalise_formulas_single_and_batch(normalisation, channels, expected):
    spec = pp.InputSpec(size=8, channels=channels, normalisation=normalisation)
    batch = np.random.default_rng(2).random((5, 8, 8)).astype(np.float32)
    out = pp.normalise(batch, spec)
    assert out.shape == (5, 8, 8, channels) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected(batch.astype(np.float64)), rtol=1e-5, atol=1e-4)
    single = pp.normalise(batch[2], spec)
    assert single.shape == (8, 8, channels)
    np.testing.assert_array_equal(single, out[2])
    with pytest.raises(ValueError):
        pp.normalise(batch[:, :4], spec)


def test_preprocess_is_the_model_input(xray_file):
    spec = pp.InputSpec(size=96, channels=3, normalisation="torch", fit="pad")
    x = pp.preprocess(xray_file, spec, strict=True)
    assert x.shape == (96, 96, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x, pp.normalise(pp.load(xray_file, spec), spec))
    np.testing.assert_array_equal(x, pp.preprocess(xray_file, spec))   # deterministic


# --- InputSpec -------------------------------------------------------------------------------------

def test_input_spec_round_trip():
    spec = pp.InputSpec(size=224, channels=3, normalisation="caffe", fit="pad")
    d = spec.to_dict()
    assert d == {"size": 224, "channels": 3, "normalisation": "caffe", "fit": "pad", "contrast": "none",
                 "borders": "keep", "lung_crop": "none", "lung_model": "", "lung_margin": 0.1}
    assert pp.InputSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert pp.InputSpec.from_dict({"size": 128}) == pp.InputSpec(128)
    assert pp.InputSpec(np.int64(64)).to_dict()["size"].__class__ is int


@pytest.mark.parametrize("d, field", [
    ({"size": 0}, "size"), ({"size": "224"}, "size"), ({"size": True}, "size"), ({}, "size"),
    ({"size": 224, "channels": 2}, "channels"),
    ({"size": 224, "normalisation": "imagenet"}, "normalisation"),
    ({"size": 224, "channels": 1, "normalisation": "torch"}, "normalisation"),
    ({"size": 224, "fit": "stretch"}, "fit"),
    ({"size": 224, "contrast": "wavelet"}, "contrast"),
    ({"size": 224, "borders": "crop"}, "borders"),
    ({"size": 224, "normalization": "unit"}, "normalization"),
])
def test_input_spec_validation_names_the_field(d, field):
    with pytest.raises(ValueError, match=field):
        pp.InputSpec.from_dict(d)


def test_equalize_flattens_the_histogram_and_keeps_the_order_of_grey_levels():
    rng = np.random.default_rng(0)
    dim = (20 + rng.random((128, 128)) ** 2 * 100).round().astype(np.uint8)   # a dark, low-contrast film
    out = pp.equalize(dim)
    assert out.dtype == np.float32 and out.shape == dim.shape
    assert 0.0 <= out.min() and out.max() <= 1.0
    order = np.argsort(dim, axis=None)
    assert (np.diff(out.ravel()[order]) >= 0).all()                 # monotone: anatomy keeps its order
    hist, _ = np.histogram(out, bins=8, range=(0, 1))
    assert hist.min() > 0.8 * out.size / 8                         # every eighth of the range used alike
    # two scanners' curves on the same image give the same equalised image
    gamma = np.rint(255 * ((dim - 20) / 100) ** 0.7).astype(np.uint8)   # keeps every grey level apart
    np.testing.assert_array_equal(pp.equalize(gamma), out)
    np.testing.assert_array_equal(pp.equalize(dim / np.float32(255)), out)   # [0, 1] floats alike
    spec = pp.InputSpec(size=64, contrast="equalize")
    np.testing.assert_array_equal(pp.square(dim, spec), pp.equalize(pp.fit_square(dim, 64)))


def test_equalize_clahe_is_the_same_film_whatever_grey_curve_it_was_stored_with():
    """equalize-clahe: CLAHE's local contrast of the equalised square (8 bits), so a monotone grey curve that
    merges no grey levels (a site's display LUT, gamma, window) leaves the model input unchanged — unlike
    CLAHE alone."""
    rng = np.random.default_rng(0)
    dim = (20 + rng.random((128, 128)) ** 2 * 100).round().astype(np.uint8)
    gamma = np.rint(255 * ((dim - 20) / 100) ** 0.7).astype(np.uint8)   # keeps every grey level apart
    assert len(np.unique(gamma)) == len(np.unique(dim))
    eq8 = pp.equalize8(dim)
    assert eq8.dtype == np.uint8
    np.testing.assert_array_equal(eq8, np.rint(pp.equalize(dim).astype(np.float64) * 255).astype(np.uint8))
    spec = pp.InputSpec(size=64, contrast="equalize-clahe")
    np.testing.assert_array_equal(pp.contrast_step(gamma, spec), pp.contrast_step(dim, spec))
    np.testing.assert_array_equal(pp.contrast_step(dim, spec), pp.clahe(pp.equalize8(dim)))
    assert np.abs(pp.clahe(gamma) - pp.clahe(dim)).mean() > 0.01           # CLAHE alone keeps part of the curve


def test_clahe_without_clipping_on_one_tile_is_histogram_equalisation():
    rng = np.random.default_rng(1)
    image = (np.floor(rng.random((96, 80)) ** 2 * 256) / 256).astype(np.float32)   # on the bin grid
    np.testing.assert_array_equal(pp.clahe(image, tiles=1, clip_limit=1e9), pp.equalize(image))


def test_clahe_equalises_each_region_on_its_own_and_the_clip_limits_the_gain():
    rng = np.random.default_rng(2)
    texture = rng.random((128, 64)).astype(np.float32)
    image = np.concatenate([0.05 + 0.1 * texture, 0.7 + 0.25 * texture], axis=1)   # under/over-exposed halves
    out = pp.clahe(image, tiles=2, clip_limit=1e9)
    assert out.dtype == np.float32 and out.shape == image.shape and 0 <= out.min() and out.max() <= 1
    left, right = out[:, 24:40], out[:, 88:104]                 # around the two tile centres
    assert left.std() == pytest.approx(right.std(), rel=0.1)    # the same local contrast ...
    assert left.mean() == pytest.approx(right.mean(), abs=0.05)  # ... and brightness in both halves
    global_eq = pp.equalize(image)
    assert global_eq[:, 64:].mean() - global_eq[:, :64].mean() > 0.4   # global: still a dark and a bright half
    clipped = pp.clahe(image, tiles=2, clip_limit=2.0)
    assert image[:, 24:40].std() < clipped[:, 24:40].std() < 0.8 * left.std()   # gain, but limited
    # sizes that tiles do not divide, and the contrast step in the spec
    assert pp.clahe(rng.random((100, 77)).astype(np.float32)).shape == (100, 77)
    spec = pp.InputSpec(size=64, contrast="clahe")
    np.testing.assert_array_equal(pp.square(image, spec), pp.clahe(pp.fit_square(image, 64)))


def test_trim_borders_removes_frames_and_letterboxing_but_no_anatomy(xray_file):
    film = pp.decode(xray_file)
    h, w = film.shape
    framed = np.zeros((h + 60, w + 100), np.uint8)         # black letterboxing left and right
    framed[:20] = 255                                      # a white scanner frame on top
    framed[20:20 + h, 50:50 + w] = film
    framed[20 + h:] = 128                                  # a grey band at the bottom
    np.testing.assert_array_equal(pp.trim_borders(framed), pp.trim_borders(film))  # the film's own
    textured = np.random.default_rng(4).integers(0, 256, (90, 120), dtype=np.uint8)
    np.testing.assert_array_equal(pp.trim_borders(textured), textured)  # nothing uniform: unchanged
    blank = np.zeros((200, 200), np.uint8)
    assert pp.trim_borders(blank).shape == (200, 200)                   # all uniform: left alone
    narrow = np.zeros((100, 400), np.uint8)
    narrow[:, 390:] = np.random.default_rng(3).integers(0, 256, (100, 10))
    assert pp.trim_borders(narrow).shape == (100, 300)                  # at most a quarter per edge
    spec = pp.InputSpec(size=64, borders="trim")
    np.testing.assert_array_equal(pp.square(framed, spec), pp.fit_square(pp.trim_borders(film), 64))


def test_trim_borders_reads_only_the_edges_yet_cuts_where_every_line_says():
    """trim_borders reads lines from the edges inwards and stops at the first busy one; it must cut
    exactly where the std of every sampled line (float64 here) says: frames of every width up to and
    past the quarter limit, on one side or several, uniform lines inside the film, all-uniform images."""
    def every_line(gray):
        col_step, row_step = max(1, gray.shape[1] // pp.BORDER_SAMPLES), max(1, gray.shape[0] // pp.BORDER_SAMPLES)

        def kept(std):
            busy, limit = np.flatnonzero(std >= pp.BORDER_STD * 255), int(len(std) * pp.BORDER_MAX_TRIM)
            if busy.size == 0:
                return slice(0, len(std))
            return slice(min(busy[0], limit), len(std) - min(len(std) - 1 - busy[-1], limit))
        rows = kept(gray[:, ::col_step].astype(np.float64).std(axis=1))
        cols = kept(gray[rows][::row_step].astype(np.float64).std(axis=0))
        return gray[rows, cols]

    rng = np.random.default_rng(11)
    for case in range(300):
        h, w = rng.integers(8, 300, 2)
        gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
        for _ in range(rng.integers(0, 5)):            # uniform bands anywhere: edges, inside, past the limit
            axis = rng.integers(0, 2)
            width = rng.integers(1, max(2, (h, w)[axis] // 2))
            at = rng.choice([0, (h, w)[axis] - width, rng.integers(0, (h, w)[axis])])   # top/left, bottom/right, inside
            band = np.s_[at:at + width] if axis == 0 else np.s_[:, at:at + width]
            gray[band] = rng.integers(0, 256)
        if case % 50 == 0:
            gray[:] = rng.integers(0, 256)              # all uniform
        np.testing.assert_array_equal(pp.trim_borders(gray), every_line(gray), err_msg=f"case {case}")


# --- the model input's bits ------------------------------------------------------------------

def pattern(h: int, w: int, top: int) -> np.ndarray:
    """A deterministic film-like test image in 0..top (no RNG: the same on every numpy): a
    smooth ramp with a lighter middle plus integer-hash texture."""
    i, j = np.mgrid[0:h, 0:w].astype(np.int64)
    smooth = (i * 3 + j * 2) * top // (3 * h + 2 * w) // 2 + top // 4 * (abs(j - w // 2) < w // 4)
    texture = ((i * 7919 + j * 104729) ^ (i * j)) % (top // 8 + 1)
    return np.clip(smooth + texture, 0, top)


PINNED_INPUT_BITS = "2f9bcc33695baa92abf4a17a225bdca39ba86a8a8559a2054d76c9649fe24400"   # preprocessing v2 (30bd3e5)


def test_preprocessing_version_2_model_input_bits_are_pinned(tmp_path):
    """The exact model input (SHA-256 of the float32 bytes) of lossless files through every
    step (integer reduction, DICOM bits/LUTs, border trim, fixed-point resize, CLAHE, equalise,
    normalise). Speeding a step up must not change a bit of it; a change that does needs
    PREPROCESSING_VERSION bumped (and this digest renewed) and the models retrained."""
    assert pp.PREPROCESSING_VERSION == "2"
    assert model_input_digest(pp, tmp_path) == PINNED_INPUT_BITS


def model_input_digest(pp, folder: Path) -> str:
    """SHA-256 of the model inputs of `test_preprocessing_version_2_model_input_bits_are_pinned`
    (pp: the preprocessing module, so that an earlier version can be run through it too)."""
    import hashlib

    framed = np.zeros((1300, 1500), np.uint8)
    framed[40:1260, 90:1420] = pattern(1220, 1330, 255)                   # a black frame to trim
    deep = pattern(1500, 1300, 4095).astype(np.uint16)
    junk = deep | np.uint16(0xA000)                                        # bits above BitsStored
    signed = (pattern(1000, 1800, 4095) - 2048).astype(np.int16)
    files = [save(folder / "framed.png", Image.fromarray(framed)),
             save(folder / "deep.png", Image.fromarray(deep)),
             write_dicom(folder / "m1.dcm", junk, "MONOCHROME1", RescaleSlope=0.5, RescaleIntercept=-1024,
                         WindowCenter=0, WindowWidth=1800),
             write_dicom(folder / "signed.dcm", signed, PixelRepresentation=1)]
    specs = [pp.InputSpec(size=224, channels=3, normalisation="symmetric", contrast="clahe", borders="trim"),
             pp.InputSpec(size=96, channels=1, contrast="equalize", fit="pad", borders="trim"),
             pp.InputSpec(size=100, channels=3, normalisation="torch", contrast="clahe"),
             pp.InputSpec(size=64)]
    digest = hashlib.sha256()
    for path in files:
        for spec in specs:
            digest.update(pp.preprocess(path, spec, strict=True).tobytes())
    return digest.hexdigest()
