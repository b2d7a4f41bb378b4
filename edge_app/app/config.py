"""The app's whole configuration: one dataclass, read from a small JSON file, overridden by flags.

The file (default `$XDG_CONFIG_HOME/cxr-edge/app.json`) is what a kiosk installer writes, with
the staff PIN; the Settings screen saves model, threads and accelerator back to it.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edge_app.runtime import ACCELERATORS


def _xdg(variable: str, default: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / default) / "cxr-edge"


@dataclass
class AppConfig:
    model: str | None = None              # .tflite exported by `python -m convert`
    accelerator: str = "auto"             # auto/gpu try LiteRT's GPU first, cpu never does
    threads: int = 2
    gpu_delegate: str | None = None       # a TFLite GPU delegate library, by path
    history: str = str(_xdg("XDG_DATA_HOME", ".local/share") / "history.sqlite3")
    exports: str = str(_xdg("XDG_DATA_HOME", ".local/share") / "exports")   # CSV exports, camera captures
    start_dir: str = str(Path.home())     # where the file chooser opens
    kiosk: bool = False
    kiosk_pin: str | None = None          # staff PIN: unlocks History, Settings and exit in kiosk mode
    idle_reset_s: float = 90.0            # kiosk: back to the start screen after this long untouched
    window: tuple[int, int] = (1280, 800)
    settings_file: str | None = field(default=None, metadata={"saved": False})
    screen_and_exit: str | None = field(default=None, metadata={"saved": False})  # time to first result

    def __post_init__(self):
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {self.accelerator!r}")
        if int(self.threads) < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads!r}")
        if self.kiosk and not (self.kiosk_pin and str(self.kiosk_pin).isdigit()):
            raise ValueError("kiosk mode needs a staff PIN of digits: --pin 1234, or \"kiosk_pin\" "
                             "in the settings file")
        if self.screen_and_exit and not self.model:
            raise ValueError("--screen-and-exit needs a model: --model FILE.tflite")
        self.window = tuple(int(n) for n in self.window)
        self.threads = int(self.threads)

    @classmethod
    def load(cls, path: str | os.PathLike | None, **overrides) -> "AppConfig":
        """The settings file (if it exists) with `overrides` (non-None values) on top."""
        values = {}
        if path is not None and Path(path).is_file():
            values = json.loads(Path(path).read_text())
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values, settings_file=None if path is None else str(path))

    def save(self) -> None:
        """Writes the settings back to `settings_file` (atomically)."""
        if self.settings_file is None:
            return
        path = Path(self.settings_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        values = {k: v for k, v in asdict(self).items()
                  if next(f for f in fields(self) if f.name == k).metadata.get("saved", True)}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(values, indent=2) + "\n")
        os.replace(tmp, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The app's flags; each one overrides the same-named setting of the settings file."""
    p.add_argument("--config", default=str(_xdg("XDG_CONFIG_HOME", ".config") / "app.json"),
                   help="settings file (JSON; default: %(default)s)")
    p.add_argument("--model", help="the .tflite model")
    p.add_argument("--accelerator", choices=ACCELERATORS)
    p.add_argument("--threads", type=int)
    p.add_argument("--gpu-delegate", dest="gpu_delegate")
    p.add_argument("--history", help="screening history database (SQLite)")
    p.add_argument("--exports", help="folder for CSV exports and camera captures")
    p.add_argument("--start-dir", dest="start_dir", help="folder the file chooser opens in")
    p.add_argument("--kiosk", action="store_true", default=None,
                   help="fullscreen screening kiosk; History, Settings and exit need the staff PIN")
    p.add_argument("--pin", dest="kiosk_pin", help="the kiosk's staff PIN (digits)")
    p.add_argument("--idle-reset", dest="idle_reset_s", type=float, help="kiosk idle reset, seconds")
    p.add_argument("--screen-and-exit", dest="screen_and_exit", metavar="IMAGE",
                   help="screen IMAGE as soon as the model is loaded, print the result and exit "
                        "(the app's launch-to-first-result time; benchmarks/test_clinic.py)")
    p.add_argument("--size", dest="window", type=lambda s: tuple(int(n) for n in s.lower().split("x")),
                   help="window size, e.g. 800x480")


def from_args(args: argparse.Namespace) -> AppConfig:
    names = {f.name for f in fields(AppConfig)}
    return AppConfig.load(args.config, **{k: v for k, v in vars(args).items() if k in names})
