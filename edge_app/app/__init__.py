"""The clinic and kiosk app (Kivy): `python -m edge_app` or `python -m edge_app app [--kiosk]`.

Kivy is imported only here, on demand, and never together with TensorFlow (the two crash each
other in one process). Kivy's own settings are fixed before its window exists.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

from edge_app.app.config import AppConfig


def configure_kivy(cfg: AppConfig) -> None:
    """Kivy's settings for this configuration; must run before Kivy creates its window."""
    os.environ.setdefault("KIVY_NO_ARGS", "1")          # our flags are not Kivy's
    from kivy.config import Config

    width, height = cfg.window
    Config.set("graphics", "width", str(width))
    Config.set("graphics", "height", str(height))
    Config.set("graphics", "fullscreen", "auto" if cfg.kiosk else "0")
    Config.set("graphics", "resizable", "0" if cfg.kiosk else "1")
    Config.set("graphics", "multisamples", "0")   # flat shapes and text only: MSAA would only slow each frame
    Config.set("kivy", "exit_on_escape", "0" if cfg.kiosk else "1")
    Config.set("input", "mouse", "mouse,multitouch_on_demand")  # no red dots on right click


def load_classifier(cfg: AppConfig):
    """The configured model, opened (on the worker thread)."""
    from edge_app.classifier import Classifier

    return Classifier(cfg.model, accelerator=cfg.accelerator, num_threads=cfg.threads,
                      gpu_delegate=cfg.gpu_delegate)


def _start_loading(cfg: AppConfig, worker: ThreadPoolExecutor) -> Future | None:
    """The launch's model, loading on the worker while Kivy imports and opens its window (the
    app's first result comes that much sooner); then Pillow's decoders, which the first image
    needs. None without a model."""
    if not cfg.model:
        return None
    loading = worker.submit(load_classifier, cfg)

    def decoders():
        from PIL import Image

        Image.preinit()
    worker.submit(decoders)
    return loading


def make_app(cfg: AppConfig):
    """The app for this configuration, its model already loading on the worker thread."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="screening")
    loading = _start_loading(cfg, worker)
    configure_kivy(cfg)
    from edge_app.app.ui import CxrApp

    return CxrApp(cfg, worker=worker, loading=loading)


def run(cfg: AppConfig) -> int:
    app = make_app(cfg)
    app.run()
    return app.exit_code
