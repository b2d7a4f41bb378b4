"""Training and the device must feed the model identical tensors for the same file."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from edge_app import preprocess
from train.data.records import Record


@pytest.mark.parametrize("spec", [
    preprocess.InputSpec(size=96, channels=1, normalisation="unit"),
    preprocess.InputSpec(size=128, channels=3, normalisation="symmetric", fit="pad"),
    preprocess.InputSpec(size=64, channels=3, normalisation="torch"),
    preprocess.InputSpec(size=96, channels=3, normalisation="symmetric", contrast="equalize"),
    preprocess.InputSpec(size=96, channels=3, normalisation="symmetric", contrast="clahe", borders="trim"),
    preprocess.InputSpec(size=224, channels=3, normalisation="symmetric", contrast="clahe", borders="trim"),
    preprocess.InputSpec(size=96, channels=3, normalisation="symmetric", contrast="equalize-clahe", borders="trim"),
])
def test_training_pipeline_and_device_give_identical_tensors(shared_data, spec):
    from train.pipeline import load_images, make_dataset

    files = sorted((shared_data / "val" / "covid").iterdir())[:3] + sorted((shared_data / "val" / "normal").iterdir())[:3]
    records = [Record(path=f, label=f.parent.name, split="val", patient_id=None, source=None) for f in files]
    images = load_images(records, spec, progress=False)
    ds = make_dataset(images, np.zeros(len(files), np.int32), spec, batch_size=4, training=False)
    training_tensors = np.concatenate([x.numpy() for x, _ in ds])
    device_tensors = np.stack([preprocess.preprocess(f, spec, strict=True) for f in files])
    assert training_tensors.dtype == device_tensors.dtype == np.float32
    assert training_tensors.shape == (len(files), spec.size, spec.size, spec.channels)
    np.testing.assert_array_equal(training_tensors, device_tensors)
    # the cache holds the squares before the contrast step; everything that feeds them to a model
    # without make_dataset (conversion, Grad-CAM, OOD fits) uses model_inputs: the same tensors
    from train.pipeline import model_inputs
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(model_inputs(images, spec), device_tensors)


def _train_tensors(images, spec, **augmentation):
    """One pass of make_dataset(training=True) in file order (the labels carry the index). One batch:
    the augmentation's random draws then come in one call, the same for every call of this (with
    several batches, the parallel map may take them from the generator in either order)."""
    from train.config import TrainConfig
    from train.pipeline import make_dataset

    still = dict(rotation_degrees=0.0, zoom=0.0, shift=0.0, brightness=0.0, contrast=1e-9)  # RandomContrast needs > 0
    config = TrainConfig(**{**still, **augmentation})
    ds = make_dataset(images, np.arange(len(images), dtype=np.int32), spec, batch_size=len(images), training=True,
                      config=config, seed=3)
    batches = [(x.numpy(), i.numpy()) for x, i in ds]
    x, order = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    return x[np.argsort(order)]


@pytest.mark.parametrize("before", [True, False])
def test_augmentation_before_or_after_the_devices_contrast_step(shared_data, before):
    """With augment_before_contrast, augmentation works on the square before the contrast step and
    every augmented batch then goes through the device's own step: with all augmentation at zero the
    training tensors are the device's bit for bit; a grey curve (gamma) changes a plain image a lot,
    but global equalisation removes it (up to 8-bit rounding) and CLAHE much of it, as they would on
    the device. Without it (the measured default), the same grey curve reaches the model whatever the
    contrast step."""
    from train.pipeline import load_images

    files = sorted((shared_data / "val" / "covid").iterdir())[:3] + sorted((shared_data / "val" / "normal").iterdir())[:3]
    records = [Record(path=f, label=f.parent.name, split="val", patient_id=None, source=None) for f in files]
    change = {}
    for contrast in preprocess.CONTRASTS:
        spec = preprocess.InputSpec(size=96, channels=1, normalisation="unit", contrast=contrast, borders="trim")
        images = load_images(records, spec, progress=False)
        device = np.stack([preprocess.preprocess(f, spec, strict=True) for f in files])
        still = _train_tensors(images, spec, augment_before_contrast=before)
        if before:
            np.testing.assert_array_equal(still, device)
        else:   # the zero augmentation's float arithmetic on the contrasted square, no 8-bit rounding after it
            np.testing.assert_allclose(still, device, atol=1e-6)
        change[contrast] = np.abs(_train_tensors(images, spec, augment_before_contrast=before, gamma=0.4)
                                  - device).mean()
    if before:
        assert change["none"] > 0.03 and change["equalize"] < 0.005 and change["clahe"] < change["none"] * 0.7, change
        assert change["equalize-clahe"] < change["clahe"] * 0.3, change
    else:
        assert min(change.values()) > 0.02, change


# --- bit-identical on every CPU --------------------------------------------------------------------
# Pillow's float ('F') resize differed by one ulp between x86 and aarch64, which moved int8
# probabilities by up to 0.045. The square is now made by Pillow's 8-bit resize, which is
# fixed-point: below, a pure-integer numpy reference of that resize gives the same bits.

PRECISION_BITS = 32 - 8 - 2          # Pillow's Resample.c, 8 bits per channel


def fixed_point_weights(in_size: int, in0: int, in1: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) integer weights of Pillow's antialiased bilinear (triangle) filter
    over the source span [in0, in1), as Resample.c's precompute_coeffs + normalize_coeffs_8bpc."""
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    weights = np.zeros((out_size, in_size), np.int64)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        k = np.array([max(0.0, 1.0 - abs((x + xmin - center + 0.5) / filterscale))
                      for x in range(xmax - xmin)])
        k = k / k.sum()
        weights[xx, xmin:xmax] = [int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0
                                  else int(0.5 + v * (1 << PRECISION_BITS)) for v in k]
    return weights


def integer_resize(image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """uint8 image, integer source box (left, top, right, bottom) -> (height, width): horizontal
    pass, then vertical, each an integer dot product rounded at PRECISION_BITS and clipped."""
    left, top, right, bottom = box
    width, height = size
    h, w = image.shape
    half = 1 << (PRECISION_BITS - 1)
    horizontal = fixed_point_weights(w, left, right, width)
    rows = np.clip((image.astype(np.int64) @ horizontal.T + half) >> PRECISION_BITS, 0, 255)
    vertical = fixed_point_weights(h, top, bottom, height)
    return np.clip((vertical @ rows + half) >> PRECISION_BITS, 0, 255).astype(np.uint8)


def real_films(shared_data, tmp_path, n=3):
    """A few shared films, as they are and upscaled to a clinic's 1100 px (decode reduces that)."""
    files = sorted((shared_data / "test" / "pneumonia").iterdir())[:n]
    big = []
    for f in files:
        with Image.open(f) as im:
            path = tmp_path / f"{f.stem}_1100.png"
            im.convert("L").resize((1100, 1000), Image.Resampling.LANCZOS).save(path)
            big.append(path)
    return files + big


def test_the_square_is_a_pure_integer_resize_of_the_decoded_film(shared_data, tmp_path):
    for path in real_films(shared_data, tmp_path):
        for size in (224, 96):
            gray = preprocess.decode(path, strict=True, draft_size=size)
            assert gray.dtype == np.uint8 and min(gray.shape) < 6 * size   # no reduce step inside the resize
            h, w = gray.shape
            side = min(h, w)
            left, top = (w - side) // 2, (h - side) // 2
            crop = integer_resize(gray, (left, top, left + side, top + side), (size, size))
            np.testing.assert_array_equal(preprocess.fit_square8(gray, size, "crop"), crop, err_msg=path.name)
            new_w, new_h = round(w * size / max(h, w)), round(h * size / max(h, w))
            pad = np.zeros((size, size), np.uint8)
            y, x = (size - new_h) // 2, (size - new_w) // 2
            pad[y:y + new_h, x:x + new_w] = integer_resize(gray, (0, 0, w, h), (new_w, new_h))
            np.testing.assert_array_equal(preprocess.fit_square8(gray, size, "pad"), pad, err_msg=path.name)
            spec = preprocess.InputSpec(size=size, channels=3, normalisation="symmetric")
            expected = np.repeat((crop / np.float32(255) * np.float32(2) - np.float32(1))[..., None], 3, -1)
            np.testing.assert_array_equal(preprocess.preprocess(path, spec, strict=True), expected)


@pytest.mark.parametrize("spec", [
    preprocess.InputSpec(size=224, channels=3, normalisation="symmetric", contrast="clahe", borders="trim"),
    preprocess.InputSpec(size=96, channels=1, normalisation="unit", fit="pad", contrast="equalize"),
])
def test_the_preprocessing_never_resizes_in_float(shared_data, tmp_path, monkeypatch, spec):
    """Every resize and reduce of the pipeline, for every kind of file, is on 8-bit images."""
    modes = []
    for name in ("resize", "reduce"):
        original = getattr(Image.Image, name)

        def spy(self, *args, _original=original, **kwargs):
            modes.append(self.mode)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(Image.Image, name, spy)
    films = real_films(shared_data, tmp_path, n=1)
    film = np.asarray(Image.open(films[1]))
    deep = tmp_path / "deep.png"
    Image.fromarray(film.astype(np.uint16) * 16).save(deep)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(film).convert("RGB").save(rgb)
    for path in films + [deep, rgb]:
        preprocess.preprocess(path, spec, strict=True)
    assert modes and set(modes) <= {"L", "RGB"}, modes


@pytest.mark.parametrize("lung_crop", ["box", "mask"])
def test_lung_crop_gives_identical_tensors_in_training_and_on_the_device(shared_data, lung_segmenter, lung_crop):
    """The lung step runs inside the one preprocessing, so training (load_images -> make_dataset)
    and the device's Classifier path (decode -> square -> normalise) crop alike."""
    from edge_app import lungs
    from train.pipeline import load_images, make_dataset

    sha = lungs.use(lung_segmenter).sha256
    spec = preprocess.InputSpec(size=96, channels=3, normalisation="symmetric", contrast="clahe", borders="trim",
                                lung_crop=lung_crop, lung_model=sha)
    files = sorted((shared_data / "val" / "pneumonia").iterdir())[:3] + sorted((shared_data / "val" / "normal").iterdir())[:3]
    records = [Record(path=f, label=f.parent.name, split="val", patient_id=None, source=None) for f in files]
    ds = make_dataset(load_images(records, spec, progress=False), np.zeros(len(files), np.int32), spec,
                      batch_size=4, training=False)
    training_tensors = np.concatenate([x.numpy() for x, _ in ds])
    device_tensors = np.stack([preprocess.normalise(preprocess.square(preprocess.decode(f, strict=True, draft_size=96),
                                                                      spec), spec) for f in files])
    np.testing.assert_array_equal(training_tensors, device_tensors)
    uncropped = np.stack([preprocess.preprocess(f, dataclasses.replace(spec, lung_crop="none", lung_model=""))
                          for f in files])
    assert not np.array_equal(device_tensors, uncropped)
