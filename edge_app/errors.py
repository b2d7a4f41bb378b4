"""Typed errors with stable codes.

The device side never shows a bare traceback: every problem with an input image or a
model file becomes one of these, with a code that the CLI's JSON, the app and the
screening history can rely on, and a message a clinic user can act on.
"""
from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path


class CxrEdgeError(Exception):
    """Base class: `code` is stable across releases, `message` is for people."""

    code = "error"

    def __init__(self, code: str, message: str, path: str | None = None):
        self.code = code
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "path": self.path}


class InputError(CxrEdgeError, ValueError):
    """An image that cannot be screened.

    Codes: not_found, empty, not_an_image, corrupt, truncated, too_small, too_large,
    unsupported_mode, dicom_unsupported, colour_photo, extreme_aspect_ratio, uniform_image,
    no_chest_found (no plausible lung field, see edge_app.lungs), negative_image, rotated_image (a film
    stored as its negative or turned on its side, see edge_app.lungs); for a folder or a labelled set:
    no_images, unknown_label, label_not_in_model, bad_csv.
    """


class ModelError(CxrEdgeError, RuntimeError):
    """A model file that cannot be used.

    Codes: model_not_found, model_invalid (cannot be opened or prepared, or gives NaN/inf),
    inference_failed (a prepared model failed to run), card_missing, card_invalid, card_mismatch,
    checksum_mismatch, no_runtime, lung_model_missing, site_config_invalid, site_config_mismatch.
    """


class HistoryError(CxrEdgeError, RuntimeError):
    """The screening history cannot record screenings: the app stops screening until it can.

    Codes: history_corrupt, history_read_only, history_disk_full, history_unavailable.
    """


def error_log_path() -> Path:
    """Where unexpected errors are logged with their traceback ($XDG_STATE_HOME/cxr-edge/errors.log)."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "cxr-edge" / "errors.log"


def log_unexpected(exc: BaseException, context: str) -> str:
    """Appends an unexpected error's traceback to the error log, not the screen; returns a line
    for people that says where the details are (or why they could not be written)."""
    path = error_log_path()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    text = "".join(traceback.format_exception(exc))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"--- {stamp} {context}\n{text}")
    except OSError as log_exc:
        return f"details could not be logged ({log_exc.strerror or log_exc})"
    return f"details in {path}"
