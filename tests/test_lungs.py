"""The lung field: regions, plausibility checks, the box and the crop, and the preprocessing's step."""
import hashlib

import numpy as np
import pytest

from edge_app import lungs, preprocess
from edge_app.errors import InputError, ModelError


def two_lungs(size=96, speck=False):
    mask = np.zeros((size, size), bool)
    mask[20:70, 15:40] = True       # the image's right lung
    mask[22:75, 55:82] = True       # the left one
    if speck:
        mask[5, 5] = True
    return mask


def test_regions_are_8_connected_and_largest_first():
    mask = two_lungs(speck=True)
    mask[70, 40] = True             # touches the first lung only diagonally
    found = lungs.regions(mask)
    assert [int(r.sum()) for r in found] == [53 * 27, 50 * 25 + 1, 1]
    assert not found[0][20:70, 15:40].any()


def test_lungs_cut_off_at_one_or_two_sides_are_cropped_within_the_image():
    mask = two_lungs()
    mask[:30] |= two_lungs()[20:50]          # the apices run off the top edge
    field = lungs.LungField.of(mask, (96, 96))
    assert field.box[0] == 0.0 and field.lungs_found == 2


def test_box_has_the_margin_and_is_mapped_onto_the_image():
    # a 200 x 300 image is fitted with pad onto 96 px: scale 0.32, 16 rows of black above
    field = lungs.LungField.of(two_lungs(speck=True), (200, 300))
    rows, cols = (20, 75), (15, 82)
    dy, dx = 0.1 * (rows[1] - rows[0]), 0.1 * (cols[1] - cols[0])
    expected = ((rows[0] - dy - 16) / 0.32, (cols[0] - dx) / 0.32, (rows[1] + dy - 16) / 0.32, (cols[1] + dx) / 0.32)
    np.testing.assert_allclose(field.box, [max(0, expected[0]), expected[1], min(200, expected[2]), expected[3]])
    assert field.lungs_found == 2


def test_the_box_has_the_specs_margin_and_a_missing_margin_reads_as_the_default():
    tight = lungs.LungField.of(two_lungs(), (96, 96), margin=0.05)
    default = lungs.LungField.of(two_lungs(), (96, 96))
    rows, cols = (20, 75), (15, 82)
    np.testing.assert_allclose(tight.box, [20 - 0.05 * 55, 15 - 0.05 * 67, 75 + 0.05 * 55, 82 + 0.05 * 67])
    assert default.box[0] < tight.box[0] and default.margin == preprocess.LUNG_MARGIN == 0.10
    spec = preprocess.InputSpec(size=64, lung_crop="box", lung_model="0" * 64)
    assert preprocess.InputSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "lung_margin"}) == spec
    for bad in (-0.1, 0.6, "0.1"):
        with pytest.raises(ValueError, match="lung_margin"):
            preprocess.InputSpec(size=64, lung_margin=bad)


def test_the_box_spans_the_two_lungs_not_smaller_regions():
    mask = two_lungs()
    mask[85:95, 0:12] = True                 # dark air outside the body, taken for lung
    assert lungs.LungField.of(mask, (96, 96)).box == lungs.LungField.of(two_lungs(), (96, 96)).box


def test_one_lung_only_keeps_the_full_width_and_does_not_blank():
    mask = np.zeros((96, 96), bool)
    mask[20:80, 50:85] = True
    field = lungs.LungField.of(mask, (96, 96))
    assert field.lungs_found == 1 and field.mask is None
    assert field.box[1] == 0.0 and field.box[3] == 96.0
    gray = np.random.default_rng(0).random((96, 96)).astype(np.float32)
    np.testing.assert_array_equal(field.crop(gray, blank=True), field.crop(gray, blank=False))


def zoomed_in():
    mask = np.zeros((96, 96), bool)
    mask[:, :30] = mask[:50, 60:] = True     # runs off the top, bottom, left and right edges
    return mask


@pytest.mark.parametrize("mask, words", [
    (np.zeros((96, 96), bool), "no lung field"),
    (np.ones((96, 96), bool), "implausible lung field"),
    (zoomed_in(), "runs off the image on 4 sides"),
])
def test_no_or_implausible_lungs_are_refused(mask, words):
    with pytest.raises(InputError) as e:
        lungs.LungField.of(mask, (500, 400))
    assert e.value.code == "no_chest_found" and words in e.value.message


def test_crop_is_a_square_on_the_image_and_mask_blanks_outside_the_lungs():
    gray = np.random.default_rng(1).uniform(0.2, 1.0, (300, 240)).astype(np.float32)
    field = lungs.LungField.of(two_lungs(), gray.shape)
    box_crop = field.crop(gray, blank=False)
    assert box_crop.shape[0] == box_crop.shape[1]
    assert (box_crop > 0).mean() > 0.9           # the square stays on the image where it can
    masked = field.crop(gray, blank=True)
    assert masked.shape == box_crop.shape
    blanked = (masked == 0) & (box_crop > 0)
    assert 0.1 < blanked.mean() < 0.8            # the gap between and around the lungs is black
    np.testing.assert_array_equal(masked[~blanked], box_crop[~blanked])


def test_spec_needs_the_segmenter_hash():
    with pytest.raises(ValueError, match="lung_model"):
        preprocess.InputSpec(size=96, lung_crop="box")
    with pytest.raises(ValueError, match="lung_crop"):
        preprocess.InputSpec(size=96, lung_crop="lungs", lung_model="0" * 64)


def test_crop_without_the_segmenter_loaded_is_a_model_error(shared_data):
    spec = preprocess.InputSpec(size=96, lung_crop="box", lung_model="f" * 64)
    image = sorted((shared_data / "val" / "normal").iterdir())[0]
    with pytest.raises(ModelError) as e:
        preprocess.load(image, spec)
    assert e.value.code == "lung_model_missing"


def test_segmenter_file_crops_real_images(lung_segmenter, shared_data):
    segmenter = lungs.use(lung_segmenter)
    assert segmenter.sha256 == hashlib.sha256(lung_segmenter.read_bytes()).hexdigest()
    assert segmenter.card.name == "test-prior"
    box = preprocess.InputSpec(size=64, lung_crop="box", lung_model=segmenter.sha256)
    none = preprocess.InputSpec(size=64)
    for image in sorted((shared_data / "val" / "covid").iterdir())[:3]:
        gray = preprocess.decode(image)
        field = segmenter.find(gray)
        top, left, bottom, right = field.box
        assert 0 <= top < bottom <= gray.shape[0] and 0 <= left < right <= gray.shape[1]
        cropped = preprocess.load(image, box)
        assert cropped.shape == (64, 64)
        assert not np.array_equal(cropped, preprocess.load(image, none))


def film_with_lungs(grey: float, body: float = 0.98, size: int = 300) -> np.ndarray:
    """A square film: two lung-shaped ellipses at `grey` on a body at `body` (where the stand-in segmenter
    of conftest looks for lungs; it takes neither 0.98 nor its inverse for lung)."""
    yy, xx = np.mgrid[:size, :size] / size
    film = np.full((size, size), body, np.float32)
    for cx in (0.3, 0.7):
        film[((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1] = grey
    return film


def test_a_negative_film_is_refused_and_its_positive_cropped(lung_segmenter):
    """The stand-in is sure of lungs at grey 0.2 and unsure of them at 0.8 (p 0.73): the film with lungs at
    0.8 is the negative of the one with lungs at 0.2, which the inverse check finds."""
    segmenter = lungs.use(lung_segmenter)
    positive = film_with_lungs(0.2)
    assert segmenter.find(positive).lungs_found == 2
    timings = {}
    with pytest.raises(InputError) as e:
        segmenter.find(1.0 - positive, timings=timings)
    assert e.value.code == "negative_image" and "negative" in e.value.message
    assert timings["lungs"] > 0                 # every inference timed as the lung stage
    spec = preprocess.InputSpec(size=64, lung_crop="box", lung_model=segmenter.sha256)
    with pytest.raises(InputError) as e:
        preprocess.square8(1.0 - positive, spec)  # the preprocessing's lung step: training and the device
    assert e.value.code == "negative_image"


def knows_up(square, timings=None):
    """A stand-in segmenter's lung probabilities that know which way is up: sure of two lungs where the
    square's top rows (a film's neck band) are brighter than its bottom rows, unsure of them otherwise."""
    return np.where(two_lungs(), 0.99 if square[:8].mean() > square[-8:].mean() + 0.2 else 0.7, 0.01)


def test_a_film_turned_on_its_side_is_refused(lung_segmenter, monkeypatch):
    """Turned either way: rotated_image; inverted: negative_image; upright, 300 x 240 (so a turned candidate
    is checked on the turned shape): cropped."""
    segmenter = lungs.use(lung_segmenter)
    monkeypatch.setattr(segmenter, "probabilities", knows_up)
    upright = np.full((300, 240), 0.3, np.float32)
    upright[:40] = 0.95
    assert segmenter.find(upright).lungs_found == 2
    for turns in (1, 3):
        with pytest.raises(InputError) as e:
            segmenter.find(np.rot90(upright, turns))
        assert e.value.code == "rotated_image" and "turned on its side" in e.value.message
    with pytest.raises(InputError) as e:
        segmenter.find(1.0 - upright)
    assert e.value.code == "negative_image"


def test_an_unsure_film_that_no_undoing_makes_surer_is_cropped_not_refused(lung_segmenter, monkeypatch):
    segmenter = lungs.use(lung_segmenter)
    monkeypatch.setattr(segmenter, "probabilities", knows_up)
    no_way_up = np.full((300, 240), 0.3, np.float32)      # unsure as it is, inverted and turned
    assert knows_up(preprocess.square(no_way_up, segmenter.spec)).max() < lungs.MISSTORED_CHECK_BELOW
    assert segmenter.find(no_way_up).lungs_found == 2


def test_classifier_file_carries_its_segmenter_and_the_device_crops_with_it(lung_segmenter, shared_data, tmp_path,
                                                                            monkeypatch):
    import train  # noqa: F401
    import tf_keras as keras

    from convert import export
    from edge_app import decision
    from edge_app.classifier import Classifier
    from edge_app.model_card import ModelCard
    from edge_app.tflite_metadata import CARD_METADATA_NAME, write_metadata

    spec = preprocess.InputSpec(size=64, channels=3, normalisation="symmetric", lung_crop="box",
                                lung_model=lungs.use(lung_segmenter).sha256)
    image = keras.Input((64, 64, 3), name="image")
    logits = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(image))
    flatbuffer = export.convert(keras.Model(image, logits), "fp32")
    card = ModelCard(name="tiny", task="3class", labels=("normal", "pneumonia", "covid"), input=spec)
    path = tmp_path / "fp32.tflite"
    path.write_bytes(export.with_card(flatbuffer, card, "fp32"))
    assert path.stat().st_size > len(flatbuffer) + lung_segmenter.stat().st_size

    monkeypatch.setattr(lungs, "_opened", {})      # the device has only the classifier file
    classifier = Classifier(path, accelerator="cpu")
    assert classifier.segmenter.sha256 == spec.lung_model   # what the benchmark times (test_lung_step.py)
    xray = sorted((shared_data / "val" / "normal").iterdir())[0]
    prediction = classifier.predict(xray)            # the device's path: decode, square (lung crop), normalise
    expected = decision.calibrated_probabilities(classifier.logits(preprocess.preprocess(xray, spec)[None])[0])
    np.testing.assert_array_equal(list(prediction.probabilities.values()), expected)
    assert prediction.timings_ms["lungs"] > 0       # the segmenter's inference, its own stage
    stages = sum(prediction.timings_ms[s] for s in ("decode", "preprocess", "lungs", "inference", "postprocess"))
    assert stages == pytest.approx(prediction.timings_ms["total"], abs=0.05)
    for blank in (0.0, 0.9):                       # no lungs on a blank film: refused, not scored
        with pytest.raises(InputError) as e:
            classifier.predict_array(np.full((300, 300), blank, np.float32))
        assert e.value.code == "no_chest_found"

    bare = tmp_path / "bare.tflite"                 # the card asks for a crop, the file lacks the segmenter
    bare.write_bytes(write_metadata(flatbuffer, CARD_METADATA_NAME, card.to_json().encode()))
    with pytest.raises(ModelError) as e:
        Classifier(bare, accelerator="cpu")
    assert e.value.code == "lung_model_missing"


def test_training_leaves_out_what_the_lung_step_refuses(lung_segmenter, shared_data, tmp_path):
    from PIL import Image

    from train.data.records import Record
    from train.pipeline import lung_refusals

    white = tmp_path / "white.png"
    Image.new("L", (300, 300), 240).save(white)
    negative = tmp_path / "negative.png"
    Image.fromarray(np.rint(255 * (1.0 - film_with_lungs(0.2))).astype(np.uint8)).save(negative)
    files = sorted((shared_data / "val" / "normal").iterdir())[:2] + [white, negative]
    records = [Record(path=f, label="normal", split="val", patient_id=None, source=None) for f in files]
    spec = preprocess.InputSpec(size=64, lung_crop="box", lung_model=lungs.use(lung_segmenter).sha256)
    refused = lung_refusals(records, spec, progress=False)
    assert [(r["file"], r["code"]) for r in refused] == [(str(white), "no_chest_found"),
                                                         (str(negative), "negative_image")]
    assert lung_refusals(records, preprocess.InputSpec(size=64), progress=False) == []


def test_lung_box_shape_follows_the_film_and_is_ranked_within_each_group(lung_segmenter, tmp_path):
    """train.lung_box: the box of a film stretched 1.3 x in width is 1.3 x as wide for its height; a film
    without lungs is refused, not measured; groups too small are left out, the refused counted."""
    from PIL import Image

    from train import lung_box

    segmenter = lungs.use(lung_segmenter)
    spec = preprocess.InputSpec(size=64, lung_crop="box", lung_model=segmenter.sha256)
    square = Image.fromarray(film_with_lungs(0.2))
    files = {}
    for name, width in (("square", 300), ("wide", 390)):
        film = np.asarray(square.resize((width, 300), Image.Resampling.BILINEAR))
        files[name] = tmp_path / f"{name}.png"
        Image.fromarray(np.round(film * 255).astype(np.uint8)).save(files[name])
    ratios = {name: lung_box.box_ratio(path, spec) for name, path in files.items()}
    assert ratios["wide"] / ratios["square"] == pytest.approx(1.3, rel=0.08)
    Image.fromarray(np.full((300, 300), 250, np.uint8)).save(tmp_path / "blank.png")
    assert lung_box.box_ratio(tmp_path / "blank.png", spec) is None

    names = ["a"] * 10 + ["b"] * 10 + ["c"] * 3
    ratios = [*np.linspace(0.9, 1.2, 10), None, *np.linspace(0.9, 1.2, 9), 1.0, 1.0, 1.0]
    p_abnormal = [*np.linspace(0.9, 0.1, 10), *np.linspace(0.1, 0.9, 10), 0.5, 0.5, 0.5]
    table = lung_box.groups(ratios, p_abnormal, names)
    assert set(table) == {"a", "b"}                                   # c: 3 films, below MIN_GROUP
    assert table["a"]["n"] == 10 and table["a"]["refused"] == 0
    assert table["a"]["ratio_median"] == pytest.approx(1.05)
    assert table["a"]["spearman_ratio_p_abnormal"] == pytest.approx(-1.0)   # narrower -> more abnormal
    assert table["b"]["n"] == 9 and table["b"]["refused"] == 1
    assert table["b"]["spearman_ratio_p_abnormal"] == pytest.approx(1.0)
    assert lung_box.groups(ratios, None, names)["a"]["spearman_ratio_p_abnormal"] is None   # no logits saved
    assert table["a"]["referred"] is None                              # no threshold given
    assert lung_box.groups(ratios, p_abnormal, names, threshold=0.5)["a"]["referred"] == 5   # 0.9 ... 0.54
    lung_box.plot({"val": table}, {"val": {n: [r for r, m in zip(ratios, names) if m == n and r is not None]
                                           for n in table}}, tmp_path / "lung_box.png")
    assert Image.open(tmp_path / "lung_box.png").size[1] > 100
