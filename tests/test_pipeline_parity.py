"""Training and the device must feed the model identical tensors for the same file."""
import dataclasses

import numpy as np
import pytest

from edge_app import preprocess
from train.data.records import Record


@pytest.mark.parametrize("spec", [
    preprocess.InputSpec(size=96, channels=1, normalisation="unit"),
    preprocess.InputSpec(size=128, channels=3, normalisation="symmetric", fit="pad"),
    preprocess.InputSpec(size=64, channels=3, normalisation="torch"),
    preprocess.InputSpec(size=96, channels=3, normalisation="symmetric", contrast="equalize"),
    preprocess.InputSpec(size=96, channels=3, normalisation="symmetric", contrast="clahe", borders="trim"),
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
