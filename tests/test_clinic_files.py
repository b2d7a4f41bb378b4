"""benchmarks/clinic_files.py: full-size clinic files made from real X-rays are what they claim to
be, the same for the same seed, and the device screens each of them."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from benchmarks import clinic_files as clinic
from edge_app import preprocess


@pytest.fixture(scope="module")
def sources(shared_data):
    return sorted((shared_data / "test" / "pneumonia").iterdir())[:2]


@pytest.fixture(scope="module")
def files(sources, tmp_path_factory):
    return clinic.write(sources, tmp_path_factory.mktemp("clinic"), seed=3)


def test_every_kind_is_full_size_and_stored_as_it_says(files):
    assert set(files) == set(clinic.KINDS)
    for kind, path in files.items():
        height, width = preprocess.decode(path).shape if kind != "jpeg95" else np.asarray(Image.open(path)).shape
        assert 2000 <= min(width, height) and max(width, height) <= 3000, (kind, width, height)
    with Image.open(files["png16"]) as im:
        assert im.format == "PNG" and im.mode == "I;16"
        values = np.asarray(im)
        assert values.max() <= 4095 and values.max() - values.min() > 3000   # 12-bit data, full range used
    with Image.open(files["png8"]) as im:
        assert im.mode == "L"
    with Image.open(files["png-rgb"]) as im:
        rgb = np.asarray(im)
        assert im.mode == "RGB" and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    with Image.open(files["jpeg95"]) as im:
        assert im.format == "JPEG"


def test_dicoms_carry_what_clinic_exports_carry(files):
    for kind in ("dicom-mono2", "dicom-mono1", "dicom-voilut", "dicom-3k"):
        ds = pydicom.dcmread(files[kind])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel) == (16, 12, 11, 1)
        assert ds.pixel_array.max() <= 4095
        assert ds.PhotometricInterpretation == ("MONOCHROME1" if kind == "dicom-mono1" else "MONOCHROME2")
        if kind == "dicom-voilut":
            (lut,) = ds.VOILUTSequence
            curve = np.frombuffer(lut.LUTData, "<u2")   # OW: the 12-bit output of each stored value
            assert list(lut.LUTDescriptor) == [4096, 0, 12] and curve.size == 4096
            assert curve.max() <= 4095 and (np.diff(curve.astype(int)) >= 0).all()
            assert "WindowCenter" not in ds
        else:
            assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (clinic.SLOPE, clinic.INTERCEPT)
            assert float(ds.WindowWidth) > 0
    assert (pydicom.dcmread(files["dicom-3k"]).Rows, pydicom.dcmread(files["dicom-3k"]).Columns) == (3000, 3000)


def test_the_same_seed_makes_the_same_files(sources, files, tmp_path):
    again = clinic.write(sources, tmp_path / "again", seed=3, kinds=["png16", "dicom-mono1"])
    other = clinic.write(sources, tmp_path / "other", seed=4, kinds=["png16"])
    for kind, path in again.items():
        assert path.read_bytes() == files[kind].read_bytes(), kind
    assert other["png16"].read_bytes() != files["png16"].read_bytes()


def test_the_device_screens_each_kind_and_sees_the_source_xray(sources, files):
    """Strict decoding accepts every kind; where the kind keeps the source's square shape, the
    model's square of the file is the source X-ray's (noise and windowing aside)."""
    spec = preprocess.InputSpec(size=64, fit="pad")
    for kind, path in files.items():
        source = sources[list(clinic.KINDS).index(kind) % len(sources)]
        seen = preprocess.square(preprocess.decode(path, strict=True, draft_size=spec.size), spec)
        assert seen.std() > 0.05, kind
        if clinic.KINDS[kind].width == clinic.KINDS[kind].height:
            expected = preprocess.load(source, spec)
            assert np.corrcoef(seen.ravel(), expected.ravel())[0, 1] > 0.9, kind


def test_unknown_kinds_are_refused(sources, tmp_path):
    with pytest.raises(ValueError, match="unknown clinic file kind"):
        clinic.write(sources, tmp_path, kinds=["tiff"])
