"""The lung field of a chest X-ray, found by a small segmenter, for the preprocessing's crop step.

The segmenter (`train.lungs`) is a `.tflite` file with its own card (`LungCard`, embedded under
LUNG_CARD_METADATA_NAME). It gets the grey image padded to its small square input and answers a
lung probability per pixel; `LungField` turns that into a box on the image, checked for
plausibility. `preprocess.square` calls `crop` when a classifier's InputSpec asks for
`lung_crop` ("box": the lung box; "mask": the box, and black outside the lungs), so training and
the device crop alike. The spec names the segmenter by SHA-256. Training opens it with `use(path)`
(TrainConfig.lung_model); conversion embeds it in every classifier file (`embed`), so a released
model needs no second file, and the device opens it from there (`use_embedded`).

The masks it learnt cover the aerated lung only (heart, the lung behind it and below the domes,
white-out regions left out), so the box gets a margin, and a film on which only one lung is found
is cropped over its full width. A film stored as a negative (air white, bone black: a MONOCHROME1 image
exported without its inversion) or turned on its side is refused, not cropped and scored: see `Segmenter.find`.
No TensorFlow here.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edge_app import preprocess
from edge_app.errors import InputError, ModelError
from edge_app.runtime import open_backend
from edge_app.tflite_metadata import read_metadata, write_metadata

LUNG_CARD_METADATA_NAME = "cxr_edge_lung_card"         # in the segmenter's file
SEGMENTER_METADATA_NAME = "cxr_edge_lung_segmenter"    # the segmenter's file, in a classifier's
OUTPUT = "lung_logits"
MIN_AREA = 0.03                  # lung share of the (padded) segmenter input below this: no lungs
MAX_AREA = 0.70                  # above this: not a chest radiograph as the segmenter knows them
                                 # (cxr-lungs: 0.045-0.55 of the image; padding only lowers it)
MIN_SECOND_LUNG = 0.15           # the second-largest region must be this share of the largest
MIN_REGION = 0.002               # regions smaller than this share of the input are specks
MISSTORED_CHECK_BELOW = 0.95     # mean lung probability over the lungs found below which the film is also segmented
                                 # as MISSTORED would undo (5-7 % of the shared films; every negative of them)
UNSURE = (0.1, 0.9)              # a pixel whose lung probability lies between these: the segmenter is unsure
TURNED = ("this film looks turned on its side: its lungs show more clearly turned by 90 degrees. Rotate it "
          "upright (the neck at the top) and screen it again")
MISSTORED = (  # (code, how the segmenter's square is undone, turned by 90 degrees, message): Segmenter.find
    ("negative_image", lambda square: 1.0 - square, False,
     "this film looks like a negative (air white, bone black): its lungs show more clearly inverted. Export it "
     "as it is displayed (a MONOCHROME1 image inverted) and screen it again"),
    ("rotated_image", lambda square: np.rot90(square, 1), True, TURNED),
    ("rotated_image", lambda square: np.rot90(square, 3), True, TURNED),
)
MAX_SIDES_CUT = 3                # lungs touching all four image sides: not a whole chest. Tightly framed
                                 # films touch up to three (with 2: 48 of 999 pediatric pneumonias of the
                                 # shared set refused); the crop is then clipped to the image


@dataclass
class LungCard:
    name: str
    input: preprocess.InputSpec
    threshold: float = 0.5       # lung where the probability is above this
    variant: str = "keras"
    metrics: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)
    intended_use: str = "Finds the lung field of a chest X-ray for cropping; not a diagnosis."

    def __post_init__(self):
        if isinstance(self.input, dict):
            self.input = preprocess.InputSpec.from_dict(self.input)

    def to_json(self) -> str:
        d = asdict(self)
        d["input"] = self.input.to_dict()
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "LungCard":
        return cls(**json.loads(text))


def with_card(model_bytes: bytes, card: LungCard) -> bytes:
    return write_metadata(model_bytes, LUNG_CARD_METADATA_NAME, card.to_json().encode())


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float image resized (antialiased bilinear, as the preprocessing resamples) to (h, w)."""
    out = Image.fromarray(np.asarray(image, np.float32)).resize((shape[1], shape[0]), preprocess.RESAMPLE)
    return np.asarray(out)


class Segmenter:
    """A lung segmenter (`.tflite` bytes), its card checked against the model; thread-safe."""

    def __init__(self, data: bytes, *, source=None, num_threads: int = 2):
        self.data, self.source, self.num_threads = data, source, num_threads
        self.sha256 = hashlib.sha256(data).hexdigest()
        try:
            self.card = LungCard.from_json(read_metadata(data)[LUNG_CARD_METADATA_NAME])
        except KeyError:
            raise ModelError("card_missing", "not a lung segmenter: no lung card embedded "
                             "(train one with `python -m train.lungs`)", source) from None
        except Exception as exc:
            raise ModelError("card_invalid", f"unreadable lung segmenter or card: {exc}", source) from exc
        self.spec = self.card.input
        self.backend, _ = open_backend(data, accelerator="cpu", num_threads=num_threads)
        expected = (1, self.spec.size, self.spec.size, self.spec.channels)
        if self.backend.input_shape != expected or OUTPUT not in self.backend.output_shapes:
            raise ModelError("card_mismatch", f"the segmenter takes {self.backend.input_shape} and gives "
                             f"{sorted(self.backend.output_shapes)}; its card describes {expected} -> "
                             f"{OUTPUT!r}", source)
        self.backend.run(np.zeros(expected, np.float32))   # warm-up

    @classmethod
    def open(cls, path: str | Path, **kwargs) -> "Segmenter":
        path = Path(path)
        if not path.is_file():
            raise ModelError("model_not_found", f"lung segmenter not found: {path}", path)
        return cls(path.read_bytes(), source=path, **kwargs)

    def probabilities(self, square: np.ndarray, timings: dict | None = None) -> np.ndarray:
        """(s, s) lung probabilities of a (s, s) [0, 1] square prepared with `self.spec`; the
        inference's ms added to `timings["lungs"]` when given."""
        x = preprocess.normalise(square, self.spec)[None]
        t0 = time.perf_counter()
        logits = self.backend.run(x)[OUTPUT][0, ..., 0]
        if timings is not None:
            timings["lungs"] = timings.get("lungs", 0.0) + 1000.0 * (time.perf_counter() - t0)
        with np.errstate(over="ignore"):   # exp(-logit) overflows below -88: probability 0, as it should be
            return 1.0 / (1.0 + np.exp(-logits))

    def find(self, gray: np.ndarray, margin: float = preprocess.LUNG_MARGIN,
             timings: dict | None = None) -> "LungField":
        """The lung field of a grey [0, 1] image of any size, its box widened by `margin`.

        Refuses a film stored as its negative or turned on its side (InputError `negative_image`,
        `rotated_image`, MISSTORED): where the segmenter is less than sure of the lungs it finds
        (MISSTORED_CHECK_BELOW), it also segments the film inverted and turned both ways, and a film that
        one of these shows as a plausible lung field, found with more confidence and fewer unsure pixels,
        is refused with that one's code (the surest). Scored as it is, a negative gets an arbitrary
        answer (7 of 208 abnormal test films' negatives were cleared); on the 7,331 films of the shared
        sets the check refused the two stored as negatives and a zoomed-in detail of ribs
        (docs/RESULTS.md, 2026-12-06 afternoon)."""
        square = preprocess.square(gray, self.spec)
        probabilities = self.probabilities(square, timings)
        confidence, unsure = _certainty(probabilities, self.card.threshold)
        if confidence < MISSTORED_CHECK_BELOW:
            surest = None
            for code, undo, turned, message in MISSTORED:
                candidate = self.probabilities(np.ascontiguousarray(undo(square)), timings)
                candidate_confidence, candidate_unsure = _certainty(candidate, self.card.threshold)
                if (candidate_confidence > max(confidence, surest[0] if surest else 0.0)
                        and candidate_unsure < unsure
                        and self._plausible(candidate, gray.shape[::-1] if turned else gray.shape)):
                    surest = (candidate_confidence, code, message)
            if surest:
                raise InputError(surest[1], surest[2], None)
        return LungField.of(probabilities > self.card.threshold, gray.shape, margin=margin)

    def _plausible(self, probabilities: np.ndarray, shape: tuple[int, int]) -> bool:
        try:
            LungField.of(probabilities > self.card.threshold, shape)
        except InputError:
            return False
        return True


def _certainty(probabilities: np.ndarray, threshold: float) -> tuple[float, float]:
    """(the mean lung probability over the pixels taken for lung, 0 with none; the share of pixels
    the segmenter is unsure of, UNSURE)."""
    lung = probabilities > threshold
    confidence = float(probabilities[lung].mean()) if lung.any() else 0.0
    return confidence, float(((probabilities > UNSURE[0]) & (probabilities < UNSURE[1])).mean())


def regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of a boolean mask, largest first, each as a boolean mask.

    Runs of each row (found for all rows at once) are joined to the runs they touch in the row
    above (union-find over runs): a few hundred runs on a segmenter's small square, so plain
    Python is fast enough for the joining.
    """
    mask = np.asarray(mask, bool)
    framed = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    framed[:, 1:-1] = mask
    edges = np.diff(framed, axis=1)
    rows, starts = np.nonzero(edges == 1)              # row-major: each row's runs in order
    stops = np.nonzero(edges == -1)[1]
    runs = list(zip(rows.tolist(), starts.tolist(), stops.tolist()))   # (row, start, stop)
    parent = list(range(len(runs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above, start = [], 0
    for i, (row, a, b) in enumerate(runs):
        if i and runs[i - 1][0] != row:
            above = [j for j in range(start, i) if runs[j][0] == row - 1]
            start = i
        for j in above:
            if runs[j][1] <= b and a <= runs[j][2]:     # overlapping or diagonal neighbours
                parent[root(i)] = root(j)
    labels = np.zeros(np.shape(mask), np.int32)
    sizes: dict[int, int] = {}
    for i, (row, a, b) in enumerate(runs):
        k = root(i) + 1
        labels[row, a:b] = k
        sizes[k] = sizes.get(k, 0) + b - a
    return [labels == k for k in sorted(sizes, key=lambda k: (-sizes[k], k))]


@dataclass(frozen=True)
class LungField:
    """Where the lungs are on an image: `box` = (top, left, bottom, right) in its pixels, with
    the margin, clipped to it; `mask` = the lungs on the segmenter's square, None when only one
    lung was found (the box then spans the image's full width, to keep the lung not found).

    The lungs are the two largest regions when they lie side by side and the smaller is at least
    MIN_SECOND_LUNG of the larger; otherwise the largest alone."""

    box: tuple[float, float, float, float]
    mask: np.ndarray | None
    lungs_found: int
    margin: float = preprocess.LUNG_MARGIN

    @classmethod
    def of(cls, mask: np.ndarray, shape: tuple[int, int], path=None,
           margin: float = preprocess.LUNG_MARGIN) -> "LungField":
        """The checked lung field of a (s, s) lung mask of an image of `shape` fitted with pad; its box
        widened by `margin` of its height and width on every side (InputSpec.lung_margin)."""
        h, w = shape
        scale, top, left, new_h, new_w = _padded(mask.shape[0], shape)
        found = [r for r in regions(mask) if r.sum() >= MIN_REGION * new_h * new_w]
        area = sum(int(r.sum()) for r in found) / (new_h * new_w)
        if area < MIN_AREA:
            raise InputError("no_chest_found", f"no lung field found (lungs cover {area:.1%} of the image); "
                             "this does not look like a frontal chest X-ray", path)
        if area > MAX_AREA:
            raise InputError("no_chest_found", f"implausible lung field: it covers {area:.0%} of the image; "
                             "this does not look like a frontal chest X-ray", path)
        lungs = found[:2]
        if len(lungs) == 2:
            centres = [np.flatnonzero(r.any(axis=0)).mean() for r in lungs]
            side_by_side = abs(centres[0] - centres[1]) > 0.15 * new_w
            if not side_by_side or lungs[1].sum() < MIN_SECOND_LUNG * lungs[0].sum():
                lungs = lungs[:1]
        union = np.logical_or.reduce(lungs)     # smaller regions (specks, dark air outside the body) left out
        rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        cut = sum(map(bool, (y0 <= top, y1 >= top + new_h, x0 <= left, x1 >= left + new_w)))
        if cut > MAX_SIDES_CUT:
            raise InputError("no_chest_found", f"the lung field runs off the image on {cut} sides: this is "
                             "not a whole chest X-ray (a detail or a zoomed crop?)", path)
        dy, dx = margin * (y1 - y0), margin * (x1 - x0)
        box = ((y0 - dy - top) / scale, (x0 - dx - left) / scale, (y1 + dy - top) / scale, (x1 + dx - left) / scale)
        if len(lungs) == 1:
            box = (box[0], 0.0, box[2], float(w))
        box = (max(0.0, box[0]), max(0.0, box[1]), min(float(h), box[2]), min(float(w), box[3]))
        return cls(box=box, mask=union if len(lungs) == 2 else None, lungs_found=len(lungs), margin=margin)

    def crop(self, gray: np.ndarray, blank: bool) -> np.ndarray:
        """The image inside the box, widened to a square about its centre (shifted to stay on
        the image where it can, black beyond it); with `blank`, black outside the lungs too."""
        h, w = gray.shape
        top, left, bottom, right = self.box
        side = max(bottom - top, right - left)
        cy, cx = (top + bottom) / 2, (left + right) / 2
        y0 = int(round(min(max(cy - side / 2, 0.0), max(h - side, 0.0) if side <= h else (h - side) / 2)))
        x0 = int(round(min(max(cx - side / 2, 0.0), max(w - side, 0.0) if side <= w else (w - side) / 2)))
        side = max(1, int(round(side)))
        if blank and self.mask is not None:
            gray = np.where(self._full_mask(gray.shape) > 0, gray, 0).astype(gray.dtype)
        out = np.zeros((side, side), gray.dtype)
        ys, xs = slice(max(y0, 0), min(y0 + side, h)), slice(max(x0, 0), min(x0 + side, w))
        out[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0] = gray[ys, xs]
        return out

    def _full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The lung mask, widened by the margin, on the image's own pixels."""
        grown = self.mask.copy()
        rows, cols = np.flatnonzero(grown.any(axis=1)), np.flatnonzero(grown.any(axis=0))
        for _ in range(max(1, round(self.margin * max(rows[-1] - rows[0], cols[-1] - cols[0])))):
            step = grown.copy()
            step[1:] |= grown[:-1]
            step[:-1] |= grown[1:]
            step[:, 1:] |= grown[:, :-1]
            step[:, :-1] |= grown[:, 1:]
            grown = step
        _, top, left, new_h, new_w = _padded(self.mask.shape[0], shape)
        return (resize(grown[top:top + new_h, left:left + new_w].astype(np.float32), shape) > 0.5).astype(np.float32)


def _padded(size: int, shape: tuple[int, int]) -> tuple[float, int, int, int, int]:
    """(scale, top, left, height, width) of an image of `shape` on a square of `size` fitted with
    pad, as `preprocess.fit_square` places it."""
    h, w = shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    return scale, (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


_opened: dict[str, Segmenter] = {}
_lock = threading.Lock()


def use(path: str | Path) -> Segmenter:
    """Open the segmenter file at `path` (once per file content) and make it the one `crop` uses
    for specs that name its SHA-256 (training: TrainConfig.lung_model)."""
    return _register(Segmenter.open(path))


def use_embedded(model_bytes: bytes, spec: preprocess.InputSpec, path=None) -> Segmenter | None:
    """The segmenter embedded in a classifier file whose spec crops to the lung field, opened for
    `crop` (the device); None when the spec does not crop."""
    if spec.lung_crop == "none":
        return None
    data = read_metadata(model_bytes).get(SEGMENTER_METADATA_NAME)
    if data is None:
        raise ModelError("lung_model_missing", "the model crops to the lung field but carries no lung "
                         "segmenter; convert its run again (with the run's lung_model)", path)
    if hashlib.sha256(data).hexdigest() != spec.lung_model:
        raise ModelError("card_mismatch", "the embedded lung segmenter is not the one the model was "
                         f"trained with (sha256 {spec.lung_model[:16]}...)", path)
    return _register(Segmenter(data, source=path))


def embed(model_bytes: bytes, spec: preprocess.InputSpec) -> bytes:
    """The classifier file with the segmenter its spec crops with embedded (conversion); as it is
    when the spec does not crop."""
    if spec.lung_crop == "none":
        return model_bytes
    return write_metadata(model_bytes, SEGMENTER_METADATA_NAME, _registered(spec).data)


def _register(segmenter: Segmenter) -> Segmenter:
    with _lock:
        return _opened.setdefault(segmenter.sha256, segmenter)


def _registered(spec: preprocess.InputSpec) -> Segmenter:
    segmenter = _opened.get(spec.lung_model)
    if segmenter is None:
        raise ModelError("lung_model_missing", f"this model crops to the lung field with segmenter "
                         f"{spec.lung_model[:16]}..., which is not loaded (training and conversion: the run's "
                         "lung_model; the device: the segmenter embedded in the model file)")
    return segmenter


def find(gray: np.ndarray, spec: preprocess.InputSpec, timings: dict | None = None) -> "LungField":
    """The lung field the preprocessing's lung step crops `gray` to (`timings`: see `Segmenter.probabilities`)."""
    return _registered(spec).find(gray, spec.lung_margin, timings)


def crop(gray: np.ndarray, spec: preprocess.InputSpec, timings: dict | None = None) -> np.ndarray:
    """The preprocessing's lung step: `gray` cropped to its lung field as `spec.lung_crop` says
    (`timings`: see `Segmenter.probabilities`)."""
    return find(gray, spec, timings).crop(gray, blank=spec.lung_crop == "mask")
