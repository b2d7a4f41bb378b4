"""One screening, from file to history: classify, record, and only then hand it back to be shown.

The app's worker thread and the kill -9 test both go through `screen`, so the order that makes
the history trustworthy (commit before display) lives in one place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from edge_app.classifier import Classifier, Prediction
from edge_app.errors import InputError
from edge_app.history import History, Screening, file_sha256, now


@dataclass
class Outcome:
    screening: Screening                 # as committed to the history (id set)
    prediction: Prediction | None        # None when the image could not be screened
    error: InputError | None = None


def screen(classifier: Classifier, history: History, path: str | os.PathLike) -> Outcome:
    """Classifies one image file and commits the screening; bad images are recorded with their
    error code. Model and database errors propagate: nothing is shown for them either."""
    path = str(path)
    started, sha = now(), file_sha256(path)
    record = dict(screened_at=started, image_path=path, image_sha256=sha,
                  model_sha256=classifier.model_sha256, backend=classifier.backend.name)
    try:
        prediction = classifier.predict(path)
    except InputError as exc:
        screening = history.add(Screening(**record, error_code=exc.code, error_message=exc.message))
        return Outcome(screening, None, exc)
    screening = history.add(Screening(
        **record, label=prediction.label, probabilities=prediction.probabilities,
        abnormal_probability=prediction.abnormal_probability, decision=prediction.decision,
        warning=prediction.warning, threshold=prediction.threshold, latency_ms=prediction.timings_ms["total"]))
    return Outcome(screening, prediction)
