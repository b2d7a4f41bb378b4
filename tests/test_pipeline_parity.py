"""Training and the device must feed the model identical tensors for the same file."""
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
