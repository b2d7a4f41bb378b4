"""The clinic and kiosk app (Kivy): `python -m edge_app` or `python -m edge_app app [--kiosk]`.

Kivy is imported only here, on demand, and never together with TensorFlow (the two crash each
other in one process). Kivy's own settings are fixed before its window exists.
"""
from __future__ import annotations

import os

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
    Config.set("kivy", "exit_on_escape", "0" if cfg.kiosk else "1")
    Config.set("input", "mouse", "mouse,multitouch_on_demand")  # no red dots on right click


def run(cfg: AppConfig) -> int:
    configure_kivy(cfg)
    from edge_app.app.ui import CxrApp

    app = CxrApp(cfg)
    app.run()
    return app.exit_code
