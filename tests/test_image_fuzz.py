"""Hostile image files: a seeded mutation fuzz of the decoder, and a corpus of every known defect.

The fuzz mutates seed files (JPEG, PNG, DICOM, TIFF, BMP, GIF, generated here from a shared
film) byte-wise and runs `preprocess(strict=True)` on each mutant in worker processes
(tests/fuzz_worker.py) with a timeout: an exception that is not an `InputError`, a hang, a
crash or a path and its bytes that disagree fail the test, and the offending files are kept.

  FUZZ_N      mutants (default 300, about 10 s; `make fuzz` runs thousands)
  FUZZ_SEED   the mutation seed (default 0): mutant i of a seed is the same file on every machine
  FUZZ_JOBS   worker processes (default 1)
  FUZZ_KEEP   where failing files are copied (default build/fuzz-failures)
"""
from __future__ import annotations

import io
import json
import os
import selectors
import shutil
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_app import preprocess as pp
from edge_app.errors import InputError
from test_preprocess import black_png, colourful, grey_png, write_dicom

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fuzz_worker.py"
FUZZ_N = int(os.environ.get("FUZZ_N", "300"))
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "0"))
FUZZ_JOBS = int(os.environ.get("FUZZ_JOBS", "1"))
FUZZ_KEEP = Path(os.environ.get("FUZZ_KEEP", REPO / "build" / "fuzz-failures"))
TIMEOUT_S = 30.0            # per file: the slowest legitimate case is a ~50 MP header claim
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFF, 0x8000, 0x7FFFFFFF, 0xFFFFFFFF)


@pytest.fixture(scope="module")
def film(shared_data) -> np.ndarray:
    """A real chest film, 8-bit, reduced to 96 x 80 so that each mutant decodes in milliseconds."""
    path = sorted((shared_data / "test" / "pneumonia").iterdir())[0]
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((96, 80), Image.Resampling.LANCZOS))


def seed_files(film: np.ndarray, folder: Path) -> list[Path]:
    """The same film in every supported container."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = Image.fromarray(film)
    deep = Image.fromarray(film.astype(np.uint16) * 16 + 3)           # 12-bit data, 16-bit PNG
    saves = {
        "baseline.jpg": (grey, {"quality": 95}),
        "progressive.jpg": (grey.convert("RGB"), {"quality": 90, "progressive": True}),
        "grey.png": (grey, {}),
        "deep.png": (deep, {}),
        "rgb.png": (grey.convert("RGB"), {}),
        "palette.gif": (grey, {}),
        "lzw.tiff": (grey, {"compression": "tiff_lzw"}),
        "deep.tiff": (deep, {}),
        "grey.bmp": (grey, {}),
    }
    paths = []
    for name, (image, params) in saves.items():
        image.save(folder / name, **params)
        paths.append(folder / name)
    paths.append(write_dicom(folder / "window.dcm", film.astype(np.uint16) * 16, RescaleSlope=2,
                             RescaleIntercept=-1024, WindowCenter=1500, WindowWidth=4000))
    mono1 = write_dicom(folder / "mono1.dcm", film.astype(np.uint16) * 16, "MONOCHROME1")
    (folder / "mono1_no_preamble.dcm").write_bytes(mono1.read_bytes()[132:])
    return paths + [mono1, folder / "mono1_no_preamble.dcm"]


def mutate(data: bytes, others: list[bytes], rng: np.random.Generator) -> bytes:
    """One to three byte-level mutations, half of them in the header (the first 512 bytes)."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        n = len(out)
        at = int(rng.integers(0, min(n, 512))) if rng.random() < 0.5 else int(rng.integers(0, n))
        kind = int(rng.integers(0, 8))
        if kind == 0:                                                # bit flips
            for _ in range(int(rng.integers(1, 9))):
                i = int(rng.integers(0, n))
                out[i] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:                                              # an interesting integer
            fmt = str(rng.choice(["<H", ">H", "<I", ">I", "B"]))
            value = int(rng.choice(INTERESTING)) % (1 << (8 * struct.calcsize(fmt)))
            out[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
        elif kind == 2:                                              # truncation
            del out[max(1, at):]
        elif kind == 3:                                              # random bytes inserted
            out[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        elif kind == 4:                                              # a chunk deleted
            del out[at:at + int(rng.integers(1, 256))]
        elif kind == 5:                                              # a chunk repeated
            chunk = out[at:at + int(rng.integers(1, 256))]
            out[at:at] = chunk * int(rng.integers(1, 4))
        elif kind == 6:                                              # spliced onto another file
            other = others[int(rng.integers(0, len(others)))]
            out = out[:at] + other[int(rng.integers(0, len(other))):]
        else:                                                        # a run of one byte value
            out[at:at + int(rng.integers(1, 128))] = bytes([int(rng.choice([0, 0xFF, 0x80]))]) * 127
        if not out:
            out = bytearray(data[:1])
    return bytes(out)


class Worker:
    """A fuzz_worker.py process; restarted after a hang or a crash."""

    def __init__(self):
        self.process = None

    def run(self, path: Path) -> dict:
        if self.process is None:
            self.process = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            text=True, cwd=REPO)
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        ready = selector.select(TIMEOUT_S)
        selector.close()
        line = self.process.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        timed_out = not ready
        self.stop()
        return {"outcome": "hang" if timed_out else "crash",
                "error": f"no answer in {TIMEOUT_S:g} s" if timed_out else "the worker died"}

    def stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.communicate()
            self.process = None


def run_workers(paths: list[Path], jobs: int) -> list[dict]:
    """Every path through `jobs` workers, in order."""
    results = [None] * len(paths)
    lanes = [paths[i::jobs] for i in range(jobs)]

    def lane(i: int):
        worker = Worker()
        try:
            for k, path in enumerate(lanes[i]):
                results[i + k * jobs] = worker.run(path)
        finally:
            worker.stop()
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lane, range(jobs)))
    return results


def test_mutated_images_only_ever_raise_input_errors(film, tmp_path):
    seeds = seed_files(film, tmp_path / "seeds")
    originals = [p.read_bytes() for p in seeds]
    for path, result in zip(seeds, run_workers(seeds, 1)):
        assert result["outcome"] == "ok", (path.name, result)          # every seed is a good film
    mutants = []
    for i in range(FUZZ_N):
        k = i % len(seeds)
        rng = np.random.default_rng([FUZZ_SEED, i])
        path = tmp_path / "mutants" / f"{i:05d}-{seeds[k].name}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(mutate(originals[k], originals, rng))
        mutants.append(path)
    results = run_workers(mutants, FUZZ_JOBS)
    failures = [(p, r) for p, r in zip(mutants, results) if r["outcome"] not in ("ok", "input_error")]
    if failures:
        FUZZ_KEEP.mkdir(parents=True, exist_ok=True)
        for path, _ in failures:
            shutil.copy(path, FUZZ_KEEP / f"seed{FUZZ_SEED}-{path.name}")
        report = "\n".join(f"  {p.name}: {r['outcome']}: {r['error']}" for p, r in failures[:20])
        first = failures[0][1].get("traceback", "")
        pytest.fail(f"{len(failures)} of {FUZZ_N} mutants (FUZZ_SEED={FUZZ_SEED}) failed; the files are "
                    f"in {FUZZ_KEEP}:\n{report}\n{first}")
    codes = {r.get("code") for r in results}
    assert {"ok", "input_error"} <= {r["outcome"] for r in results}    # the fuzz reaches both ends
    assert len(codes) >= 3, codes


# --- the corpus: every defect class, with its expected outcome ---------------------------------------

def jpeg_bytes(image: np.ndarray, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", **params)
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def dicom_bytes(tmp_path, pixels, photometric="MONOCHROME2", **attrs) -> bytes:
    return write_dicom(tmp_path / "corpus.dcm", pixels, photometric, **attrs).read_bytes()


def patched(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


@pytest.fixture(scope="module")
def big_film(shared_data) -> np.ndarray:
    """A shared film at a clinic's size (1024 px)."""
    path = sorted((shared_data / "test" / "normal").iterdir())[0]
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((1024, 1024), Image.Resampling.LANCZOS))


def corpus(film: np.ndarray, tmp_path: Path) -> dict[str, tuple[bytes | Path, str | np.ndarray]]:
    """name -> (file or bytes, expected error code, or the expected decoded grey image)."""
    deep = film.astype(np.uint16) * 16 + 8
    hot = deep.copy()
    hot[300, 400] = 65535
    hot_expected = pp.decode(png_bytes(deep))
    hot_expected[300, 400] = 255
    window = dict(WindowCenter="12345", WindowWidth="3000", RescaleSlope="1.0", RescaleIntercept="0")
    good_dicom = dicom_bytes(tmp_path, deep)
    dicom_reference = pp.decode(good_dicom)
    windowed = dicom_bytes(tmp_path, deep, **window)
    pixel_data = good_dicom.index(b"\xe0\x7f\x10\x00OW\x00\x00") + 8      # (7FE0,0010) OW, its length
    claims_4_gb = good_dicom[:pixel_data] + struct.pack("<I", 0xFFFFFFF0) + good_dicom[pixel_data + 4:]
    jpeg = jpeg_bytes(film, quality=95)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    flat = np.full((300, 300), 90, np.uint8)
    flat[150, 150] = 255
    return {
        # defects found by the outside attack
        "fifo": (fifo, "not_an_image"),
        "dicom_window_not_a_number": (patched(windowed, b"12345", b"abc  "), "corrupt"),
        "dicom_slope_not_a_number": (patched(windowed, b"1.0 ", b"abc "), "corrupt"),
        "dicom_slope_nan": (patched(windowed, b"1.0 ", b"nan "), "corrupt"),
        "dicom_slope_inf": (patched(windowed, b"1.0 ", b"inf "), "corrupt"),
        "dicom_uid_not_a_transfer_syntax": (patched(good_dicom, b"1.2.840.10008.1.2.1\x00",
                                                    b"1.2.840.10008.5.1.1\x00"), "corrupt"),
        "dicom_unknown_vr": (patched(good_dicom, b"\x28\x00\x01\x01US", b"\x28\x00\x01\x01ZZ"), "corrupt"),
        "dicom_pixel_data_claims_4_gb": (claims_4_gb, dicom_reference),   # read up to the end
        "jpeg_cut_at_60%_with_end_marker": (jpeg[: len(jpeg) * 6 // 10] + b"\xff\xd9", "truncated"),
        "jpeg_early_end_marker": (jpeg[: len(jpeg) // 5] + b"\xff\xd9", "truncated"),
        "png16_one_hot_pixel": (png_bytes(hot), hot_expected),
        "dicom_without_preamble_as_bytes": (good_dicom[132:], dicom_reference),
        # already handled
        "jpeg_truncated": (jpeg[: len(jpeg) // 2], "truncated"),
        "png_truncated": (png_bytes(film)[:20_000], "truncated"),
        "png_corrupt": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "corrupt"),
        "empty": (b"", "empty"),
        "not_an_image": (b"%PDF-1.4\n" * 40, "not_an_image"),
        "decompression_bomb": (grey_png(20000, 20000, zlib.compress(bytes(20001))), "too_large"),
        "over_the_pixel_limit": (black_png(7100, 7100), "too_large"),
        "colour_photo": (png_bytes(colourful(240, 320)), "colour_photo"),
        "tiny": (png_bytes(film[:40, :300]), "too_small"),
        "uniform_with_one_hot_pixel": (png_bytes(flat), "uniform_image"),
        "extreme_aspect_ratio": (png_bytes(film[:100, :400]), "extreme_aspect_ratio"),
        # good files of every kind: the reference film's own pixels
        "png_8bit": (png_bytes(film), film),
        "png_rgb_stored_grey": (png_bytes(np.dstack([film] * 3)), film),
        "dicom_monochrome1": (dicom_bytes(tmp_path, deep.max() + deep.min() - deep, "MONOCHROME1"),
                              dicom_reference),
    }


def test_image_corpus_every_defect_class_has_its_outcome(big_film, tmp_path):
    for name, (data, expected) in corpus(big_film, tmp_path).items():
        sources = [data]
        if isinstance(data, bytes) and data:                # the same bytes as a file: the same outcome
            sources.append(tmp_path / "corpus" / name)
            sources[1].parent.mkdir(exist_ok=True)
            sources[1].write_bytes(data)
        for source in sources:
            if isinstance(expected, str):
                with pytest.raises(InputError) as info:
                    pp.decode(source, strict=True)
                assert info.value.code == expected, (name, info.value.message)
            else:
                np.testing.assert_array_equal(pp.decode(source, strict=True), expected, err_msg=name)
