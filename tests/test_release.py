"""The device checks a released model against the SHA256SUMS beside it."""
import shutil

import pytest

from conftest import run_module
from edge_app import release
from edge_app.classifier import Classifier
from edge_app.errors import ModelError


@pytest.fixture
def released(tmp_path, tiny_run):
    for name in ("fp32.tflite", "int8.tflite"):
        shutil.copy(tiny_run / "tflite" / name, tmp_path)
    release.write_sums(tmp_path, ["fp32.tflite", "int8.tflite"])
    return tmp_path


def test_an_untampered_release_loads(released):
    assert Classifier(released / "int8.tflite", accelerator="cpu").card.variant == "int8"


def test_a_tampered_byte_is_refused_with_checksum_mismatch(released):
    path = released / "int8.tflite"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="damaged or was changed") as info:
        Classifier(path, accelerator="cpu")
    assert info.value.code == "checksum_mismatch"
    assert info.value.path == str(path) and "SHA256SUMS expects" in info.value.message
    assert Classifier(released / "fp32.tflite", accelerator="cpu")  # the others still load


def test_a_model_missing_from_the_sums_or_a_garbled_sums_file_is_refused(released, tiny_run):
    shutil.copy(tiny_run / "tflite" / "fp16.tflite", released)
    with pytest.raises(ModelError, match="not listed") as info:
        Classifier(released / "fp16.tflite", accelerator="cpu")
    assert info.value.code == "checksum_mismatch"
    (released / release.SUMS_FILE).write_text("not a checksum line\n")
    with pytest.raises(ModelError, match="line 1") as info:
        Classifier(released / "fp32.tflite", accelerator="cpu")
    assert info.value.code == "checksum_mismatch"


def test_a_binary_sums_file_is_refused_without_a_traceback(released):
    (released / release.SUMS_FILE).write_bytes(b"\xff\xd8\xff\xe0 a JPEG, not checksums \x00\x9c")
    with pytest.raises(ModelError, match="not a text file") as info:
        Classifier(released / "int8.tflite", accelerator="cpu")
    assert info.value.code == "checksum_mismatch"
    result = run_module("edge_app", "predict", "x.jpg", "--model", released / "int8.tflite", check=False)
    assert result.returncode == 2 and "error [checksum_mismatch]" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_outside_a_release_loads_without_sums(tiny_run):
    assert not (tiny_run / "tflite" / release.SUMS_FILE).exists()
    assert Classifier(tiny_run / "tflite" / "fp16.tflite", accelerator="cpu").card.variant == "fp16"
