"""Convert a training run: every variant exported, embedded with its card, and gated on parity."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

import train  # noqa: F401
import tf_keras as keras

from convert import export, parity
from edge_app.model_card import ModelCard
from edge_app.preprocess import normalise
from train.config import TrainConfig
from train.data import load_dataset
from train.ood import OodModel
from train.pipeline import load_images

REPRESENTATIVE_IMAGES = 200


class ParityError(RuntimeError):
    """A variant classifies worse than its budget allows."""


def load_run(run_dir: Path):
    run_dir = Path(run_dir)
    for name in ("model.keras", "model_card.json", "config.json"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a training run: {name} is missing "
                                    f"(train one with `python -m train ... --out {run_dir}`)")
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    card = ModelCard.from_json((run_dir / "model_card.json").read_text())
    config = TrainConfig.from_file(run_dir / "config.json")
    return model, card, config


def convert_run(run_dir: str | Path, *, variants=export.VARIANTS, budgets=None,
                progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    budgets = {**parity.DEFAULT_BUDGETS, **(budgets or {})}
    model, card, config = load_run(run_dir)
    dataset = load_dataset(card.dataset["root"], task=card.task, seed=card.dataset.get("seed", config.seed),
                           progress=progress)
    if dataset.fingerprint() != card.dataset.get("fingerprint"):
        print("WARNING: the dataset changed since training (fingerprint differs); "
              "parity is measured on the data as it is now")
    spec = card.input
    labels = card.labels
    rng = np.random.default_rng(card.dataset.get("seed", 0))
    train_records = dataset.split("train")
    sample = [train_records[i] for i in rng.permutation(len(train_records))[:REPRESENTATIVE_IMAGES]]
    representative = normalise(load_images(sample, spec, desc="representative", progress=progress), spec)
    test_records = dataset.split("test")
    x_test = normalise(load_images(test_records, spec, desc="test", progress=progress), spec)
    y_test = np.array([labels.index(r.label) for r in test_records])
    keras_logits = model.predict(x_test, batch_size=64, verbose=0)
    reference = parity.evaluate(keras_logits, y_test, card)

    device_model = export.with_heatmap(model)
    if (run_dir / "ood.npz").is_file():  # runs trained before the OOD score have none
        device_model = export.with_ood_score(device_model, OodModel.load(run_dir / "ood.npz"))
    out_dir = run_dir / "tflite"
    out_dir.mkdir(exist_ok=True)
    results = {"run": str(run_dir), "labels": list(labels), "keras": {"metrics": reference},
               "variants": {}}
    for variant in variants:
        print(f"converting {variant} ...", flush=True)
        flatbuffer = export.convert(device_model, variant, representative if variant == "int8" else None)
        path = out_dir / f"{variant}.tflite"
        path.write_bytes(export.with_card(flatbuffer, card, variant))
        logits = parity.variant_logits(path, x_test, desc=f"evaluating {variant}", progress=progress)
        candidate = parity.evaluate(logits, y_test, card)
        data = path.read_bytes()
        results["variants"][variant] = {
            "file": str(path), "bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9)),
            "metrics": candidate,
            "parity": parity.compare(reference, candidate, keras_logits, logits, budgets.get(variant, 1.0)),
        }
    fp32_bytes = results["variants"].get("fp32", {}).get("bytes")
    for v in results["variants"].values():
        v["size_vs_fp32"] = v["bytes"] / fp32_bytes if fp32_bytes else None
    write_reports(run_dir / "reports", results)
    failures = [f"{name}: {f}" for name, v in results["variants"].items() for f in v["parity"]["failures"]]
    if failures:
        raise ParityError("parity gate failed:\n  " + "\n  ".join(failures))
    return results


def write_reports(reports: Path, results: dict) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "conversion.json").write_text(json.dumps(results, indent=2))
    ref = results["keras"]["metrics"]
    lines = ["# Conversion report", "",
             "Test split, through LiteRT on the CPU; drops are in points against the Keras model.", "",
             "| variant | size (KiB) | gzip (KiB) | × fp32 | accuracy | macro-F1 | abnormal sens. | abnormal spec. "
             "| AUC | agreement | F1 drop | budget | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| keras | | | | {ref['accuracy']:.4f} | {ref['macro_f1']:.4f} | {ref['abnormal']['sensitivity']:.4f} "
             f"| {ref['abnormal']['specificity']:.4f} | {ref['abnormal']['auc']:.4f} | | | | |"]
    for name, v in results["variants"].items():
        m, p = v["metrics"], v["parity"]
        lines.append(
            f"| {name} | {v['bytes'] / 1024:.0f} | {v['gzip_bytes'] / 1024:.0f} | {v['size_vs_fp32']:.2f} "
            f"| {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['abnormal']['sensitivity']:.4f} "
            f"| {m['abnormal']['specificity']:.4f} | {m['abnormal']['auc']:.4f} | {p['agreement']:.4f} "
            f"| {p['macro_f1_drop_points']:+.2f} | {p['budget_points']:.1f} | {'pass' if p['passed'] else 'FAIL'} |")
    (reports / "conversion.md").write_text("\n".join(lines) + "\n")
