"""What the device loads before its first result: `python -m edge_app predict` pays for every
module it imports at each launch (the [clinic] max_cold_start_s gate, measured by
benchmarks/cold_start.py), so modules only some paths need are imported on those paths."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cold_start
from test_preprocess import dicom_ramp, write_dicom

pytestmark = pytest.mark.device  # no TensorFlow

NOT_FOR_A_JPEG = ("pydicom", "statistics", "edge_app.app", "kivy", "tqdm", "matplotlib", "tensorflow", "tf_keras",
                  "keras", "scipy", "pandas", "cv2", "edge_app.validate", "edge_app.history", "csv", "sqlite3")


def imported_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after `code` (run from the checkout)."""
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def loaded(modules: set[str], names) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_predict_on_a_jpeg_imports_nothing_it_does_not_use(shared_data, tmp_path):
    image = sorted((shared_data / "test" / "normal").iterdir())[0]
    modules = imported_after(
        "import edge_app.cli as cli\n"
        f"assert cli.main(['predict', {str(image)!r}, '--model', {str(tmp_path / 'none.tflite')!r}]) == 2\n"
        "from edge_app import preprocess\n"
        f"preprocess.decode({str(image)!r}, strict=True, draft_size=224)")
    assert "edge_app.classifier" in modules and "PIL.JpegImagePlugin" in modules   # the path was taken
    assert loaded(modules, NOT_FOR_A_JPEG) == []


def test_pydicom_is_imported_when_a_dicom_arrives(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", dicom_ramp())
    modules = imported_after(f"from edge_app import preprocess\npreprocess.decode({str(path)!r})")
    assert "pydicom" in modules


def test_the_app_command_still_parses_its_own_arguments():
    from edge_app import cli

    args = cli.parser("app").parse_args(["app", "--kiosk", "--pin", "1234"])
    assert args.kiosk and args.func is cli.cmd_app
    with pytest.raises(SystemExit):
        cli.parser("predict").parse_args(["predict", "x.png"])     # --model is required


def test_cold_start_runs_on_cached_bytecode_without_writing_into_the_checkout(tmp_path, monkeypatch):
    """A device has its bytecode compiled; a PYTHONDONTWRITEBYTECODE sandbox would compile
    edge_app at every measured launch, so the measured processes cache it in a temporary folder."""
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    env = cold_start._env(tmp_path / "pyc")
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["PYTHONPATH"] == str(cold_start.REPO)
    subprocess.run([sys.executable, "-c", "import edge_app.preprocess"], env=env, cwd=cold_start.REPO, check=True)
    cached = [p.name for p in (tmp_path / "pyc").rglob("*.pyc")]
    assert any(name.startswith("preprocess.") for name in cached)


def test_the_app_loads_its_model_while_kivy_starts(monkeypatch):
    """`python -m edge_app app` (and the GUI tests' driver) open the model on the worker thread
    before Kivy is configured or imported, so the two overlap; without a model nothing loads."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from edge_app import app
    from edge_app.app.config import AppConfig

    loading = threading.Event()
    monkeypatch.setattr(app, "load_classifier", lambda cfg: loading.set() or f"classifier of {cfg.model}")

    class KivyWouldStartHere(Exception):
        pass

    def configure_kivy(cfg):
        assert loading.wait(30), "the model was not loading when Kivy was about to start"
        raise KivyWouldStartHere
    monkeypatch.setattr(app, "configure_kivy", configure_kivy)
    with pytest.raises(KivyWouldStartHere):
        app.make_app(AppConfig(model="m.tflite"))
    with ThreadPoolExecutor(max_workers=1) as worker:
        assert app._start_loading(AppConfig(model="m.tflite"), worker).result(30) == "classifier of m.tflite"
        assert app._start_loading(AppConfig(model=None), worker) is None
