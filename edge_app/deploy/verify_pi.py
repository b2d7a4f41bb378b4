"""Install a Pi bundle on an emulated aarch64 Debian 12 and check it classifies like x86.

  sudo python -m edge_app.deploy.verify_pi dist/NAME.tar.gz --images ../shared/data/cxr/test

The rootfs (debootstrap + qemu-user-static, pi_rootfs.sh) is built once and reused. The bundle's
install.sh runs in it as on a Pi (offline, from the vendored wheels; systemd skipped), then
`python -m edge_app predict --json` runs on the same images under emulation and here on x86 with
the same bundled code and model: labels, decisions and error codes must be identical, every
image's model input bit-identical (its SHA-256 on both CPUs) and every probability within --tolerance.

The emulated CPU is a Pi's (--cpu pi4: Cortex-A72, ARMv8.0; pi5: Cortex-A76, ARMv8.2): qemu runs
that CPU model and the rootfs gets that Pi's /proc/cpuinfo and /sys CPU lists as plain files. The
host's /proc and /sys stay unmounted (with both visible, LiteRT's CPU detection crashes under
qemu), and with neither, cpuinfo fails and LiteRT silently runs without XNNPACK, which is not
what a Pi runs.

Writes report.json and report.png (x86 vs aarch64 probabilities) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST = "/tmp/cxr-verify"  # inside the rootfs
# qemu CPU model, MIDR variant/part/revision and the kernel's Features line of each Pi.
CPUS = {
    "pi4": ("cortex-a72", "0x0", "0xd08", "3", "fp asimd evtstrm crc32 cpuid"),
    "pi5": ("cortex-a76", "0x4", "0xd0b", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
            "asimdhp cpuid asimdrdm lrcpc dcpop asimddp"),
}
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
              "LANG": "C.UTF-8", "KIVY_HOME": f"{GUEST}/kivy", "KIVY_NO_ARGS": "1",
              "CXR_EDGE_VERBOSE": "1"}   # LiteRT's log is the evidence that XNNPACK ran (native_logs)
# What can be checked of Kivy without a display: the package, its SDL2 window module (linked
# against the wheel's own SDL2) and the video drivers compiled into that SDL2.
XNNPACK = "Created TensorFlow Lite XNNPACK delegate"  # LiteRT's log line when XNNPACK runs the model
KIVY_PROBE = """
import ctypes, glob, json, os, kivy
import kivy.core.window._window_sdl2
lib = glob.glob(os.path.join(os.path.dirname(kivy.__file__), os.pardir, "Kivy.libs", "libSDL2-2*"))[0]
sdl = ctypes.CDLL(lib)
sdl.SDL_GetVideoDriver.restype = ctypes.c_char_p
drivers = [sdl.SDL_GetVideoDriver(i).decode() for i in range(sdl.SDL_GetNumVideoDrivers())]
print(json.dumps({"kivy": kivy.__version__, "sdl2": os.path.basename(lib), "video_drivers": drivers}))
"""

# The SHA-256 of every image's model input (the float32 tensor the interpreter gets), by file name:
# identical inputs on both CPUs are what make an int8 model's answers identical.
INPUT_PROBE = """
import hashlib, json, sys
from pathlib import Path
from edge_app import preprocess
from edge_app.classifier import Classifier
from edge_app.errors import InputError
spec = Classifier(sys.argv[1], accelerator="cpu", num_threads=1).spec
digests = {}
for path in sys.argv[2:]:
    try:
        digests[Path(path).name] = hashlib.sha256(preprocess.preprocess(path, spec, strict=True).tobytes()).hexdigest()
    except InputError as exc:
        digests[Path(path).name] = exc.code
print(json.dumps(digests))
"""


def step(i: int, total: int, what: str) -> None:
    print(f"[verify-pi {i}/{total}] {what}", flush=True)


def emulate_cpu(root: Path, cpu: str) -> dict[str, str]:
    """Write the Pi's CPU description into the rootfs; the environment that makes qemu run that CPU."""
    model, variant, part, revision, features = CPUS[cpu]
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").write_text("".join(
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n\n"
        for i in range(4)))
    cpus = root / "sys" / "devices" / "system" / "cpu"
    cpus.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpus / name).write_text("0-3\n")
    return {"QEMU_CPU": model}


def pick_images(folder: Path, per_class: int) -> list[Path]:
    """The first `per_class` images (sorted by name) of each class folder of a test split."""
    images = []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        images += sorted(p for p in cls.iterdir() if p.is_file())[:per_class]
    if not images:
        raise SystemExit(f"no images in class folders of {folder}")
    return images


def timed(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return result, time.perf_counter() - t0


def predictions(result: subprocess.CompletedProcess, where: str) -> list[dict]:
    if result.returncode not in (0, 1):  # 1: an image could not be screened, the rest were
        raise SystemExit(f"predict on {where} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)["results"]


def input_digests(result: subprocess.CompletedProcess, where: str) -> dict[str, str]:
    if result.returncode != 0:
        raise SystemExit(f"the model-input probe on {where} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(x86: list[dict], arm: list[dict], tolerance: float, inputs_x86: dict, inputs_arm: dict) -> dict:
    rows, max_diff = [], 0.0
    for a, b in zip(x86, arm, strict=True):
        row = {"image": Path(a["source"]).name}
        row["input_identical"] = inputs_x86[row["image"]] == inputs_arm[row["image"]]
        if "error" in a or "error" in b:
            row |= {"x86": a.get("error", {}).get("code", a.get("label")),
                    "aarch64": b.get("error", {}).get("code", b.get("label"))}
            row["same"] = row["x86"] == row["aarch64"]
        else:
            diff = max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"])
            max_diff = max(max_diff, diff)
            row |= {"x86": f"{a['label']}/{a['decision']}", "aarch64": f"{b['label']}/{b['decision']}",
                    "max_prob_diff": diff, "p_abnormal_x86": a["abnormal_probability"],
                    "p_abnormal_aarch64": b["abnormal_probability"],
                    "inference_ms_x86": a["timings_ms"]["inference"],
                    "inference_ms_aarch64_qemu": b["timings_ms"]["inference"],
                    "backend_aarch64": b["backend"]}
            row["same"] = (a["label"], a["decision"]) == (b["label"], b["decision"]) and diff <= tolerance
        row["same"] = row["same"] and row["input_identical"]
        rows.append(row)
    return {"images": rows, "max_prob_diff": max_diff, "tolerance": tolerance,
            "inputs_identical": sum(r["input_identical"] for r in rows),
            "passed": all(r["same"] for r in rows)}


def plot(x86: list[dict], arm: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(a["probabilities"][k], b["probabilities"][k]) for a, b in zip(x86, arm)
             if "error" not in a and "error" not in b for k in a["probabilities"]]
    xs, ys = zip(*pairs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    left.scatter(xs, ys, s=14)
    left.plot([0, 1], [0, 1], lw=0.8, color="grey")
    left.set(xlabel="probability on x86", ylabel="probability on aarch64 (qemu)",
             title="every class probability of every image")
    right.bar(range(len(xs)), [abs(x - y) for x, y in pairs])
    right.set(xlabel="image x class", ylabel="|x86 - aarch64|", title="absolute difference")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_app.deploy.verify_pi", description=__doc__.splitlines()[0])
    p.add_argument("tarball", type=Path)
    p.add_argument("--images", type=Path, required=True, help="a test split with one folder per class")
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--rootfs", type=Path, default=Path("build/pi-rootfs"))
    p.add_argument("--out", type=Path, default=Path("build/verify-pi"))
    p.add_argument("--cpu", choices=sorted(CPUS), default="pi4", help="the Pi whose CPU is emulated")
    # The model input is bit-identical on both CPUs (integer decode and resize, preprocessing v2), so an
    # int8 model answers identically (measured: 0); float kernels differ in the last bits between
    # CPUs (fp32: up to 2e-6). Preprocessing v1's float resize gave int8 differences up to 0.045.
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |probability difference|")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("verify-pi needs root (debootstrap, chroot)")
    root, name, total = args.rootfs.resolve(), args.tarball.name.removesuffix(".tar.gz"), 8

    step(1, total, f"emulated Debian 12 arm64 rootfs in {root} (cached after the first run)")
    subprocess.run(["bash", str(HERE / "pi_rootfs.sh"), str(root)], check=True)
    for mnt in ("proc", "sys"):
        if os.path.ismount(root / mnt):
            raise SystemExit(f"{root / mnt} is mounted: unmount it (LiteRT's CPU detection crashes under qemu)")

    step(2, total, "bundle and images into the rootfs")
    guest = root / GUEST.lstrip("/")
    shutil.rmtree(guest, ignore_errors=True)
    shutil.rmtree(root / "opt/cxr-edge", ignore_errors=True)
    (guest / "images").mkdir(parents=True)
    with tarfile.open(args.tarball) as tar:
        tar.extractall(guest)
    images = pick_images(args.images, args.per_class)
    names = [f"{i:02d}-{img.parent.name}-{img.name}" for i, img in enumerate(images)]
    for img, n in zip(images, names):
        shutil.copy2(img, guest / "images" / n)
    names.append(f"{len(names):02d}-not-an-image.jpg")  # the error path must agree too
    (guest / "images" / names[-1]).write_text("this is not an X-ray\n")
    host = args.out.resolve()
    shutil.rmtree(host, ignore_errors=True)
    shutil.copytree(guest, host / "bundle")
    bundle_env = dict(line.split("=", 1) for line in (guest / name / "bundle.env").read_text().splitlines()
                      if line and not line.startswith("#"))
    prefix, model = bundle_env["PREFIX"], bundle_env["MODEL"]

    chroot_env = CHROOT_ENV | emulate_cpu(root, args.cpu)

    def chroot(*cmd: str):
        return timed(["chroot", str(root), *cmd], env=chroot_env)

    step(3, total, f"install.sh --no-systemd under emulation ({args.cpu}: {chroot_env['QEMU_CPU']}; offline wheels)")
    install, install_s = chroot("/bin/bash", f"{GUEST}/{name}/install.sh", "--no-systemd")
    print(install.stdout[-3000:], install.stderr[-3000:], sep="\n")
    if install.returncode != 0:
        raise SystemExit(f"install.sh failed in the emulated Pi (exit {install.returncode})")

    step(4, total, f"predict on {len(names)} images under emulation (aarch64)")
    arm_run, arm_s = chroot(f"{prefix}/venv/bin/python", "-m", "edge_app", "predict",
                            *[f"{GUEST}/images/{n}" for n in names], "--model", f"{prefix}/model/{model}", "--json")
    arm = predictions(arm_run, "aarch64")

    step(5, total, "the same predict here (x86), same bundled code and model")
    env = {**os.environ, "PYTHONPATH": str(host / "bundle" / name / "app"), "CXR_EDGE_VERBOSE": "1"}
    x86_run, x86_s = timed([sys.executable, "-m", "edge_app", "predict",
                            *[str(host / "bundle" / "images" / n) for n in names],
                            "--model", str(host / "bundle" / name / "model" / model), "--json"], env=env, cwd=host)
    x86 = predictions(x86_run, "x86")

    step(6, total, "Kivy in the emulated Pi (no display: import, SDL2 module, SDL2 video drivers)")
    kivy_run, _ = chroot(f"{prefix}/venv/bin/python", "-c", KIVY_PROBE)
    kivy = (json.loads(kivy_run.stdout.strip().splitlines()[-1]) if kivy_run.returncode == 0
            else {"error": kivy_run.stderr[-2000:]})

    step(7, total, "the model input of every image, SHA-256, on both CPUs")
    guest_images = [f"{GUEST}/images/{n}" for n in names]
    arm_inputs = input_digests(chroot(f"{prefix}/venv/bin/python", "-c", INPUT_PROBE, f"{prefix}/model/{model}",
                                      *guest_images)[0], "aarch64")
    x86_inputs = input_digests(timed([sys.executable, "-c", INPUT_PROBE, str(host / "bundle" / name / "model" / model),
                                      *[str(host / "bundle" / "images" / n) for n in names]], env=env, cwd=host)[0],
                               "x86")

    step(8, total, "compare")
    report = compare(x86, arm, args.tolerance, x86_inputs, arm_inputs)
    guest_python, _ = chroot(f"{prefix}/venv/bin/python", "-c", "import platform; print(platform.platform())")
    report |= {"bundle": name, "cpu": f"{args.cpu} (qemu {chroot_env['QEMU_CPU']})",
               "guest": guest_python.stdout.strip(), "kivy": kivy,
               "xnnpack": {"x86": XNNPACK in x86_run.stderr, "aarch64": XNNPACK in arm_run.stderr},
               "wall_s": {"install_qemu": round(install_s, 1), "predict_qemu": round(arm_s, 1),
                          "predict_x86": round(x86_s, 1)}, "images_dir": str(args.images)}
    report["passed"] = (report["passed"] and report["xnnpack"]["aarch64"] and "error" not in kivy
                        and "KMSDRM" in kivy.get("video_drivers", []))
    (host / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(x86, arm, host / "report.png")
    for r in report["images"]:
        print(f"  {'ok  ' if r['same'] else 'DIFF'} {r['image'][:44]:44s} x86 {r['x86']:28s} "
              f"aarch64 {r['aarch64']:28s} {r.get('max_prob_diff', 0):.2e} "
              f"input {'identical' if r['input_identical'] else 'DIFFERS'}")
    print(f"model input bit-identical on {report['inputs_identical']} of {len(report['images'])} files; "
          f"max |probability difference| {report['max_prob_diff']:.3e} (tolerance {args.tolerance:g}); "
          f"wall: install {install_s:.0f} s, predict {arm_s:.1f} s under qemu vs {x86_s:.1f} s on x86; "
          f"XNNPACK {report['xnnpack']}; kivy: {kivy}")
    print(f"{'PASSED' if report['passed'] else 'FAILED'}: {host / 'report.json'}, {host / 'report.png'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
