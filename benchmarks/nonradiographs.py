"""Images that are not chest X-rays yet pass the device's input checks (grey, not uniform, a sane
shape): what the out-of-distribution warning exists to catch. Generated, so nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

SIZE = 256


def _images(rng) -> dict[str, np.ndarray]:
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    text = Image.new("L", (SIZE, SIZE), 235)
    draw = ImageDraw.Draw(text)
    for row in range(12, SIZE - 12, 14):
        draw.text((10, row), "Patient report: findings within normal limits. " * 2, fill=20)
    blobs = Image.fromarray((rng.random((SIZE, SIZE)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(8))
    return {
        "uniform_noise": rng.random((SIZE, SIZE)),
        "gaussian_noise": np.clip(0.5 + 0.2 * rng.normal(size=(SIZE, SIZE)), 0, 1),
        "smooth_blobs": np.asarray(ImageOps.autocontrast(blobs), np.float64) / 255,
        "grey_ramp": x,
        "checkerboard": ((np.floor(x * 8) + np.floor(y * 8)) % 2) * 0.8 + 0.1,
        "stripes": 0.5 + 0.4 * np.sin(2 * np.pi * 12 * x),
        "rings": 0.5 + 0.4 * np.cos(2 * np.pi * 10 * np.hypot(x - 0.5, y - 0.5)),
        "text_page": np.asarray(text, np.float64) / 255,
    }


def write(folder: Path, seed: int = 0) -> list[Path]:
    """The images as 8-bit grey PNGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in _images(np.random.default_rng(seed)).items():
        path = folder / f"{name}.png"
        Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths
