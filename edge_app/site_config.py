"""A site's own operating threshold, set by commissioning the device on the site's labelled images
(`python -m edge_app validate --write-site-config`), and where the site's films are softer than the
development set's, its own low-detail threshold (else the model card's applies).

It lives beside the model, `M.site.json` for `M.tflite`, never inside it: the model file and its
SHA-256 stay those of the release. The file names the model's SHA-256, and a site config made for
another model is refused rather than applied to a model it was never measured on.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from edge_app.errors import ModelError


@dataclass(frozen=True)
class SiteConfig:
    site: str
    threshold: float              # P(abnormal) at or above which an image is referred
    date: str                     # YYYY-MM-DD of the commissioning
    n_images: int                 # labelled images it was measured on
    target_sensitivity: float     # the sensitivity the threshold reached on them
    model_sha256: str
    # preprocess.detail below which the device warns at this site (decision.LOW_DETAIL): the 1st
    # percentile of the site's own images where that is below the card's; None: the card's
    detail_threshold: float | None = None

    def describe(self) -> str:
        return f"commissioned for {self.site} on {self.date} with {self.n_images} images"


def path_for(model_path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".site.json")


def load(model_path, model_sha256: str) -> SiteConfig | None:
    """The site config beside `model_path`, None when there is none; ModelError when it cannot be
    read (site_config_invalid) or was made for another model (site_config_mismatch)."""
    path = path_for(model_path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        config = SiteConfig(**{f.name: data[f.name] for f in fields(SiteConfig)
                               if f.name in data or f.default is MISSING})   # older files: no detail_threshold
        if not (isinstance(config.threshold, (int, float)) and math.isfinite(config.threshold)
                and 0.0 <= config.threshold <= 1.0):
            raise ValueError(f"threshold must be a number in [0, 1], got {config.threshold!r}")
        detail = config.detail_threshold
        if detail is not None and not (isinstance(detail, (int, float)) and math.isfinite(detail) and detail >= 0):
            raise ValueError(f"detail_threshold must be a number >= 0 or null, got {detail!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError("site_config_invalid", f"the site config cannot be used ({exc!r}); "
                         "commission the model again or remove the file", path) from exc
    if config.model_sha256 != model_sha256:
        raise ModelError("site_config_mismatch", f"this site config was made for another model "
                         f"(SHA-256 {config.model_sha256[:12]}…, this model {model_sha256[:12]}…); "
                         f"commission this model with `python -m edge_app validate --model "
                         f"{Path(model_path).name} DIR --write-site-config`, or remove the file", path)
    return config


def write(model_path, config: SiteConfig) -> Path:
    """Writes the site config beside the model (atomically: a crash leaves the old one or the new)."""
    path = path_for(model_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(config), indent=2) + "\n")
    os.replace(tmp, path)
    return path
