"""The one classifier API of the device: a `.tflite` file in, a screening result out."""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge_app import decision, lungs, preprocess, release, site_config
from edge_app.errors import ModelError
from edge_app.graph_names import HEATMAP, LOGITS, OOD_PARTS
from edge_app.model_card import ModelCard
from edge_app.runtime import NoGpuAdapter, open_backend
from edge_app.tflite_metadata import CARD_METADATA_NAME, read_metadata


@dataclass
class Prediction:
    label: str                          # most probable class
    probabilities: dict[str, float]     # calibrated, in the model card's label order
    abnormal_probability: float         # P(pneumonia or COVID-19)
    decision: str                       # decision.REFER, NO_ABNORMALITY or UNRELIABLE (`warning` says why)
    message: str                        # the triage message shown to people
    threshold: float                    # the operating threshold that made the decision
    timings_ms: dict[str, float]        # decode, preprocess, lungs (the segmenter's inference, 0 without
                                        # a lung crop), inference, postprocess, total
    backend: str
    heatmap: np.ndarray | None = field(default=None, repr=False)  # (h, w) in [0, 1], where it looked
    source: str | None = None
    ood_score: float | None = None      # compared with the card's thresholds["ood"]
    detail: float | None = None         # preprocess.detail of the model's square, vs thresholds["detail"]
    warning: str | None = None          # decision.OUT_OF_DISTRIBUTION, LOW_DETAIL or None

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "label": self.label,
            "probabilities": self.probabilities,
            "abnormal_probability": self.abnormal_probability,
            "decision": self.decision,
            "message": self.message,
            "threshold": self.threshold,
            "ood_score": self.ood_score,
            "detail": self.detail,
            "warning": self.warning,
            "notice": decision.NOT_A_DIAGNOSIS,
            "timings_ms": self.timings_ms,
            "backend": self.backend,
        }


def load_model_file(path: str | Path) -> tuple[bytes, ModelCard]:
    """The model's bytes and its embedded card, with specific errors for every way it can fail."""
    path = Path(path)
    if not path.is_file():
        raise ModelError("model_not_found", f"model file not found: {path}", path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError("model_invalid", f"the model file cannot be read ({exc.strerror or exc})", path) from exc
    release.verify(path, data)  # a released model must match its SHA256SUMS
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelError("model_invalid", "not a TFLite model (no TFL3 identifier)", path)
    try:
        metadata = read_metadata(data)
    except Exception as exc:
        raise ModelError("model_invalid", f"unreadable TFLite flatbuffer: {exc}", path) from exc
    if CARD_METADATA_NAME not in metadata:
        raise ModelError("card_missing", "the model carries no cxr-edge model card; "
                         "export it with `python -m convert`", path)
    try:
        card = ModelCard.from_json(metadata[CARD_METADATA_NAME])
    except Exception as exc:
        raise ModelError("card_invalid", f"the embedded model card is invalid: {exc}", path) from exc
    return data, card


def ood_score_of(outputs: dict) -> float | None:
    """How unlike the training images (train.ood.score), from the model's OOD outputs; None
    for models without them (fine-tuned variants, older exports)."""
    if not all(part in outputs for part in OOD_PARTS):
        return None
    return float(sum(np.square(outputs[part].astype(np.float64)).sum() for part in OOD_PARTS))


class Classifier:
    """Loads a model and its card, picks a runtime, warms it up; `predict` is thread-safe."""

    def __init__(self, model_path: str | Path, *, accelerator: str = "auto", num_threads: int = 2,
                 gpu_delegate: str | None = None, runtime=None, use_site_config: bool = True):
        """`runtime`: a callable model bytes -> backend that pins one runtime (the benchmarks
        time each one); by default the first that loads, in `open_backend`'s order.
        `use_site_config`: apply the site threshold stored beside the model (site_config), if
        any; commissioning itself runs at the card's threshold."""
        self.model_path = Path(model_path)
        data, self.card = load_model_file(self.model_path)
        self.model_sha256 = hashlib.sha256(data).hexdigest()
        self.site = site_config.load(self.model_path, self.model_sha256) if use_site_config else None
        self.threshold = self.site.threshold if self.site else self.card.abnormal_threshold
        self.detail_threshold = (self.site.detail_threshold if self.site and self.site.detail_threshold is not None
                                 else self.card.thresholds.get("detail"))
        if runtime is None:
            self.backend, self.backend_attempts = open_backend(
                data, accelerator=accelerator, num_threads=num_threads, gpu_delegate=gpu_delegate)
        else:
            self.backend, self.backend_attempts = runtime(data), []
        self._check_card_matches_model()
        self.spec = self.card.input
        self.segmenter = lungs.use_embedded(data, self.spec, self.model_path)   # the lung crop's, if the spec crops
        try:   # warm-up: the model alone (a black image has no lung field for a lung-cropping spec)
            self._run(np.zeros((1, self.spec.size, self.spec.size, self.spec.channels), np.float32))
        except ModelError as exc:
            raise ModelError("model_invalid", f"the model cannot be prepared or run; the file may be "
                             f"damaged: {exc.message}", self.model_path) from exc

    def _check_card_matches_model(self):
        spec, labels = self.card.input, self.card.labels
        expected_input = (1, spec.size, spec.size, spec.channels)
        if self.backend.input_shape != expected_input:
            raise ModelError("card_mismatch", f"the model takes input {self.backend.input_shape} but "
                             f"its card describes {expected_input}", self.model_path)
        shapes = self.backend.output_shapes
        if LOGITS not in shapes:
            raise ModelError("card_mismatch", f"the model has no {LOGITS!r} output "
                             f"(outputs: {sorted(shapes)})", self.model_path)
        if shapes[LOGITS][-1] != len(labels):
            raise ModelError("card_mismatch", f"the model has {shapes[LOGITS][-1]} outputs but its "
                             f"card names {len(labels)} labels {list(labels)}", self.model_path)

    @property
    def info(self) -> dict:
        return {
            "model": str(self.model_path),
            "model_sha256": self.model_sha256,
            "backend": self.backend.name,
            "gpu_fully_accelerated": self.backend.fully_accelerated,
            "gpu": self._gpu_status(),
            "ood_warning": all(part in self.backend.output_shapes for part in OOD_PARTS),
            "backends_tried": [{"backend": n, "error": why} for n, why in self.backend_attempts],
            "threshold": self.threshold,
            "threshold_note": self.threshold_note,
            "site": None if self.site is None else asdict(self.site),
            "card": self.card.to_dict(),
        }

    def _gpu_status(self) -> str:
        """The GPU path in one line: run, not run (and why), or not tried."""
        if self.backend.fully_accelerated is not None:
            return "run: every op on the GPU" if self.backend.fully_accelerated else "run: some ops on the CPU"
        error = dict(self.backend_attempts).get("litert-compiled-gpu")
        if error is None:
            return "not tried (accelerator cpu)"
        if error.startswith(NoGpuAdapter.__name__):
            return "not run: " + error.removeprefix(NoGpuAdapter.__name__ + ": ").split(" [native log:")[0]
        return f"failed: {error}"

    @property
    def threshold_note(self) -> str:
        """Where the operating threshold comes from, for people."""
        if self.site:
            return f"threshold {self.threshold:.3f}, {self.site.describe()}"
        return f"threshold {self.threshold:.3f} from the model card (not commissioned for a site)"

    def predict(self, source) -> Prediction:
        """Classify an image file (or its bytes): decoding is strict, as at a clinic."""
        t0 = time.perf_counter()
        gray = preprocess.decode(source, strict=True, draft_size=self.spec.size)
        prediction = self._predict_gray(gray, t0)
        prediction.source = None if isinstance(source, (bytes, bytearray)) else str(source)
        return prediction

    def predict_array(self, image: np.ndarray) -> Prediction:
        """Classify a grey image already decoded to [0, 1] (any size)."""
        return self._predict_gray(np.asarray(image, np.float32), time.perf_counter())

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits for a batch of model inputs, one image per call (the model's batch is 1)."""
        return np.concatenate([self._run(x[None])[LOGITS] for x in batch])

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The model's outputs for one input; a model that answers NaN or inf is damaged (NaN
        logits would otherwise read as "no abnormality")."""
        outputs = self.backend.run(x)
        broken = sorted(name for name, value in outputs.items() if not np.isfinite(value).all())
        if broken:
            raise ModelError("inference_failed", f"the model's outputs {broken} are not finite "
                             "(NaN or inf): the model file is damaged", self.model_path)
        return outputs

    def _predict_gray(self, gray: np.ndarray, t0: float) -> Prediction:
        t_decoded = time.perf_counter()
        lung_ms = {}
        square8 = preprocess.square8(gray, self.spec, timings=lung_ms)
        detail = preprocess.detail(square8)
        x = preprocess.normalise(preprocess.contrast_step(square8, self.spec), self.spec)
        t_preprocessed = time.perf_counter()
        outputs = self._run(x[None])
        t_inferred = time.perf_counter()
        probs = decision.calibrated_probabilities(outputs[LOGITS][0], self.card.temperature)
        p_abnormal = float(decision.abnormal_probability(probs))
        ood_score = ood_score_of(outputs)
        warning = decision.warning(ood_score, self.card.thresholds.get("ood"),
                                   detail, self.detail_threshold)
        triage = decision.triage(p_abnormal, self.threshold, warning)
        heatmap = outputs.get(HEATMAP)
        if heatmap is not None:
            heatmap = np.maximum(heatmap.reshape(heatmap.shape[1:3]), 0.0)
            heatmap = heatmap / heatmap.max() if heatmap.max() > 0 else heatmap
        t_done = time.perf_counter()
        ms = lambda a, b: round((b - a) * 1000.0, 3)
        return Prediction(
            label=self.card.labels[int(np.argmax(probs))],
            probabilities={l: float(p) for l, p in zip(self.card.labels, probs)},
            abnormal_probability=p_abnormal,
            decision=triage,
            message=decision.WARNING_MESSAGES[warning] if warning else decision.TRIAGE_MESSAGES[triage],
            threshold=self.threshold,
            timings_ms={"decode": ms(t0, t_decoded),
                        "preprocess": round(ms(t_decoded, t_preprocessed) - lung_ms.get("lungs", 0.0), 3),
                        "lungs": round(lung_ms.get("lungs", 0.0), 3), "inference": ms(t_preprocessed, t_inferred),
                        "postprocess": ms(t_inferred, t_done), "total": ms(t0, t_done)},
            backend=self.backend.name,
            heatmap=heatmap,
            ood_score=ood_score,
            detail=detail,
            warning=warning,
        )
