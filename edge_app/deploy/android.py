"""Stage an Android tablet build for buildozer: the device package, one model, buildozer.spec.

  python -m edge_app.deploy.android artifacts/RUN [--variant int8] [--out dist]
  cd dist/cxr-edge-android-RUN-int8 && buildozer android debug     # needs the Android SDK/NDK

Buildozer packs everything under its source.dir, so it runs in this staged folder, never in the
repository (which holds train/, convert/ and TensorFlow). Untested: the Android SDK/NDK cannot be
downloaded on the build machines. ai-edge-litert has no Android wheel: the APK gets the TFLite
interpreter from python-for-android's tflite-runtime recipe (edge_app.runtime's `tflite-runtime`
backend) and reads the embedded model card with LiteRT's generated flatbuffers schema, staged as
ai_edge_litert/schema_py_generated.py (pure Python: flatbuffers and numpy).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from edge_app.classifier import load_model_file
from edge_app.deploy.pi import BundleError, copy_device_package

ANDROID = Path(__file__).resolve().parent / "android"
SCHEMA_STUB = '"""Only the flatbuffers schema of LiteRT, to read model cards (no Android wheel exists)."""\n'


def stage(run_dir: str | Path, out_dir: str | Path = "dist", variant: str = "int8") -> Path:
    """dist/cxr-edge-android-<run>-<variant>/, ready for `buildozer android debug`."""
    from ai_edge_litert import schema_py_generated

    run_dir = Path(run_dir)
    model = run_dir / "tflite" / f"{variant}.tflite"
    if not model.is_file():
        raise BundleError(f"{model} not found: convert the run first (python -m convert {run_dir})")
    _, card = load_model_file(model)
    root = Path(out_dir) / f"cxr-edge-android-{run_dir.name}-{variant}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    copy_device_package(root)
    (root / "model").mkdir()
    shutil.copy2(model, root / "model" / model.name)
    (root / "model" / "model_card.json").write_text(card.to_json() + "\n")
    for name in ("buildozer.spec", "main.py"):
        shutil.copy2(ANDROID / name, root / name)
    (root / "ai_edge_litert").mkdir()
    (root / "ai_edge_litert" / "__init__.py").write_text(SCHEMA_STUB)
    shutil.copy2(schema_py_generated.__file__, root / "ai_edge_litert" / "schema_py_generated.py")
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_app.deploy.android", description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder with tflite/ (artifacts/RUN)")
    p.add_argument("--variant", default="int8")
    p.add_argument("--out", default="dist")
    args = p.parse_args(argv)
    try:
        root = stage(args.run, args.out, args.variant)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{root}/  then: cd {root} && buildozer android debug")
    return 0


if __name__ == "__main__":
    sys.exit(main())
