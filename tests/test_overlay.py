"""The Result screen's X-ray square is the model input's square, so the heat map lies where the model looked."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_app import preprocess
from edge_app.app.overlay import display_square


@pytest.fixture(scope="module")
def framed_xray(shared_data, tmp_path_factory):
    """A real X-ray placed off-centre on a canvas: a white scanner frame on top, black letterboxing
    on the left and a wider one on the right (8-bit PNG)."""
    xray = sorted((shared_data / "test" / "normal").iterdir())[0]
    gray = np.round(preprocess.decode(xray) * 255).astype(np.uint8)
    h, w = gray.shape
    canvas = np.zeros((h + 40, w + 90), np.uint8)
    canvas[:40] = 255
    canvas[40:, 20:20 + w] = gray
    path = tmp_path_factory.mktemp("overlay") / "framed.png"
    Image.fromarray(canvas).save(path)
    return path


@pytest.mark.parametrize("fit", preprocess.FITS)
@pytest.mark.parametrize("contrast", ("none", "clahe"))
def test_displayed_square_is_the_model_input_square(framed_xray, fit, contrast):
    spec = preprocess.InputSpec(size=96, channels=3, normalisation="symmetric", fit=fit, contrast=contrast,
                                borders="trim")
    model_square = preprocess.load(framed_xray, spec)
    shown = display_square(framed_xray, spec, spec.size)
    assert shown.shape == (spec.size, spec.size) and shown.dtype == np.uint8
    np.testing.assert_array_equal(shown, np.round(model_square * 255).astype(np.uint8))
    # the frame matters here: without the trim the model would see another square
    untrimmed = preprocess.load(framed_xray, preprocess.InputSpec(size=96, fit=fit, contrast=contrast))
    assert np.abs(untrimmed - model_square).max() > 0.2


def test_larger_display_shows_the_same_region(framed_xray):
    """At the app's display size the square covers the same region: reduced to the model's size
    it matches the model input up to resampling, and the white frame is not shown."""
    spec = preprocess.InputSpec(size=96, fit="crop", borders="trim")
    shown = display_square(framed_xray, spec, 4 * spec.size)
    reduced = np.asarray(Image.fromarray(shown.astype(np.float32) / 255).resize(
        (spec.size, spec.size), Image.Resampling.BOX))
    assert np.abs(reduced - preprocess.load(framed_xray, spec)).mean() < 0.01
    assert shown[0].mean() < 250   # the top row is anatomy, not the frame
