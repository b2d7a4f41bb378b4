"""Typed errors with stable codes.

The device side never shows a bare traceback: every problem with an input image or a
model file becomes one of these, with a code that the CLI's JSON, the app and the
screening history can rely on, and a message a clinic user can act on.
"""
from __future__ import annotations


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
    unsupported_mode, dicom_unsupported, colour_photo, extreme_aspect_ratio, uniform_image;
    for a folder or a labelled set: no_images, unknown_label, label_not_in_model, bad_csv.
    """


class ModelError(CxrEdgeError, RuntimeError):
    """A model file that cannot be used.

    Codes: model_not_found, model_invalid, card_missing, card_invalid, card_mismatch,
    checksum_mismatch, no_runtime, site_config_invalid, site_config_mismatch.
    """
