"""What the Result screen draws, as numpy arrays (no Kivy here, so it runs on the worker thread).

The X-ray is shown as the model saw it (preprocess's own border trim, crop or pad and contrast
step, at the display's size), so the heat map, which covers the model input, lies exactly over
the region it describes.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from edge_app import preprocess

# heat colours from cold to hot (blue, cyan, yellow, red); transparency follows the heat
_STOPS = np.array([0.0, 0.35, 0.7, 1.0])
_COLOURS = np.array([[0, 60, 255], [0, 220, 255], [255, 230, 0], [255, 20, 0]], np.float64)
MAX_ALPHA = 0.6


def display_square(path, spec: preprocess.InputSpec, size: int) -> np.ndarray:
    """The image as a (size, size) uint8 grey square: `preprocess.load` with the model's spec at
    `size`, so at the model's own size it is the model input before normalisation, pixel for pixel."""
    return np.round(preprocess.load(path, dataclasses.replace(spec, size=size)) * 255).astype(np.uint8)


def heatmap_rgba(heatmap: np.ndarray, size: int) -> np.ndarray:
    """A [0, 1] heat map upsampled (bilinear) to (size, size, 4) uint8 RGBA."""
    heat = np.asarray(Image.fromarray(np.asarray(heatmap, np.float32), mode="F")
                      .resize((size, size), Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    rgb = np.stack([np.interp(heat, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    alpha = heat * MAX_ALPHA * 255
    return np.round(np.concatenate([rgb, alpha[..., None]], axis=-1)).astype(np.uint8)
