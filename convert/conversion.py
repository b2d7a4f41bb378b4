"""Convert a training run: every variant exported with its card and heat map, checked for the
GPU delegate (statically and on the GPU accelerator), and gated on parity over val and test."""
from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np

import train  # noqa: F401
import tf_keras as keras

from convert import bias_correction, compress, empirical_bias, equalisation, export, gpu, parity, report
from benchmarks.gates import GATES_FILE, load_gates
from convert.config import ConvertConfig
from edge_app.classifier import load_model_file
from edge_app.errors import ModelError
from edge_app.graph_names import POOL
from edge_app.runtime import REQUIRE_GPU_ENV, gpu_required
from train import evaluate, models, ood
from train.data import run_splits
from train.pipeline import image_weights, load_images, model_inputs
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


def representative_inputs(train_records, card, cfg: ConvertConfig, progress: bool = True) -> np.ndarray:
    """The int8 calibration images: a class-balanced sample of the training split, as model inputs."""
    return model_inputs(load_images(balanced_sample(train_records, card.labels, cfg.representative_per_class, cfg.seed),
                                    card.input, desc="representative", progress=progress), card.input)


def convert_run(run_dir: str | Path, *, variants=None, cfg: ConvertConfig | None = None,
                gates_file: str | Path = GATES_FILE, progress: bool = True, gpu_check: bool = True,
                data_root: str | Path | None = None) -> dict:
    """Every variant in one straight line: convert -> run on val and test -> OOD threshold ->
    write the file once -> gate on parity. Each step's figures go into reports/conversion.json."""
    run_dir = Path(run_dir)
    cfg = cfg or ConvertConfig()
    variants = tuple(variants or default_variants(cfg))
    if any(v.startswith("pruned") for v in variants) and not cfg.prune_sparsity:
        raise ValueError(f"pruned variants need a target sparsity: pass --prune 0.5 (asked for {variants})")
    gates = load_gates(gates_file)
    budgets = {v: parity.budgets_of(gates, v) for v in variants}   # a missing budget fails before any work
    model, card, config, dataset, splits = _prepare(run_dir, cfg, progress, data_root)
    labels = card.labels
    train_records = dataset.split("train")
    representative = representative_inputs(train_records, card, cfg, progress)
    detector = ood.OodModel.load(run_dir / "ood.npz") if (run_dir / "ood.npz").is_file() else None
    sources, refused = _keras_sources(model, card, detector, variants, cfg, train_records, splits, config, progress)
    out_dir = run_dir / "tflite"
    out_dir.mkdir(exist_ok=True)
    for stale in sorted(p for p in out_dir.glob("*.tflite") if p.stem not in variants):
        print(f"removing {stale}: not a variant of this conversion (the benchmarks take every file here)")
        stale.unlink()
    results = {"run": str(run_dir), "model": card.name, "labels": list(labels),
               "config": dataclasses.asdict(cfg), "gates_file": str(gates_file),
               "keras": {s: d["keras"] for s, d in splits.items()},
               "calibration": {name: s["calibration"] for name, s in sources.items() if "calibration" in s},
               "variants": {}, "refused": refused}
    unrunnable = []
    for variant in variants:
        source_name, recipe = export.VARIANT_SOURCES[variant]
        if source_name not in sources:
            continue
        source = sources[source_name]
        print(f"converting {variant} ...", flush=True)
        keras_model = source["model"]
        # bias correction for int8 and fp16 from the trained or pruned model: int8-mixed computes the layers with
        # most of the rounding bias in float (measured: corrected, it agrees less); QAT models learnt their rounding.
        post_training = recipe == "int8" and source_name in ("trained", "pruned")
        to_correct = recipe in bias_correction.PRECISIONS and source_name in ("trained", "pruned")
        if post_training and cfg.equalise is not None:
            if "equalised" not in source:
                source["equalised"], streams = equalisation.equalised(keras_model, representative, cfg.equalise)
                results.setdefault("equalisation", {})[source_name] = streams
            keras_model = source["equalised"]
        reference = keras_model   # what a post-training int8 file's activations are measured against
        if to_correct and cfg.bias_correction:
            key = f"bias_corrected_{recipe}"
            if key not in source:
                source[key] = bias_correction.corrected(keras_model, representative, recipe)
            keras_model = source[key]
        flatbuffer = export.convert(export.device_model(keras_model, source["detector"]), recipe, representative,
                                    int8_io=cfg.int8_io, progress=progress,
                                    linear_percentile=cfg.linear_percentile if post_training else None)
        empirical = None
        if post_training and cfg.empirical_bias_correction:
            float_file = export.convert(export.device_model(reference, source["detector"]), "fp32")
            flatbuffer, empirical = empirical_bias.corrected(flatbuffer, float_file, representative, progress=progress)
        try:
            outputs = {split: parity.run_variant(flatbuffer, d["x"], desc=f"{variant} on {split}", progress=progress)
                       for split, d in splits.items()}
        except ModelError as exc:    # converted, but LiteRT cannot run it: nothing a device could use
            results["refused"][variant] = f"does not run on LiteRT's CPU, not written: {exc}"
            unrunnable.append(variant)
            (out_dir / f"{variant}.tflite").unlink(missing_ok=True)   # an earlier conversion's file
            print(f"{variant} refused: {results['refused'][variant]}", flush=True)
            continue
        variant_card, ood_entry = source["card"], None
        if source["detector"] is not None:
            variant_card, ood_entry = _variant_ood_threshold(source, {s: o["ood"] for s, o in outputs.items()})
        path = out_dir / f"{variant}.tflite"
        data = export.with_card(flatbuffer, variant_card, variant)
        path.write_bytes(data)
        entry = _check_variant(data, path, variant, splits, {s: o["logits"] for s, o in outputs.items()},
                               card, variant_card, budgets[variant], cfg, source.get("sparsity"))
        entry["ood"] = ood_entry
        if empirical is not None:
            entry["empirical_bias_correction"] = empirical
        entry["card"] = {"temperature": variant_card.temperature, "thresholds": variant_card.thresholds,
                         "calibrated_on": "keras" if source_name == "trained" else source_name}
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
    failures += [f"{name}: {results['refused'][name]}" for name in unrunnable]
    if failures:
        raise ParityError("parity gate failed:\n  " + "\n  ".join(failures))
    return results


def _pooled(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The pooled penultimate features (train.ood's input) of model inputs, in chunks; also of a
    tfmot-quantised model, whose layers are wrapped (train.models.head_layer)."""
    pooled = keras.Model(model.input, models.head_layer(model, POOL).output)
    return np.concatenate([pooled.predict(x[i:i + batch], batch_size=64, verbose=0) for i in range(0, len(x), batch)])


def _variant_ood_threshold(source: dict, scores: dict) -> tuple:
    """The source card's OOD threshold scaled by how far this variant's validation scores run
    from its Keras model's (quantisation moves the features: an int8 model's scores run
    higher). The card's threshold stays the calibration (training fits it on validation,
    adaptation on the site's images too); the variant only corrects its drift."""
    card = source["card"]
    drift = ood.threshold(scores["val"]) / source["ood_quantile"]
    threshold = card.thresholds["ood"] * drift
    variant_card = dataclasses.replace(card, thresholds={**card.thresholds, "ood": threshold})
    return variant_card, {"threshold": threshold, "run_threshold": card.thresholds.get("ood"), "drift": drift,
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
        grey, y, records = evaluate.load_split(dataset.split(split), card.labels, card.input, desc=split,
                                               progress=progress)
        x = model_inputs(grey, card.input)
        logits = model.predict(x, batch_size=64, verbose=0)
        splits[split] = {"x": x, "y": y, "keras_logits": logits, "files": [r.path.name for r in records],
                         "records": records,
                         "keras": parity.headline(parity.evaluate(logits, y, card))}
    return model, card, config, dataset, splits


def check_file(run_dir: str | Path, model_path: str | Path, variant: str, *, cfg: ConvertConfig | None = None,
               gates_file: str | Path = GATES_FILE, progress: bool = True,
               data_root: str | Path | None = None) -> dict:
    """Gate one .tflite file, made by any means, against the run's Keras model (no GPU check),
    at the calibration its own card carries."""
    cfg = cfg or ConvertConfig()
    budget = parity.budgets_of(load_gates(gates_file), variant)
    _, card, _, _, splits = _prepare(Path(run_dir), cfg, progress, data_root)
    data, variant_card = load_model_file(model_path)
    logits = {split: parity.run_variant(data, d["x"], desc=f"{variant} on {split}", progress=progress)["logits"]
              for split, d in splits.items()}
    return _check_variant(data, Path(model_path), variant, splits, logits, card, variant_card, budget, cfg, None)


def _keras_sources(model, card, detector, variants, cfg, train_records, splits, config, progress):
    """The Keras models the variants are converted from, each with the card and OOD detector it
    ships with: trained (the run's own), and where asked for, quantisation-aware-trained,
    pruned, pruned + pruning-preserving QAT, each refitted on val (`_refit`). A refusal of QAT
    for this architecture is recorded, not fatal: the other variants still come out."""
    needed = {export.VARIANT_SOURCES[v][0] for v in variants}
    quantile = ood.threshold(ood.score(detector, _pooled(model, splits["val"]["x"]))) if detector else None
    sources = {"trained": {"model": model, "card": card, "detector": detector, "ood_quantile": quantile}}
    refused = {}
    if needed <= {"trained"}:
        return sources, refused
    labels, spec = card.labels, card.input
    data = compress.FineTuneData(load_images(train_records, spec, desc="train (fine-tune)", progress=progress),
                                 np.array([labels.index(r.label) for r in train_records], np.int32),
                                 spec, config,
                                 image_weights(train_records, labels, class_power=config.class_weight_power,
                                               source_power=config.source_weight_power))
    refit = lambda m: _refit(m, card, detector is not None, data, splits, config)
    if "qat" in needed:
        try:
            print("quantisation-aware training ...", flush=True)
            sources["qat"] = refit(compress.qat(model, data, cfg, progress=progress))
        except compress.QATUnsupported as exc:
            refused["qat"] = str(exc)
            print(f"qat refused: {exc}")
    if needed & {"pruned", "pqat"}:
        print(f"pruning to {cfg.prune_sparsity:.0%} sparsity ...", flush=True)
        pruned = compress.prune(model, data, cfg, progress=progress)
        sources["pruned"] = {**refit(pruned), "sparsity": compress.sparsity(pruned)}
        if "pqat" in needed:
            try:
                print("pruning-preserving quantisation-aware training ...", flush=True)
                pq = compress.pqat(pruned, data, cfg, progress=progress)
                sources["pqat"] = {**refit(pq), "sparsity": compress.sparsity(pq)}
            except compress.QATUnsupported as exc:
                refused["pruned-qat"] = str(exc)
                print(f"pruned-qat refused: {exc}")
    return sources, refused


def _refit(model, card, with_ood: bool, data: compress.FineTuneData, splits: dict, config) -> dict:
    """A fine-tuned model's own calibration, fitted as training fits the Keras model's: the class
    offsets (when the run's config corrects class priors), the temperature and operating threshold
    on val (train.evaluate), the OOD detector on the training split's features and its threshold on
    val (train.ood). Fine-tuning moved the weights, so the trained model's figures no longer
    describe this model."""
    val = splits["val"]
    logits = {"val": model.predict(val["x"], batch_size=64, verbose=0)}
    offsets = evaluate.correct_class_priors(model, logits, val["y"], enabled=config.class_prior_correction)
    temperature, threshold = evaluate.calibrate(logits["val"], val["y"], val["records"], config.target_sensitivity,
                                                config.threshold_rule)
    thresholds = {**card.thresholds, "abnormal": threshold}
    detector = quantile = None
    if with_ood:
        chunks = range(0, len(data.images), 256)
        detector = ood.fit(np.concatenate([_pooled(model, model_inputs(data.images[i:i + 256], data.spec))
                                           for i in chunks]))
        quantile = thresholds["ood"] = ood.threshold(ood.score(detector, _pooled(model, val["x"])))
    calibration = {"class_offsets": dict(zip(card.labels, offsets.tolist())),
                   "temperature": {"trained": card.temperature, "refitted": temperature},
                   "abnormal_threshold": {"trained": card.abnormal_threshold, "refitted": threshold},
                   "ood_threshold": {"trained": card.thresholds.get("ood"), "refitted": quantile}}
    return {"model": model, "card": dataclasses.replace(card, temperature=temperature, thresholds=thresholds),
            "detector": detector, "ood_quantile": quantile, "calibration": calibration}


def _check_variant(data: bytes, path: Path, variant: str, splits: dict, logits: dict, keras_card, variant_card,
                   budget: dict, cfg: ConvertConfig, sparsity: dict | None) -> dict:
    entry = {"file": str(path), "bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9)),
             "weight_sparsity": export.weight_sparsity(data), "keras_sparsity": sparsity,
             "analyzer": gpu.analyze(data), "splits": {}}
    for split, d in splits.items():
        metrics = parity.headline(parity.evaluate(logits[split], d["y"], variant_card))
        drops = {k: 100.0 * (d["keras"][k] - metrics[k]) for k in parity.DROP_METRICS if d["keras"][k] is not None}
        entry["splits"][split] = {"metrics": metrics, "drops_points": drops,
                                  **parity.compare(d["y"], keras_card.labels, d["keras_logits"], keras_card,
                                                   logits[split], variant_card, budget, split=split,
                                                   resamples=cfg.bootstrap, seed=cfg.seed)}
        for flip in entry["splits"][split]["flips"]:
            flip["file"] = d["files"][flip["index"]]
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
