"""Convert a training run: every variant exported with its card and heat map, checked for the
GPU delegate (statically and on the GPU accelerator), and gated on parity over val and test."""
from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np

import train  # noqa: F401

from convert import compress, export, gpu, parity, report
from convert.config import ConvertConfig
from edge_app.preprocess import normalise
from edge_app.runtime import REQUIRE_GPU_ENV, gpu_required
from train import evaluate, ood
from train.data import run_splits
from train.pipeline import load_images
from train.trainer import load_run


class ParityError(RuntimeError):
    """A variant classifies worse than its budget allows, or fp16 does not run on the GPU."""


def default_variants(cfg: ConvertConfig) -> tuple[str, ...]:
    pruned = tuple(v for v in export.VARIANTS if v.startswith("pruned")) if cfg.prune_sparsity else ()
    return export.BASE_VARIANTS + pruned


def balanced_sample(records, labels, per_class: int, seed: int) -> list:
    """Up to `per_class` records of each class, drawn at random: calibration sees every class,
    not mostly the majority one."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in labels:
        of_class = [r for r in records if r.label == label]
        picked += [of_class[i] for i in sorted(rng.permutation(len(of_class))[:per_class])]
    return picked


def convert_run(run_dir: str | Path, *, variants=None, cfg: ConvertConfig | None = None,
                progress: bool = True, gpu_check: bool = True, data_root: str | Path | None = None) -> dict:
    run_dir = Path(run_dir)
    cfg = cfg or ConvertConfig()
    variants = tuple(variants or default_variants(cfg))
    if any(v.startswith("pruned") for v in variants) and not cfg.prune_sparsity:
        raise ValueError(f"pruned variants need a target sparsity: pass --prune 0.5 (asked for {variants})")
    model, card, config, dataset, splits = _prepare(run_dir, cfg, progress, data_root)
    spec, labels = card.input, card.labels
    train_records = dataset.split("train")
    representative = normalise(load_images(
        balanced_sample(train_records, labels, cfg.representative_per_class, cfg.seed), spec,
        desc="representative", progress=progress), spec)
    sources, refused = _keras_sources(model, variants, cfg, train_records, labels, spec, config, progress)
    detector = ood.OodModel.load(run_dir / "ood.npz") if (run_dir / "ood.npz").is_file() else None
    reference_quantile = _keras_ood_quantile(model, detector, splits["val"]["x"]) if detector else None
    out_dir = run_dir / "tflite"
    out_dir.mkdir(exist_ok=True)
    for stale in sorted(p for p in out_dir.glob("*.tflite") if p.stem not in variants):
        print(f"removing {stale}: not a variant of this conversion (the benchmarks take every file here)")
        stale.unlink()
    results = {"run": str(run_dir), "model": card.name, "labels": list(labels),
               "config": dataclasses.asdict(cfg),
               "keras": {s: parity.headline(d["keras"]) for s, d in splits.items()},
               "variants": {}, "refused": refused}
    for variant in variants:
        source, recipe = export.VARIANT_SOURCES[variant]
        if source not in sources:
            continue
        print(f"converting {variant} ...", flush=True)
        keras_model = sources[source]["model"]
        # The OOD score is fitted on the trained model's features: fine-tuned variants (qat, pruned)
        # have other features, so they get no OOD outputs rather than miscalibrated ones.
        variant_detector = detector if source == "trained" else None
        path = out_dir / f"{variant}.tflite"
        flatbuffer = export.convert(export.device_model(keras_model, variant_detector), recipe, representative,
                                    int8_io=cfg.int8_io, progress=progress)
        path.write_bytes(export.with_card(flatbuffer, card, variant))
        shift = None
        if recipe == "int8" and source in ("trained", "pruned") and cfg.bias_correction:
            shift = (parity.variant_logits(path, representative, desc=f"bias of {variant}", progress=progress)
                     - keras_model.predict(representative, batch_size=64, verbose=0)).mean(axis=0)
            flatbuffer = export.convert(export.device_model(export.with_logit_shift(keras_model, shift), variant_detector),
                                        recipe, representative, int8_io=cfg.int8_io, progress=progress)
            path.write_bytes(export.with_card(flatbuffer, card, variant))
        ood_entry = (_variant_ood_threshold(path, flatbuffer, card, variant, splits, reference_quantile, progress)
                     if variant_detector is not None else None)
        entry = _check_variant(path, variant, splits, card, cfg, progress, sources[source].get("sparsity"))
        entry["ood"] = ood_entry
        entry["bias_correction"] = None if shift is None else shift.tolist()
        analyzer_report = run_dir / "reports" / f"gpu_analyzer_{variant}.txt"
        analyzer_report.parent.mkdir(parents=True, exist_ok=True)
        analyzer_report.write_text(entry["analyzer"].pop("report"))
        entry["analyzer"]["report"] = str(analyzer_report)
        results["variants"][variant] = entry
    if gpu_check:
        _gpu_check(results, splits, cfg)
    _sizes_against_fp32(results)
    report.write(run_dir / "reports", results)
    failures = [f"{name}: {f}" for name, v in results["variants"].items() for f in v["gate"]["failures"]]
    if failures:
        raise ParityError("parity gate failed:\n  " + "\n  ".join(failures))
    return results


def _keras_ood_quantile(model, detector, x_val) -> float:
    """The validation quantile of the Keras model's own OOD scores (train.ood, in float)."""
    pooled = evaluate.pooled_model(model)
    return ood.threshold(ood.score(detector, pooled.predict(x_val, batch_size=64, verbose=0)))


def _variant_ood_threshold(path: Path, flatbuffer: bytes, card, variant: str, splits: dict,
                           reference_quantile: float, progress: bool) -> dict:
    """The card's OOD threshold scaled by how far this variant's validation scores run from the
    Keras model's (quantisation moves the features: an int8 model's scores run higher), written
    into the variant's card. The card's threshold stays the calibration (training fits it on
    validation, adaptation on the site's images too); the variant only corrects its drift."""
    scores = {split: parity.variant_ood_scores(path, s["x"], desc=f"OOD scores of {variant} ({split})",
                                               progress=progress) for split, s in splits.items()}
    drift = ood.threshold(scores["val"]) / reference_quantile
    threshold = card.thresholds["ood"] * drift
    variant_card = dataclasses.replace(card, thresholds={**card.thresholds, "ood": threshold})
    path.write_bytes(export.with_card(flatbuffer, variant_card, variant))
    return {"threshold": threshold, "run_threshold": card.thresholds.get("ood"), "drift": drift,
            "flagged": {split: float((s > threshold).mean()) for split, s in scores.items()}}


def _prepare(run_dir: Path, cfg: ConvertConfig, progress: bool, data_root: str | Path | None = None):
    """The run, its dataset, and per gated split: model inputs, labels, Keras logits and metrics."""
    model, card, config = load_run(run_dir)
    dataset, _ = run_splits.load(run_dir, data_root)   # the splits training used, lung refusals left out
    if dataset.fingerprint() != card.dataset.get("fingerprint"):
        print("WARNING: the dataset changed since training (fingerprint differs); "
              "parity is measured on the data as it is now")
    splits = {}
    for split in cfg.splits:
        grey, y, _ = evaluate.load_split(dataset.split(split), card.labels, card.input, desc=split, progress=progress)
        x = normalise(grey, card.input)
        logits = model.predict(x, batch_size=64, verbose=0)
        splits[split] = {"x": x, "y": y, "keras_logits": logits, "keras": parity.evaluate(logits, y, card)}
    return model, card, config, dataset, splits


def check_file(run_dir: str | Path, model_path: str | Path, variant: str, *, cfg: ConvertConfig | None = None,
               progress: bool = True, data_root: str | Path | None = None) -> dict:
    """Gate one .tflite file, made by any means, against the run's Keras model (no GPU check)."""
    cfg = cfg or ConvertConfig()
    _, card, _, _, splits = _prepare(Path(run_dir), cfg, progress, data_root)
    return _check_variant(Path(model_path), variant, splits, card, cfg, progress, None)


def _keras_sources(model, variants, cfg, train_records, labels, spec, config, progress):
    """The Keras models the variants are converted from: trained, and where asked for,
    quantisation-aware-trained, pruned, pruned + pruning-preserving QAT. A refusal of QAT for
    this architecture is recorded, not fatal: the other variants still come out."""
    needed = {export.VARIANT_SOURCES[v][0] for v in variants}
    sources, refused = {"trained": {"model": model}}, {}
    if needed <= {"trained"}:
        return sources, refused
    data = compress.FineTuneData(load_images(train_records, spec, desc="train (fine-tune)", progress=progress),
                                 np.array([labels.index(r.label) for r in train_records], np.int32),
                                 spec, config)
    if "qat" in needed:
        try:
            print("quantisation-aware training ...", flush=True)
            sources["qat"] = {"model": compress.qat(model, data, cfg, progress=progress)}
        except compress.QATUnsupported as exc:
            refused["qat"] = str(exc)
            print(f"qat refused: {exc}")
    if needed & {"pruned", "pqat"}:
        print(f"pruning to {cfg.prune_sparsity:.0%} sparsity ...", flush=True)
        pruned = compress.prune(model, data, cfg, progress=progress)
        sources["pruned"] = {"model": pruned, "sparsity": compress.sparsity(pruned)}
        if "pqat" in needed:
            try:
                print("pruning-preserving quantisation-aware training ...", flush=True)
                pq = compress.pqat(pruned, data, cfg, progress=progress)
                sources["pqat"] = {"model": pq, "sparsity": compress.sparsity(pq)}
            except compress.QATUnsupported as exc:
                refused["pruned-qat"] = str(exc)
                print(f"pruned-qat refused: {exc}")
    return sources, refused


def _check_variant(path: Path, variant: str, splits: dict, card, cfg: ConvertConfig, progress: bool,
                   sparsity: dict | None) -> dict:
    data = path.read_bytes()
    entry = {"file": str(path), "bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9)),
             "weight_sparsity": export.weight_sparsity(data), "keras_sparsity": sparsity,
             "analyzer": gpu.analyze(data), "splits": {}}
    budget = cfg.budget(variant)
    for split, d in splits.items():
        logits = parity.variant_logits(path, d["x"], desc=f"evaluating {variant} on {split}", progress=progress)
        metrics = parity.evaluate(logits, d["y"], card)
        entry["splits"][split] = {"metrics": parity.headline(metrics),
                                  **parity.compare(d["keras"], metrics, d["keras_logits"], logits, budget,
                                                   split=split, temperature=card.temperature)}
    entry["gate"] = parity.gate(entry["splits"])
    return entry


def _gpu_check(results: dict, splits: dict, cfg: ConvertConfig) -> None:
    """Every variant on the GPU accelerator against its CPU path, on real images (test split,
    spread over the split); fp16 must run fully accelerated within cfg.gpu_tolerance."""
    x = splits.get("test", next(iter(splits.values())))["x"]
    pick = np.linspace(0, len(x) - 1, min(cfg.gpu_images, len(x))).astype(int)
    paths = {name: v["file"] for name, v in results["variants"].items()}
    print(f"GPU accelerator check of {len(paths)} variants on {len(pick)} images ...", flush=True)
    probe = gpu.probe(list(paths.values()), x[pick])
    results["gpu"] = {"vulkan_driver": probe["vulkan_driver"], "images": int(len(pick)),
                      "tolerance": cfg.gpu_tolerance}
    for name, path in paths.items():
        verdict = probe["models"][path]
        results["variants"][name]["gpu"] = verdict
        if verdict.get("no_adapter"):  # this machine has no GPU: nothing was run, nothing failed
            results["gpu"]["not_checked"] = verdict["why"]
        if name == "fp16":
            diff = verdict.get("max_abs_diff", {}).get("logits")
            if verdict.get("no_adapter") and not gpu_required():
                print(f"GPU accelerator check: not checked: {verdict['why']}")
            elif verdict.get("no_adapter"):
                results["variants"][name]["gate"]["failures"].append(
                    f"gpu: {REQUIRE_GPU_ENV}=1 but this machine has no GPU adapter ({verdict['why']})")
            elif not verdict.get("fully_accelerated"):
                results["variants"][name]["gate"]["failures"].append(
                    f"gpu: not fully accelerated on the GPU accelerator ({verdict})")
            elif diff is None or diff > cfg.gpu_tolerance:
                results["variants"][name]["gate"]["failures"].append(
                    f"gpu: |GPU - CPU| logits {diff:.4f} above the tolerance {cfg.gpu_tolerance}")
            gate = results["variants"][name]["gate"]
            gate["passed"] = not gate["failures"]


def _sizes_against_fp32(results: dict) -> None:
    fp32 = results["variants"].get("fp32")
    for v in results["variants"].values():
        v["size_vs_fp32"] = v["bytes"] / fp32["bytes"] if fp32 else None
        v["gzip_vs_fp32"] = v["gzip_bytes"] / fp32["bytes"] if fp32 else None
        v["gzip_vs_fp32_gzip"] = v["gzip_bytes"] / fp32["gzip_bytes"] if fp32 else None
