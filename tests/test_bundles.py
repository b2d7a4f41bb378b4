"""Device bundles built from a converted run. The Raspberry Pi bundle: the device side only,
pinned requirements, a valid kiosk unit and install script, and a bundled edge_app that classifies
exactly like the repository's (installing it on an emulated aarch64 Debian is `make verify-pi`, far
too slow for CI). The Android stage: what buildozer would pack, and the model card readable there."""
import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_module
from edge_app.classifier import load_model_file
from edge_app.deploy.android import stage
from edge_app.deploy.pi import BundleError, PiBundleConfig, build_bundle, forbidden_imports, read_lock

UNIT = PiBundleConfig.unit


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory) -> Path:
    """The tarball built from the tiny run (without vendored wheels: no downloads in tests), extracted."""
    tarball = build_bundle(tiny_run, tmp_path_factory.mktemp("dist"), PiBundleConfig(wheels=False))
    extracted = tmp_path_factory.mktemp("extracted")
    subprocess.run(["tar", "xzf", tarball, "-C", extracted], check=True)
    (root,) = extracted.iterdir()
    assert root.name == tarball.name.removesuffix(".tar.gz") == "cxr-edge-pi-tiny-int8"
    return root


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_bundle_holds_the_device_side_and_one_model(bundle, tiny_run):
    files = _files(bundle)
    assert {"README.md", "install.sh", "bundle.env", "bundle.json", "SHA256SUMS", "requirements.txt",
            UNIT, "model/int8.tflite", "model/model_card.json"} <= files
    package = REPO / "edge_app"
    device_files = {f"app/edge_app/{p.relative_to(package)}" for p in package.rglob("*") if p.is_file()
                    and p.relative_to(package).parts[0] != "deploy" and "__pycache__" not in p.parts}
    assert {f for f in files if f.startswith("app/")} == device_files
    assert "app/edge_app/__main__.py" in files  # `python -m edge_app` works from the bundle
    assert not [f for f in files if f.endswith(".tflite") and f != "model/int8.tflite"]
    assert forbidden_imports(bundle / "app") == []
    assert os.access(bundle / "install.sh", os.X_OK)
    subprocess.run(["sha256sum", "--quiet", "--strict", "-c", "SHA256SUMS"], cwd=bundle, check=True)
    assert len((bundle / "SHA256SUMS").read_text().splitlines()) == len(files) - 1

    _, card = load_model_file(tiny_run / "tflite" / "int8.tflite")
    assert json.loads((bundle / "model" / "model_card.json").read_text()) == card.to_dict()
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["variant"] == "int8" and meta["target"]["machine"] == "aarch64"
    assert meta["parity_gate"]["passed"] is True  # the tiny run is converted with wide budgets
    assert "passed the conversion parity gate" in (bundle / "README.md").read_text()


def test_import_scan_refuses_tensorflow_and_training_code(tmp_path):
    pkg = tmp_path / "edge_app"
    pkg.mkdir()
    (pkg / "ok.py").write_text("import numpy\nfrom . import sibling\n\ndef fallback():\n"
                               "    import tensorflow as tf\n    return tf\n")
    assert forbidden_imports(tmp_path) == []
    (pkg / "bad.py").write_text("try:\n    import tensorflow.lite as tfl\nexcept ImportError:\n    pass\n"
                                "from tf_keras import layers\n\ndef later():\n    from train.metrics import f1\n")
    assert forbidden_imports(tmp_path) == ["edge_app/bad.py:2 imports tensorflow.lite",
                                           "edge_app/bad.py:5 imports tf_keras",
                                           "edge_app/bad.py:8 imports train.metrics"]


def test_requirements_are_pinned_with_hashes(bundle, tmp_path):
    pins = read_lock(bundle / "requirements.txt")
    assert {"numpy", "pillow", "ai-edge-litert", "kivy", "pydicom"} <= set(pins)
    assert pins["ai-edge-litert"][0].split(".")[0] == "2"
    assert all(version and hashes for version, hashes in pins.values())
    # every dependency is pinned too: the Pi installs with --no-deps --require-hashes
    assert {"flatbuffers", "protobuf", "ml-dtypes", "requests", "docutils"} <= set(pins)
    loose = tmp_path / "loose.txt"
    loose.write_text("numpy>=2 --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(BundleError, match="not pinned"):
        read_lock(loose)
    loose.write_text("numpy==2.4.6\n")
    with pytest.raises(BundleError, match="not pinned"):
        read_lock(loose)


def test_kiosk_unit_is_valid(bundle, tmp_path):
    text = (bundle / UNIT).read_text()
    sections, settings = [], {}
    for line in text.splitlines():
        if line.startswith("["):
            sections.append(line)
        elif line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not a key=value line: {line!r}"
            settings.setdefault(key, []).append(value)
    assert sections == ["[Unit]", "[Service]", "[Install]"]
    env = dict(v.split("=", 1) for v in settings["Environment"])
    assert env["KIVY_WINDOW"] == "sdl2" and env["SDL_VIDEODRIVER"] == "kmsdrm" and env["KIVY_GL_BACKEND"]
    assert settings["Restart"] == ["always"] and settings["User"] == [PiBundleConfig.user]
    assert settings["WantedBy"] == ["multi-user.target"]
    exec_start = settings["ExecStart"][0].split()
    assert exec_start[:3] == ["/opt/cxr-edge/venv/bin/python", "-m", "edge_app"]
    assert "--kiosk" in exec_start and "/opt/cxr-edge/model/int8.tflite" in exec_start
    # the app accepts the unit's command line, and takes its staff PIN from the settings file that
    # install.sh writes (a kiosk without a PIN refuses to start)
    import argparse

    from edge_app.app.config import add_arguments, from_args

    settings_file = tmp_path / "app.json"
    settings_file.write_text('{"kiosk_pin": "2468"}')
    assert exec_start[exec_start.index("--config") + 1] == f"{PiBundleConfig().state_dir}/app.json"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(exec_start[4:])
    args.config = str(settings_file)
    config = from_args(args)
    assert config.kiosk and config.kiosk_pin == "2468"
    if shutil.which("systemd-analyze"):  # systemd's own parser; the venv exists only once installed
        unit = tmp_path / UNIT
        unit.write_text(text.replace(exec_start[0], sys.executable))
        result = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_install_script_is_valid_shell(bundle):
    subprocess.run(["bash", "-n", bundle / "install.sh"], check=True)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-x", "install.sh"], cwd=bundle, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    env = dict(line.split("=", 1) for line in (bundle / "bundle.env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env == {"PREFIX": "/opt/cxr-edge", "KIOSK_USER": "cxr", "UNIT": UNIT, "MODEL": "int8.tflite",
                   "STATE_DIR": "/var/lib/cxr-edge"}


def test_bundled_app_classifies_like_the_repository(bundle, tiny_run, tiny_dataset, tmp_path):
    images = [str(next((tiny_dataset / "test" / c).iterdir())) for c in ("normal", "pneumonia", "covid")]
    ours = run_module("edge_app", "predict", *images, "--model", tiny_run / "tflite" / "int8.tflite", "--json")
    # The extracted bundle alone on the path, away from the repository; -X importtime lists every import.
    env = {**os.environ, "PYTHONPATH": str(bundle / "app")}
    theirs = subprocess.run([sys.executable, "-X", "importtime", "-m", "edge_app", "predict", *images,
                             "--model", bundle / "model" / "int8.tflite", "--json"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in theirs.stderr.splitlines()
                if line.startswith("import time:")]
    assert "edge_app.classifier" in imported
    assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "train", "convert")]
    where = subprocess.run([sys.executable, "-c", "import edge_app; print(edge_app.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    assert Path(where.stdout.strip()).is_relative_to(bundle / "app")

    def comparable(output):
        doc = json.loads(output)
        return doc["model_sha256"], [{k: v for k, v in r.items() if k != "timings_ms"} for r in doc["results"]]

    assert comparable(theirs.stdout) == comparable(ours.stdout)
    assert len(comparable(ours.stdout)[1]) == 3


def test_verify_pi_input_probe_hashes_the_model_input_and_a_differing_input_fails(bundle, tiny_dataset, tmp_path):
    """verify-pi's probe, run from the extracted bundle as on the Pi, gives the SHA-256 of the tensor
    the interpreter gets (an unreadable file: its error code); one differing input fails the
    comparison even where the probabilities agree."""
    import hashlib

    from edge_app import preprocess
    from edge_app.deploy.verify_pi import INPUT_PROBE, compare, input_digests

    model = bundle / "model" / "int8.tflite"
    images = [next((tiny_dataset / "test" / c).iterdir()) for c in ("normal", "covid")]
    broken = tmp_path / "not-an-image.jpg"
    broken.write_text("this is not an X-ray\n")
    env = {**os.environ, "PYTHONPATH": str(bundle / "app")}
    probe = subprocess.run([sys.executable, "-c", INPUT_PROBE, model, *images, broken],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    digests = input_digests(probe, "x86")
    spec = load_model_file(model)[1].input
    assert digests == {**{img.name: hashlib.sha256(preprocess.preprocess(img, spec, strict=True).tobytes()).hexdigest()
                          for img in images}, broken.name: "not_an_image"}

    result = {"source": str(images[0]), "label": "normal", "decision": "no_abnormality",
              "probabilities": {"normal": 0.9, "pneumonia": 0.05, "covid": 0.05}, "abnormal_probability": 0.1,
              "timings_ms": {"inference": 1.0}, "backend": "cpu"}
    same = compare([result], [result], 0.05, digests, digests)
    assert same["passed"] and same["inputs_identical"] == 1
    differing = compare([result], [result], 0.05, digests, {images[0].name: "0" * 64})
    assert not differing["passed"] and differing["inputs_identical"] == 0


def test_android_stage_for_buildozer(tiny_run, tmp_path):
    root = stage(tiny_run, tmp_path / "dist")
    files = _files(root)
    assert {"buildozer.spec", "main.py", "model/int8.tflite", "model/model_card.json", "edge_app/cli.py",
            "ai_edge_litert/__init__.py", "ai_edge_litert/schema_py_generated.py"} <= files
    assert not [f for f in files if f.startswith(("train/", "convert/", "edge_app/deploy/"))]
    assert forbidden_imports(root) == []
    spec = configparser.ConfigParser()
    spec.read(root / "buildozer.spec")
    app = spec["app"]
    assert app["source.dir"] == "." and "arm64-v8a" in app["android.archs"]
    requirements = {r.split("==")[0] for r in app["requirements"].split(",")}
    assert {"python3", "kivy", "numpy", "pillow", "pydicom", "flatbuffers", "tflite-runtime"} <= requirements
    assert not requirements & {"ai-edge-litert", "tensorflow"}
    # No LiteRT on Android: the staged schema alone must read the card embedded in the model.
    probe = ("import sys, ai_edge_litert; from edge_app.classifier import load_model_file; "
             "print(ai_edge_litert.__file__); print(load_model_file(sys.argv[1])[1].variant)")
    result = subprocess.run([sys.executable, "-c", probe, "model/int8.tflite"], capture_output=True, text=True,
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, check=True)
    where, variant = result.stdout.split()
    assert Path(where) == root / "ai_edge_litert" / "__init__.py" and variant == "int8"
