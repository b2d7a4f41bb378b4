"""report.md of a benchmark results JSON: one table per concern, read top to bottom."""
from __future__ import annotations

from benchmarks import accelerators
from benchmarks.gates import latency


def _share(rate: dict) -> str:
    if rate.get("value") is None:
        return "—"
    return f"{rate['value']:.3f} [{rate['ci95'][0]:.3f}–{rate['ci95'][1]:.3f}] ({rate['k']}/{rate['n']})"


def _ms(x):
    return "–" if x is None else f"{x:.2f}"


def _f(x):
    return "–" if x is None else f"{x:.4f}"


def _clinic(results: dict, plot_name: str | None) -> list[str]:
    """The full-size clinic files: what they are, per-stage latency beside the library decode,
    peak RSS on the largest, the cold starts, and whether a GPU was there."""
    c = results.get("clinic") or {}
    gpu = results["runtimes"].get("litert-gpu", {})
    lines = ["", f"## Full-size clinic files ({c.get('runtime')}, {c.get('threads')} threads)", "",
             "GPU: " + (gpu.get("label", "") if gpu.get("available") else f"not available ({gpu.get('reason')})"),
             "", "Files made by benchmarks/clinic_files.py from the run's test images (seed 0), beside a "
             "development-set image (not gated). Stages are medians over `Classifier.predict` calls; the library "
             "decode (Pillow open + load, pydicom dcmread().pixel_array) of the same file is alternated with them "
             "call by call, and each ratio is the median of the per-call ratios.", "",
             "| kind | what | pixels | MiB |", "|---|---|---|---|"]
    for kind, f in c.get("files", {}).items():
        lines.append(f"| {kind} | {f['what']} | {f['width']}x{f['height']} | {f['bytes'] / 2**20:.1f} |")
    lines += ["", "Preprocess: border trim, the lung field's geometry and crop, fit, contrast, normalise; lungs: the "
              "lung segmenter's inference (its own gate, `[lungs]`).", "",
              "| variant | kind | library decode ms | decode ms | preprocess ms | lungs ms | inference ms | total ms "
              "| decode / library | preprocess / inference | total / (library + inference) |",
              "|---" * 11 + "|"]
    for variant, kinds in c.get("stages", {}).items():
        for kind, m in kinds.items():
            st = m["stages_ms"]
            lines.append(f"| {variant} | {kind} | {_ms(m['library_decode_ms'])} | {_ms(st['decode'])} "
                         f"| {_ms(st['preprocess'])} | {_ms(st.get('lungs'))} | {_ms(st['inference'])} "
                         f"| {_ms(st['total'])} | {_ms(m['decode_vs_library'])} | {_ms(m['preprocess_vs_inference'])} "
                         f"| {_ms(m['pipeline_vs_library_and_inference'])} |")
    if plot_name:
        lines += ["", f"![Per-stage latency per file kind]({plot_name})"]
    lines += ["", "| variant | file | peak RSS MiB | before loading MiB |", "|---|---|---|---|"]
    for variant, m in c.get("memory", {}).items():
        lines.append(f"| {variant} | {m['kind']} | {_ms(m['peak_rss_mib'])} | {_ms(m['rss_before_load_mib'])} |")
    lines += ["", "Cold start (fresh processes, median after one warm-up run): `predict` from launch to its printed "
              "result; the app (`--screen-and-exit`, X server already running) from launch to its first result drawn.",
              "", "| what | variant | median s | runs s | imports ms | slowest imports (ms) |", "|---|---|---|---|---|---|"]
    for what, m in c.get("cold_start", {}).items():
        if not m["available"]:
            lines.append(f"| {what} | | not measured: {m.get('reason')} | | | |")
            continue
        slow = ", ".join(f"{i['module']} {i['ms']:.0f}" for i in m["slowest_imports"][:4])
        lines.append(f"| {what} | {m['variant']} | {m['median_s']:.3f} | {' '.join(f'{x:.2f}' for x in m['samples_s'])} "
                     f"| {m['imports_ms']:.0f} | {slow} |")
    return lines


def markdown(results: dict, plot_name: str, clinic_plot: str | None = None) -> str:
    threads = results["settings"]["threads"]
    ref = results["settings"]["reference_runtime"]
    m = results["machine"]
    lines = [f"# Benchmark: {results['run']} ({results['model']['name']}, {results['model']['input_size']} px)", "",
             f"{results['created']} on {m['hostname']} ({m['platform']}, {m['cpu_count']} CPUs, load average "
             f"{' '.join(f'{x:.1f}' for x in m['load_average'])} at the end), ai-edge-litert {m['ai_edge_litert']}. "
             f"Test split: {results['test_split'].get('n')} images"
             f"{'' if results['test_split'].get('fingerprint_matches', True) else ' (CHANGED since training)'}.",
             "", "Latencies are medians of pytest-benchmark rounds in ms (IQR in the JSON); on a machine shared "
             "with other jobs they are noisy, the ratios between variants of one run much less so. "
             f"Raw = one inference call on a preprocessed test image; pipeline = decode + preprocess + inference + "
             f"post-process of real test files. Columns by thread count are {ref} "
             f"({results['runtimes'][ref]['label']}); the Keras row is TensorFlow in its own process.", "",
             "| variant | size KiB | gzip KiB | load ms | peak RSS MiB | "
             + " | ".join(f"raw {t}t" for t in threads) + " | " + " | ".join(f"pipeline {t}t" for t in threads)
             + " | accuracy | macro-F1 | abnormal sens. | abnormal spec. | COVID-19 sens. |",
             "|---" * (10 + 2 * len(threads)) + "|"]
    for name, v in results["variants"].items():
        runtime = ref if v["kind"] == "tflite" else "keras"
        mt = v["metrics"] or {}
        lines.append(
            f"| {name} | {v['bytes'] / 1024:.0f} | {v['gzip_bytes'] / 1024:.0f} | {_ms((v['load_ms'] or {}).get('median_ms'))} "
            f"| {_ms((v['memory'] or {}).get('peak_rss_mib'))} | "
            + " | ".join(_ms(latency(v, 'raw', t, runtime)) for t in threads) + " | "
            + " | ".join(_ms(latency(v, 'pipeline', t, runtime)) for t in threads)
            + f" | {_f(mt.get('accuracy'))} | {_f(mt.get('macro_f1'))} | {_f(mt.get('abnormal_sensitivity'))} "
              f"| {_f(mt.get('abnormal_specificity'))} | {_f(mt.get('covid_sensitivity'))} |")
    lines += ["", f"![Pareto plot]({plot_name})", "", "## Runtimes", "",
              "| runtime | what | available |", "|---|---|---|"]
    for name, r in results["runtimes"].items():
        lines.append(f"| {name} | {r['label']} | {'yes' if r['available'] else 'no: ' + r['reason']} |")
    lines += ["", "| variant | runtime | threads | raw ms | pipeline ms |", "|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        seen = sorted({(r["runtime"], r["threads"] or 0) for r in v["latency"] if r["runtime"] != ref})
        for runtime, t in seen:
            lines.append(f"| {name} | {runtime} | {t or '–'} | {_ms(latency(v, 'raw', t or None, runtime))} "
                         f"| {_ms(latency(v, 'pipeline', t or None, runtime))} |")
        for u in v["unavailable"]:
            lines.append(f"| {name} | {u['runtime']} | | unavailable: {u['reason'][:160]} | |")
    if results.get("accelerators_elsewhere"):
        lines += ["", "## LiteRT's GPU accelerator on other machines", "",
                  "Measured there by `python -m benchmarks.accelerators` (files reports/accelerators-*.json beside "
                  "the run), not on this machine.", ""]
        lines += [accelerators.markdown(r) for r in results["accelerators_elsewhere"]]
    r = results["ratios"]
    lines += ["", f"## Ratios ({ref}, {r['threads']} threads)", "",
              "Pipeline / inference: the median over pipeline calls of each call's total over its own inference "
              "time; speed-up: fp32 and the variant alternated call by call. Both halves of each ratio see the "
              "same machine load.", "",
              "| variant | decode ms | preprocess ms | lungs ms | inference ms | post-process ms "
              "| pipeline / inference | speed-up vs fp32 | macro-F1 drop vs Keras (points) |", "|---" * 9 + "|"]
    for name, overhead in r["pipeline_overhead"].items():
        row = next((x for x in results["variants"][name]["latency"] if (x["runtime"], x["threads"], x["stage"])
                    == (ref, r["threads"], "pipeline")), {})
        st = row.get("stages_ms", {})
        drop = r["drop_vs_keras_points"].get(name, {}).get("macro_f1")
        lines.append(f"| {name} | {_ms(st.get('decode'))} | {_ms(st.get('preprocess'))} | {_ms(st.get('lungs'))} "
                     f"| {_ms(st.get('inference'))} "
                     f"| {_ms(st.get('postprocess'))} | {_ms(overhead)} | {_ms(r['speedup_vs_fp32'].get(name))} "
                     f"| {_ms(drop)} |")
    steps = {n: m for n, m in (results.get("lung_step") or {}).items() if m}
    if steps:
        lines += ["", f"## The lung step ({ref}, {r['threads']} threads)", "",
                  "The segmenter embedded in each variant, and the whole lung step (its input, inference, the lung "
                  "field, the crop), each alternated call by call with the variant's inference on a real test image.",
                  "", "| variant | segmenter KiB | segmenter input px | segmenter ms | inference ms | segmenter / inference "
                  "| lung step ms | lung step / inference |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {n} | {m['segmenter_bytes'] / 1024:.0f} | {m['segmenter_input_size']} | {_ms(m['segmenter_ms'])} "
                  f"| {_ms(m['inference_ms'])} | {_ms(m['segmenter_vs_inference'])} | {_ms(m['step_ms'])} "
                  f"| {_ms(m['step_vs_inference'])} |" for n, m in steps.items()]
    robust = results.get("robustness") or {}
    if robust:
        lines += ["", "## Robustness to acquisition", "",
                  "The test films re-acquired (blurred, sharpened, noisy, darker, brighter, JPEG, half resolution, "
                  "tilted, a negative, on its side, upside down, a full-size export) and classified from the files "
                  "(benchmarks/robustness.py; every acquisition in reports/robustness.md): the acquisition that "
                  "silently clears the largest share of the abnormal films referred as stored (\"no abnormality\", "
                  "no warning), and the one that needlessly refers the largest share of the normal films not "
                  "referred as stored.", "",
                  "| variant | silently cleared [95 % CI] | by | needlessly referred [95 % CI] | by |",
                  "|---|---|---|---|---|"]
        for name, m in robust.items():
            cells = [f"{_share(m[f])} | {m[f]['acquisition'] or '—'}"
                     for f in ("silently_cleared", "needlessly_referred")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Out-of-distribution warning", "",
              "Share of in-distribution test images the device withholds a label from (false alarms), and of "
              "generated non-radiographs it catches (benchmarks/nonradiographs.py): the warning, or a refusal to "
              "screen the image at all (a lung-cropping model's \"no chest found\"), whose share is in brackets.", "",
              "| variant | carries the warning | test flagged (refused) | non-radiographs flagged (refused) |",
              "|---|---|---|---|"]
    for name, v in results["variants"].items():
        ood = v.get("ood")
        if ood is not None:
            lines.append(f"| {name} | {'yes' if ood['carried'] else 'no'} | {_f(ood.get('test_flagged'))} "
                         f"({_f(ood.get('test_refused'))}) | {_f(ood.get('nonradiograph_flagged'))} "
                         f"({_f(ood.get('nonradiograph_refused'))}) |")
    if (results.get("clinic") or {}).get("files"):
        lines += _clinic(results, clinic_plot)
    lines += ["",
              f"## Release gates ({results['gates']['file']}{', device ' + results['device'] if results['device'] else ''})",
              "", "| gate | variant | measured | limit | result |", "|---|---|---|---|---|"]
    for g in results["gates"]["rows"]:
        measured = "–" if g["measured"] is None else f"{g['measured']:.4g} {g['unit']}"
        lines.append(f"| {g['gate']} | {g['variant'] or ''} | {measured} | {g['op']} {g['limit']:.4g} {g['unit']} "
                     f"| {'pass' if g['passed'] else '**FAIL**'}{' (' + g['note'] + ')' if g['note'] else ''} |")
    failed = results["gates"]["failed"]
    lines += ["", f"**{len(failed)} gate(s) failed**: {', '.join(failed)}" if failed else "All gates passed."]
    if "compare" in results:
        c = results["compare"]
        lines += ["", f"## Compared with {c['against']}", ""]
        lines += [f"- REGRESSION {x}" for x in c["regressions"]] or ["No regression beyond noise."]
    return "\n".join(lines) + "\n"
