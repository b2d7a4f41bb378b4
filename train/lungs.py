"""The lung-field segmenter: a small U-Net-like encoder-decoder trained on cxr-lungs.

python -m train.lungs --data ../shared/data/cxr-lungs --out artifacts/lungs [--epochs N]

The run folder gets `model.keras`, `config.json`, `lung_card.json`, `tflite/lungs-{fp32,int8}.tflite`
(the card embedded, see `edge_app.lungs`) and `reports/` (`metrics.json`: Dice/IoU on val overall
and per source_class, for Keras and for each .tflite run through LiteRT, and their latency;
`overlays.png`: val images with the predicted and the true lung outline).

Images and masks are read with the one preprocessing (`edge_app.preprocess.load`, the
segmenter's own InputSpec), so the segmenter sees in training what `edge_app.lungs` feeds it.
Dice/IoU are measured at the masks' own 256 px: the predicted probability map is resized up.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

import train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from convert import export
from edge_app import lungs, preprocess
from edge_app.errors import InputError
from edge_app.runtime import InterpreterBackend


@dataclass
class LungsConfig:
    data: str = ""
    image_size: int = 96            # segmenter input; its output has the same size (a box needs no more)
    width: int = 16                 # filters of the first stage; x2 per stage down to 1/16
    epochs: int = 22                # ~30 min on the 2 shared, busy cores (70-90 s an epoch)
    batch_size: int = 32
    learning_rate: float = 3e-3     # cosine decay to 0 over all epochs
    rotation_degrees: float = 10.0
    zoom: float = 0.2               # zoom in/out up to 20 %, per axis (also changes the aspect)
    shift: float = 0.1
    gamma: float = 0.4              # grey curve x ** g, log g uniform in [-log(1+gamma), log(1+gamma)]
    contrast: float = 0.3
    representative: int = 300       # int8 calibration images (from train)
    seed: int = 42

    def spec(self) -> preprocess.InputSpec:
        return preprocess.InputSpec(size=self.image_size, channels=1, normalisation="unit", fit="pad")


def read_split(root: Path, split: str, spec: preprocess.InputSpec, progress: bool = True):
    """(images (N, s, s), masks (N, s, s) bool, full-size masks (N, 256, 256) bool, rows) of a split."""
    with open(root / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    if not rows:
        raise ValueError(f"{root}/manifest.csv has no {split!r} rows")
    images = np.empty((len(rows), spec.size, spec.size), np.float32)
    masks = np.empty_like(images, dtype=bool)
    full = []
    for i, row in enumerate(tqdm(rows, desc=f"loading {split}", unit="img", disable=not progress)):
        images[i] = preprocess.load(root / row["image"], spec)
        mask = preprocess.decode(root / row["mask"]) > 0.5
        masks[i] = preprocess.fit_square(mask.astype(np.float32), spec.size, spec.fit) > 0.5
        full.append(mask)
    return images, masks, np.stack(full), rows


def _separable(x, filters: int, stride: int, name: str):
    layers = keras.layers
    x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = layers.BatchNormalization(name=f"{name}_dw_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_dw_relu")(x)
    return _pointwise(x, filters, f"{name}_pw")


def _pointwise(x, filters: int, name: str):
    layers = keras.layers
    x = layers.Conv2D(filters, 1, use_bias=False, name=name)(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x)


def build_model(size: int, width: int) -> keras.Model:
    """Encoder of depthwise-separable blocks (1/2 .. 1/16 of the input), decoder of bilinear
    upsampling + skip connections back to 1/2, then to full size; one logit per pixel ("lung_logits")."""
    layers = keras.layers
    inputs = keras.Input((size, size, 1), name="image")
    x = layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.ReLU(6.0, name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    skips = []
    for i, filters in enumerate((width, 2 * width, 4 * width, 8 * width)):
        if i:
            x = _separable(x, filters, 2, f"down{i}")
        x = _separable(x, filters, 1, f"enc{i}")
        skips.append(x)
    for i, skip in reversed(list(enumerate(skips[:-1], start=1))):
        filters = width * 2 ** (i - 1)
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{i}")(x)
        x = layers.Concatenate(name=f"skip{i}")([x, skip])
        x = _pointwise(x, filters, f"fuse{i}")
        x = _separable(x, filters, 1, f"dec{i}")
    # full size: only a 1x1 convolution over the upsampled features and the image itself (its
    # edges place the outline), as convolutions at full size cost most of the time
    x = layers.Concatenate(name="skip0")([layers.UpSampling2D(2, interpolation="bilinear", name="up0")(x), inputs])
    logits = layers.Conv2D(1, 1, name="lung_logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=f"lung-unet-{width}")


def dice_bce_loss(y_true, logits):
    y = tf.cast(y_true, tf.float32)
    bce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(y, logits), axis=(1, 2, 3))
    p = tf.sigmoid(logits)
    dice = (2 * tf.reduce_sum(p * y, axis=(1, 2, 3)) + 1) / (tf.reduce_sum(p + y, axis=(1, 2, 3)) + 1)
    return bce + 1 - dice


def make_dataset(images, masks, cfg: LungsConfig, training: bool) -> tf.data.Dataset:
    """Batches of (image, mask) (N, s, s, 1); training: the same random geometry for both, then
    a random grey curve and contrast for the image."""
    ds = tf.data.Dataset.from_tensor_slices((images[..., None], masks[..., None].astype(np.float32)))
    if training:
        ds = ds.shuffle(len(images), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size)
    if not training:
        return ds.prefetch(tf.data.AUTOTUNE)
    L = keras.layers
    geometry = keras.Sequential([
        L.RandomRotation(cfg.rotation_degrees / 360.0, fill_mode="constant", seed=cfg.seed),
        L.RandomZoom(cfg.zoom, cfg.zoom, fill_mode="constant", seed=cfg.seed + 1),
        L.RandomTranslation(cfg.shift, cfg.shift, fill_mode="constant", seed=cfg.seed + 2),
    ])
    rng = tf.random.Generator.from_seed(cfg.seed + 3)

    def augment(x, m):
        both = geometry(tf.concat([x, m], axis=-1), training=True)
        x, m = both[..., :1], tf.cast(both[..., 1:] > 0.5, tf.float32)
        n = tf.shape(x)[0]
        log_g = rng.uniform((n, 1, 1, 1), -np.log1p(cfg.gamma), np.log1p(cfg.gamma))
        x = tf.pow(tf.clip_by_value(x, 1e-6, 1.0), tf.exp(log_g))
        factor = rng.uniform((n, 1, 1, 1), 1 - cfg.contrast, 1 + cfg.contrast)
        mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
        return tf.clip_by_value((x - mean) * factor + mean, 0.0, 1.0), m

    return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def scores(probabilities: np.ndarray, full_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU of (N, s, s) probabilities, resized up to the masks' size, at 0.5."""
    dice, iou = np.empty(len(full_masks)), np.empty(len(full_masks))
    for i, (p, truth) in enumerate(zip(probabilities, full_masks)):
        pred = lungs.resize(p, truth.shape) > 0.5
        inter, total = np.logical_and(pred, truth).sum(), pred.sum() + truth.sum()
        dice[i] = 2 * inter / total if total else 1.0
        iou[i] = inter / (total - inter) if total else 1.0
    return dice, iou


def summary(dice: np.ndarray, iou: np.ndarray, rows) -> dict:
    """Mean Dice/IoU overall and per source_class, with the worst image's Dice."""
    out = {}
    groups = {"all": np.ones(len(rows), bool)}
    groups.update({c: np.array([r["source_class"] == c for r in rows])
                   for c in sorted({r["source_class"] for r in rows})})
    for name, pick in groups.items():
        out[name] = {"images": int(pick.sum()), "dice": float(dice[pick].mean()), "iou": float(iou[pick].mean()),
                     "dice_min": float(dice[pick].min()), "dice_below_0.9": int((dice[pick] < 0.9).sum())}
    return out


def overlays(images, probabilities, masks, dice, path: Path, count: int = 16) -> None:
    """A 4-column grid of val images, the worst half by Dice first then a random half: true lung
    outline green, predicted red, Dice in the corner."""
    worst = list(np.argsort(dice)[: count // 2])
    rest = [i for i in np.random.default_rng(0).permutation(len(dice)) if i not in worst][: count - len(worst)]
    size = images.shape[1] * 2
    grid = Image.new("RGB", (4 * size, -(-count // 4) * size))
    for k, i in enumerate(worst + rest):
        tile = Image.fromarray((images[i] * 255).astype(np.uint8)).resize((size, size)).convert("RGB")
        rgb = np.asarray(tile).copy()
        for mask, colour in ((masks[i], (0, 255, 0)), (probabilities[i] > 0.5, (255, 0, 0))):
            big = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size))) > 127
            edge = big & ~_eroded(big)
            rgb[edge] = colour
        tile = Image.fromarray(rgb)
        ImageDraw.Draw(tile).text((4, 4), f"{dice[i]:.3f}", fill=(255, 255, 0))
        grid.paste(tile, ((k % 4) * size, (k // 4) * size))
    grid.save(path)


def _eroded(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def latency_ms(model_bytes: bytes, threads: int, runs: int = 200) -> float:
    """Median LiteRT Interpreter time of one image, in ms (after a warm-up)."""
    from ai_edge_litert.interpreter import Interpreter

    backend = InterpreterBackend("litert", Interpreter(model_content=model_bytes, num_threads=threads))
    x = np.random.default_rng(0).random(backend.input_shape, np.float32)
    for _ in range(20):
        backend.run(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        backend.run(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def latency_against(run_dir: Path, classifier: Path, rounds: int = 5) -> dict:
    """The run's segmenters and a classifier file timed in alternation (`rounds` x 100 runs each,
    the median of the rounds' medians), at 1 and 2 threads: a busy machine slows them alike, so the
    ratio holds better than the milliseconds."""
    files = {p.stem: p.read_bytes() for p in sorted((run_dir / "tflite").glob("lungs-*.tflite"))}
    files["classifier"] = Path(classifier).read_bytes()
    out = {"classifier": str(classifier)}
    for threads in (1, 2):
        times = {name: [] for name in files}
        for _ in range(rounds):
            for name, data in files.items():
                times[name].append(latency_ms(data, threads, runs=100))
        ms = {name: float(np.median(t)) for name, t in times.items()}
        out[f"{threads}_threads"] = {"ms": ms, "vs_classifier": {n: ms[n] / ms["classifier"] for n in ms if n != "classifier"}}
    return out


def run(cfg: LungsConfig, out: Path, progress: bool = True, export_only: bool = False) -> dict:
    """Train (or, with export_only, load the run's trained model), evaluate, export, report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()   # the same data and seed give the same segmenter file on one
    root, spec = Path(cfg.data), cfg.spec()          # machine (not across CPUs: docs/RESULTS.md, 2026-12-07 night);
                                                     # every classifier's crops (and its card's lung_model) depend on it
    x_train, m_train, _, _ = read_split(root, "train", spec, progress)
    x_val, m_val, full_val, val_rows = read_split(root, "val", spec, progress)

    if export_only:
        model = keras.models.load_model(out / "model.keras", compile=False)
        metrics = out / "reports" / "metrics.json"
        previous = json.loads(metrics.read_text()) if metrics.is_file() else {}   # none: training was interrupted
        return _evaluate_and_export(model, cfg, out, previous.get("history", {}), previous.get("train_minutes"),
                                    x_train, x_val, m_val, full_val, val_rows, progress)
    model = build_model(spec.size, cfg.width)
    steps = -(-len(x_train) // cfg.batch_size) * cfg.epochs
    schedule = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=dice_bce_loss)
    print(f"{model.name}: {model.count_params():,} parameters; {len(x_train)} train, {len(x_val)} val images")
    started = time.time()
    history = model.fit(make_dataset(x_train, m_train, cfg, True), epochs=cfg.epochs,
                        validation_data=make_dataset(x_val, m_val, cfg, False), verbose=2,
                        callbacks=[keras.callbacks.ModelCheckpoint(str(out / "model.keras"))])  # each epoch:
                        # an interrupted run can still be evaluated and exported (--export-only)
    minutes = (time.time() - started) / 60
    model.save(out / "model.keras")
    (out / "reports" / "metrics.json").write_text(json.dumps(
        {"train_minutes": minutes, "history": {k: [float(v) for v in vs] for k, vs in history.history.items()}}))
    return _evaluate_and_export(model, cfg, out, history.history, minutes, x_train, x_val, m_val, full_val,
                                val_rows, progress)


def _evaluate_and_export(model, cfg, out, history, minutes, x_train, x_val, m_val, full_val, val_rows, progress):
    root, spec = Path(cfg.data), cfg.spec()
    probabilities = tf.sigmoid(model.predict(x_val[..., None], batch_size=64, verbose=0)).numpy()[..., 0]
    dice, iou = scores(probabilities, full_val)
    results = {"parameters": int(model.count_params()), "train_minutes": minutes,
               "history": {k: [float(v) for v in vs] for k, vs in history.items()},
               "val": {"keras": summary(dice, iou, val_rows)}, "tflite": {}}
    overlays(x_val, probabilities, m_val, dice, out / "reports" / "overlays.png")

    card = lungs.LungCard(name=model.name, input=spec, metrics={"val_dice": results["val"]["keras"]["all"]["dice"],
                                                                "val_iou": results["val"]["keras"]["all"]["iou"]},
                          dataset={"root": str(root), "train": len(x_train), "val": len(x_val)})
    (out / "lung_card.json").write_text(card.to_json() + "\n")
    pick = np.random.default_rng(cfg.seed).permutation(len(x_train))[: cfg.representative]
    (out / "tflite").mkdir(exist_ok=True)
    for recipe in ("fp32", "int8"):
        flatbuffer = export.convert(model, recipe, x_train[pick][..., None], progress=progress)
        path = out / "tflite" / f"lungs-{recipe}.tflite"
        path.write_bytes(lungs.with_card(flatbuffer, dataclasses.replace(card, variant=recipe)))
        segmenter = lungs.Segmenter.open(path)
        probs = np.stack([segmenter.probabilities(x) for x in x_val])
        d, j = scores(probs, full_val)
        data = path.read_bytes()
        results["tflite"][recipe] = {"file": str(path), "bytes": len(data),
                                     "sha256": hashlib.sha256(data).hexdigest(),
                                     "latency_ms": {f"{t}_threads": latency_ms(data, t) for t in (1, 2)}}
        results["val"][recipe] = summary(d, j, val_rows)
    (out / "reports" / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "reports" / "report.md").write_text(report_md(results))
    return results


def survey(model_path: Path, data: str, spec: preprocess.InputSpec, progress: bool = True) -> dict:
    """What the lung step makes of a classification set, per source / class: how many images it
    refuses (by InputError code) and on how many it finds one lung or two; `negatives`: the same for
    each image's negative (grey inverted), which it should refuse (negative_image). `spec`: the
    classifier's preprocessing before the lung step (decoded at its size, borders trimmed as it says)."""
    from train.data import load_dataset

    segmenter = lungs.use(model_path)
    dataset = load_dataset(data, check_readable=False, progress=progress)
    outcomes: dict[str, dict[str, int]] = {}
    negatives: dict[str, dict[str, int]] = {}

    def count(table, group, gray):
        try:
            outcome = f"{segmenter.find(gray).lungs_found} lung(s)"
        except InputError as e:
            outcome = e.code
        table.setdefault(group, {})
        table[group][outcome] = table[group].get(outcome, 0) + 1

    for record in tqdm(dataset.records, desc="lung fields", unit="img", disable=not progress):
        gray = preprocess.decode(record.path, draft_size=spec.size)
        gray = preprocess.trim_borders(gray) if spec.borders == "trim" else gray
        group = f"{record.source or 'unknown'} / {record.label}"
        count(outcomes, group, gray)
        count(negatives, group, 255 - gray)
    return {"model": str(model_path), "sha256": segmenter.sha256, "data": data, "outcomes": outcomes,
            "negatives": negatives}


def report_md(results: dict) -> str:
    lines = ["# Lung-field segmenter", "",
             f"{results['parameters']:,} parameters; " + (
                 f"trained in {results['train_minutes']:.1f} min." if results["train_minutes"] is not None else
                 "training interrupted: exported from its last epoch's checkpoint (--export-only)."), "",
             "Dice / IoU on cxr-lungs val at 256 px (mean per image; images with Dice < 0.9)", "",
             "| model | group | images | Dice | IoU | min Dice | < 0.9 |", "|---|---|---|---|---|---|---|"]
    for model, groups in results["val"].items():
        for group, m in groups.items():
            lines.append(f"| {model} | {group} | {m['images']} | {m['dice']:.4f} | {m['iou']:.4f} "
                         f"| {m['dice_min']:.3f} | {m['dice_below_0.9']} |")
    lines += ["", "| file | bytes | LiteRT 1 thread (ms) | 2 threads (ms) |", "|---|---|---|---|"]
    for recipe, t in results["tflite"].items():
        lines.append(f"| {Path(t['file']).name} | {t['bytes']:,} | {t['latency_ms']['1_threads']:.3f} "
                     f"| {t['latency_ms']['2_threads']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.lungs", description="Train the lung-field segmenter.")
    p.add_argument("--data", required=True, help="the cxr-lungs folder (manifest.csv, train/, val/)")
    p.add_argument("--out", required=True, help="run folder, e.g. artifacts/lungs")
    for f in dataclasses.fields(LungsConfig):
        if f.name != "data":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), dest=f.name)
    p.add_argument("--export-only", action="store_true", help="evaluate and export the run's trained model")
    p.add_argument("--survey", metavar="DATA", help="instead: run the run's int8 segmenter over a classification "
                   "set (the default recipe's decode and border trim), and over each image's negative, and write "
                   "reports/survey.json")
    p.add_argument("--latency-against", metavar="TFLITE", help="instead: time the run's segmenters against this "
                   "classifier file (e.g. artifacts/RUN/tflite/int8.tflite) and write reports/latency.json")
    p.add_argument("--no-progress", action="store_true")
    args = vars(p.parse_args(argv))
    out, progress, export_only = Path(args.pop("out")), not args.pop("no_progress"), args.pop("export_only")
    survey_data, classifier = args.pop("survey"), args.pop("latency_against")
    cfg = LungsConfig(**{k: v for k, v in args.items() if v is not None})
    if classifier:
        result = latency_against(out, Path(classifier))
        (out / "reports" / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=1))
        return
    if survey_data:
        from train.config import TrainConfig
        from train.models import input_spec

        default = TrainConfig()
        spec = input_spec(default.model, default.image_size, default.fit, default.input_contrast, default.input_borders)
        result = survey(out / "tflite" / "lungs-int8.tflite", survey_data, spec, progress)
        (out / "reports" / "survey.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({key: result[key] for key in ("outcomes", "negatives")}, indent=1))
        return
    results = run(cfg, out, progress, export_only)
    print(report_md(results))


if __name__ == "__main__":
    main()
