"""The Raspberry Pi bundle: one folder (and its tarball) that installs the kiosk offline.

  python -m edge_app.deploy.pi build artifacts/RUN [--variant int8] [--out dist] [--no-wheels]
  python -m edge_app.deploy.pi lock      # re-pin requirements-pi.txt from requirements-pi.in

The bundle holds the device package only (no train/, convert/ or this deploy/ folder, and a scan
refuses any module-level TensorFlow import), one model with its card, requirements pinned with
hashes, the aarch64 wheels (a clinic has no internet), install.sh and a systemd kiosk unit. The
target is 64-bit Raspberry Pi OS bookworm: aarch64, CPython 3.11, glibc 2.36.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import edge_app
from edge_app.classifier import load_model_file

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates" / "pi"
LOCK_INPUT = HERE / "requirements-pi.in"
LOCK = HERE / "requirements-pi.txt"
# `pip download` arguments that select the Pi's wheels from any machine.
PI_WHEELS = ["--only-binary=:all:", "--platform", "manylinux_2_27_aarch64", "--platform",
             "manylinux2014_aarch64", "--python-version", "3.11", "--implementation", "cp"]
# Never at module level of a bundled file (a lazy fallback inside a function is allowed) ...
TENSORFLOW = {"tensorflow", "tf_keras", "keras", "tensorflow_model_optimization"}
# ... and never anywhere: these packages are not in the bundle.
NOT_SHIPPED = {"train", "convert", "benchmarks", "tests"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


class BundleError(RuntimeError):
    """The bundle cannot be built as asked (missing model, forbidden import, bad lock)."""


@dataclass
class PiBundleConfig:
    variant: str = "int8"                 # which tflite/<variant>.tflite of the run
    prefix: str = "/opt/cxr-edge"         # where install.sh puts venv/, app/ and model/
    user: str = "cxr"                     # the kiosk's unprivileged user
    unit: str = "cxr-edge-kiosk.service"
    state_name: str = "cxr-edge"          # systemd StateDirectory: /var/lib/<state_name>
    # The kiosk's command line, the one place to change it ({python}: the venv's interpreter).
    kiosk_command: str = "{python} -m edge_app app --kiosk --model {model} --config {state_dir}/app.json"
    gl_backend: str = "sdl2"              # Kivy's GL through SDL2's EGL context on KMS/DRM
    wheels: bool = True                   # vendor the aarch64 wheels for an offline install
    wheel_cache: Path = Path("build/pi-wheels")

    @property
    def state_dir(self) -> str:
        return f"/var/lib/{self.state_name}"


def forbidden_imports(package_dir: Path) -> list[str]:
    """`file:line imports X` for every import a device bundle must not contain."""
    problems = []
    for py in sorted(Path(package_dir).rglob("*.py")):
        tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
        for node, in_function in _imports(tree, False):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if node.level == 0 and node.module else [])
            for name in names:
                root = name.split(".")[0]
                if root in NOT_SHIPPED or (root in TENSORFLOW and not in_function):
                    problems.append(f"{py.relative_to(package_dir)}:{node.lineno} imports {name}")
    return problems


def _imports(node, in_function: bool):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _imports(child, inner)


def read_lock(path: Path = LOCK) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, [sha256, ...])} of a hash-pinned requirements file; anything unpinned fails."""
    entries, text = {}, path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        if not match or not hashes:
            raise BundleError(f"{path}: not pinned with ==version and --hash: {line!r}")
        entries[_canonical(match[1])] = (match[2], hashes)
    return entries


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_key(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return _canonical(name), version


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                    *PI_WHEELS, *args], check=True)


def lock(requirements_in: Path = LOCK_INPUT, out: Path = LOCK) -> Path:
    """Resolve the top-level pins for the Pi and write every wheel, dependencies too, with its hash."""
    with tempfile.TemporaryDirectory() as tmp:
        _pip_download("-r", str(requirements_in), "-d", tmp)
        wheels = sorted(Path(tmp).glob("*.whl"), key=_wheel_key)
        lines = [f"# Generated by `python -m edge_app.deploy.pi lock` from {requirements_in.name}:",
                 "# CPython 3.11 wheels for manylinux_2_27_aarch64 (64-bit Raspberry Pi OS bookworm)."]
        for wheel in wheels:
            name, version = _wheel_key(wheel)
            lines.append(f"{name}=={version} \\\n    --hash=sha256:{_sha256(wheel)}")
    out.write_text("\n".join(lines) + "\n")
    return out


def vendor_wheels(dest: Path, cache: Path, lock_path: Path = LOCK) -> list[Path]:
    """The locked aarch64 wheels in `dest`, downloaded once into `cache` and checked against the lock."""
    cache.mkdir(parents=True, exist_ok=True)
    _pip_download("--no-deps", "--require-hashes", "-r", str(lock_path), "-d", str(cache))
    pins = read_lock(lock_path)
    found = {_wheel_key(w): w for w in cache.glob("*.whl")}
    dest.mkdir(parents=True)
    copied = []
    for name, (version, hashes) in sorted(pins.items()):
        wheel = found.get((name, version))
        if wheel is None or _sha256(wheel) not in hashes:
            raise BundleError(f"no aarch64 wheel of {name}=={version} matching the lock in {cache}")
        copied.append(Path(shutil.copy2(wheel, dest)))
    return copied


def copy_device_package(dest: Path) -> Path:
    """edge_app into dest/edge_app without caches and without this deploy/ folder (build tooling,
    not the device's); refuses a copy with a forbidden import."""
    package = Path(edge_app.__file__).resolve().parent

    def ignore(directory, names):
        skip = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        return skip | ({"deploy"} if Path(directory) == package else set())

    shutil.copytree(package, dest / "edge_app", ignore=ignore)
    problems = forbidden_imports(dest)
    if problems:
        raise BundleError("the device package must not import these:\n  " + "\n  ".join(problems))
    return dest / "edge_app"


def render(template: str, values: dict[str, str]) -> str:
    text = template
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    if left:
        raise BundleError(f"template placeholders without a value: {left}")
    return text


def build_bundle(run_dir: str | Path, out_dir: str | Path = "dist",
                 config: PiBundleConfig | None = None) -> Path:
    """Build dist/<name>/ and dist/<name>.tar.gz from a converted run; returns the tarball."""
    config = config or PiBundleConfig()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model = run_dir / "tflite" / f"{config.variant}.tflite"
    if not model.is_file():
        raise BundleError(f"{model} not found: convert the run first (python -m convert {run_dir})")
    data, card = load_model_file(model)  # refuses a model without a valid card
    name = f"cxr-edge-pi-{run_dir.name}-{config.variant}"
    root = out_dir / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    copy_device_package(root / "app")

    (root / "model").mkdir()
    shutil.copy2(model, root / "model" / model.name)
    (root / "model" / "model_card.json").write_text(card.to_json() + "\n")
    shutil.copy2(LOCK, root / "requirements.txt")
    read_lock(root / "requirements.txt")
    if config.wheels:
        vendor_wheels(root / "wheels", config.wheel_cache)

    parity = conversion_parity(run_dir, config.variant)
    python = f"{config.prefix}/venv/bin/python"
    values = {
        "NAME": name, "PREFIX": config.prefix, "USER": config.user, "UNIT": config.unit,
        "MODEL": model.name, "MODEL_NAME": card.name, "VARIANT": card.variant,
        "LABELS": ", ".join(card.labels), "THRESHOLD": f"{card.abnormal_threshold:.3f}",
        "PARITY": _parity_line(parity), "STATE_NAME": config.state_name, "STATE_DIR": config.state_dir, "GL_BACKEND": config.gl_backend,
        "EXEC_START": config.kiosk_command.format(python=python, state_dir=config.state_dir,
                                                  model=f"{config.prefix}/model/{model.name}"),
    }
    (root / config.unit).write_text(render((TEMPLATES / "kiosk.service").read_text(), values))
    (root / "README.md").write_text(render((TEMPLATES / "README.md").read_text(), values))
    (root / "bundle.env").write_text(
        "# Written by python -m edge_app.deploy.pi; read by install.sh.\n"
        f"PREFIX={config.prefix}\nKIOSK_USER={config.user}\nUNIT={config.unit}\n"
        f"MODEL={model.name}\nSTATE_DIR={config.state_dir}\n")
    shutil.copy2(TEMPLATES / "install.sh", root / "install.sh")
    (root / "install.sh").chmod(0o755)
    (root / "bundle.json").write_text(json.dumps({
        "name": name, "run": run_dir.name, "variant": card.variant, "model": model.name,
        "model_sha256": hashlib.sha256(data).hexdigest(), "model_git_commit": card.git_commit,
        "parity_gate": parity,
        "bundle_git_commit": _git_commit(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target": {"os": "Raspberry Pi OS 12 (bookworm) 64-bit", "machine": "aarch64", "python": "3.11",
                   "wheel_platform": "manylinux_2_27_aarch64"},
        "config": {k: str(v) for k, v in asdict(config).items()},
    }, indent=2) + "\n")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    (root / "SHA256SUMS").write_text("".join(f"{_sha256(p)}  {p.relative_to(root)}\n" for p in files))

    tarball = out_dir / f"{name}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(root, arcname=name, filter=_root_owned)
    return tarball


def conversion_parity(run_dir: Path, variant: str) -> dict | None:
    """The conversion parity gate's verdict on this variant (reports/conversion.json), if recorded."""
    path = run_dir / "reports" / "conversion.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["variants"].get(variant, {}).get("gate")


def _parity_line(parity: dict | None) -> str:
    if parity is None:
        return "The run has no conversion report: this variant's parity with the trained model is unknown."
    if parity["passed"]:
        return "This variant passed the conversion parity gate against the trained model."
    return ("**This variant FAILED the conversion parity gate** (" + "; ".join(parity["failures"]) +
            "): it is less accurate than the trained model; see `model/model_card.json` before use.")


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_app.deploy.pi", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the bundle folder and tarball from a converted run")
    b.add_argument("run", help="run folder with tflite/ (artifacts/RUN)")
    b.add_argument("--variant", default=PiBundleConfig.variant, help="tflite variant (default: int8)")
    b.add_argument("--out", default="dist")
    b.add_argument("--no-wheels", action="store_true", help="do not vendor the aarch64 wheels (online install)")
    b.add_argument("--wheel-cache", type=Path, default=PiBundleConfig.wheel_cache)
    b.add_argument("--kiosk-command", default=PiBundleConfig.kiosk_command,
                   help="the unit's ExecStart; {python} and {model} are filled in")
    sub.add_parser("lock", help=f"re-pin {LOCK.name} (with hashes) from {LOCK_INPUT.name}")
    args = p.parse_args(argv)
    try:
        if args.command == "lock":
            print(f"wrote {lock()}")
            return 0
        config = PiBundleConfig(variant=args.variant, wheels=not args.no_wheels,
                                wheel_cache=args.wheel_cache, kiosk_command=args.kiosk_command)
        tarball = build_bundle(args.run, args.out, config)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    parity = conversion_parity(Path(args.run), args.variant)
    if parity is not None and not parity["passed"]:
        print(f"warning: {args.variant} failed the parity gate: {'; '.join(parity['failures'])}", file=sys.stderr)
    print(f"{tarball.with_suffix('').with_suffix('')}/  {tarball}  {tarball.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
