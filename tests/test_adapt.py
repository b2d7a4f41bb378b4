"""Site adaptation (`python -m train adapt`) on a tiny run and a 'site' of other real X-rays."""
import json
from pathlib import Path

import pytest

from conftest import copy_subset, run_module


@pytest.fixture(scope="module")
def site(tmp_path_factory, shared_data, tiny_dataset) -> Path:
    """Real X-rays the tiny run never saw (not in tiny_dataset), split/class layout."""
    seen = {p.name for p in tiny_dataset.rglob("*") if p.is_file()}
    return copy_subset(shared_data, tmp_path_factory.mktemp("site"), {"train": 6, "val": 3, "test": 4}, seen)


@pytest.fixture(scope="module")
def curve(tmp_path_factory, tiny_run, site) -> Path:
    out = tmp_path_factory.mktemp("adapted") / "tiny-site"
    run_module("train", "adapt", "--run", tiny_run, "--data", site, "--out", out,
               "--per-class", "2", "4", "--epochs", "2", "--no-progress")
    return out


def test_adapted_run_records_what_it_was_fitted_on_and_refits_the_card(curve, tiny_run):
    run = curve / "n4"
    for name in ("model.keras", "model_card.json", "config.json", "ood.npz", "reports/adapt.json", "reports/adapt.md"):
        assert (run / name).is_file(), name
    card, result = json.loads((run / "model_card.json").read_text()), json.loads((run / "reports/adapt.json").read_text())
    original = json.loads((tiny_run / "model_card.json").read_text())
    counts = card["dataset"]["adapted"]["counts"]
    assert counts["local_fit"] == {"normal": 4, "pneumonia": 4, "covid": 4}        # --per-class 4 of 6
    assert counts["replayed"] == counts["local_fit"]                               # replay 1 per local image
    assert counts["calibration_local"] == {"normal": 3, "pneumonia": 3, "covid": 3}
    assert counts["local_refused_by_lung_step"] == 0                               # the tiny run does not crop
    assert json.loads((run / "reports/lung_refusals.json").read_text()) == []
    assert (run / card["dataset"]["adapted"]["from"]).resolve() == tiny_run.resolve()     # relative: cards ship
    assert (run / card["dataset"]["root"]).resolve() == (tiny_run / original["dataset"]["root"]).resolve()
    assert card["temperature"] == result["after"]["temperature"]
    # the class offsets were refitted on the calibration images, as training fits them on val
    assert list(result["after"]["class_offsets"]) == card["labels"] and result["after"]["class_offsets"]["normal"] == 0
    assert card["thresholds"]["abnormal"] == result["after"]["threshold"]
    assert card["thresholds"]["ood"] == result["after"]["ood_threshold"]
    assert card["labels"] == original["labels"] and card["input"] == original["input"]
    # "before" is the run as trained: on the run's own test split it scores what training reported
    trained = json.loads((tiny_run / "reports/metrics.json").read_text())["test"]
    assert result["before"]["run_test"]["macro_f1"] == pytest.approx(trained["macro_f1"], abs=1e-6)
    assert result["before"]["temperature"] == original["temperature"]
    assert "| macro-F1 |" in (run / "reports/adapt.md").read_text()
    for when in ("before", "after"):
        assert set(result[when]["ood_flagged"]) == {"local_test", "run_test"}
        assert all(0 <= share <= 1 for share in result[when]["ood_flagged"].values())


def test_learning_curve_has_a_point_per_size_and_a_plot(curve):
    data = json.loads((curve / "reports/adaptation_curve.json").read_text())
    assert [p["per_class"] for p in data["points"]] == [2, 4]
    n2 = json.loads((curve / "n2/model_card.json").read_text())["dataset"]["adapted"]["counts"]["local_fit"]
    assert n2 == {"normal": 2, "pneumonia": 2, "covid": 2}
    assert (curve / "reports/adaptation_curve.png").stat().st_size > 10_000
    assert "| 0 (before) |" in (curve / "reports/adaptation_curve.md").read_text()


def test_adapted_model_goes_through_conversion_and_the_device(curve, site, loose_gates):
    run = curve / "n4"
    stale = run / "tflite" / "int8.tflite"          # left by an earlier conversion with more variants
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"old")
    run_module("convert", run, "--variants", "fp32", "--gates", loose_gates, "--no-gpu", "--no-progress")
    assert sorted(p.name for p in (run / "tflite").iterdir()) == ["fp32.tflite"]   # benchmarks take every file
    model = run / "tflite" / "fp32.tflite"
    info = json.loads(run_module("edge_app", "info", "--model", model, "--accelerator", "cpu").stdout)
    card = json.loads((run / "model_card.json").read_text())
    assert info["card"]["thresholds"]["abnormal"] == pytest.approx(card["thresholds"]["abnormal"])
    image = next((site / "test" / "covid").iterdir())
    out = json.loads(run_module("edge_app", "predict", image, "--model", model, "--accelerator", "cpu",
                                "--json").stdout)["results"][0]
    assert out["threshold"] == pytest.approx(card["thresholds"]["abnormal"])
    assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_adapt_refuses_to_overwrite_its_run(tiny_run, site):
    result = run_module("train", "adapt", "--run", tiny_run, "--data", site, "--out", tiny_run,
                        "--no-progress", check=False)
    assert result.returncode != 0 and "never overwrites the run" in result.stderr


def test_local_sources_by_short_name_or_repo(shared_data):
    """--source takes the short names --holdout-source takes (rsna-normal, ...), or the manifest's repo."""
    from train.adapt import _local_dataset
    from train.config import AdaptConfig
    from train.data import sources

    by_name = _local_dataset(shared_data, "3class", AdaptConfig(sources=["rsna-normal", "ieee8023"]), False)
    by_repo = _local_dataset(shared_data, "3class", AdaptConfig(sources=[sources.resolve("rsna-normal"),
                                                                         sources.resolve("ieee8023")]), False)
    assert {r.path for r in by_name.records} == {r.path for r in by_repo.records}
    assert {sources.short_name(r.source) for r in by_name.records} == {"rsna-normal", "ieee8023"}
    with pytest.raises(ValueError, match="no source"):
        _local_dataset(shared_data, "3class", AdaptConfig(sources=["no-such-source"]), False)


def test_replay_fills_the_classes_a_site_has_no_images_of():
    """A site that labelled only its normal films: the run's own films of the other classes join the
    fine-tune as many as the site has per class, so the head does not learn that everything is normal."""
    import numpy as np

    from train.adapt import _replay
    from train.data.records import Record

    def records(label, n, split="train"):
        return [Record(path=Path(f"{label}{i}.png"), label=label, split=split, patient_id=None, source=None)
                for i in range(n)]

    labels = ("normal", "pneumonia", "covid")
    pool = records("normal", 30) + records("pneumonia", 30) + records("covid", 30)
    normals_only = _replay(records("normal", 8), pool, 1, labels, np.random.default_rng(0))
    assert {label: sum(r.label == label for r in normals_only) for label in labels} == {
        "normal": 8, "pneumonia": 8, "covid": 8}
    mixed = _replay(records("normal", 4) + records("covid", 2), pool, 2, labels, np.random.default_rng(0))
    assert {label: sum(r.label == label for r in mixed) for label in labels} == {
        "normal": 8, "pneumonia": 6, "covid": 4}
    assert len({r.path for r in mixed}) == len(mixed)                          # none repeated


def test_site_detail_threshold_is_the_sites_own_only_where_its_films_are_softer():
    """As commissioning sets it: the site's 1st percentile of detail, from at least 100 films, never
    above the card's; fewer films, or sharper ones: the card's stands."""
    import numpy as np

    from edge_app import preprocess
    from train.adapt import _site_detail

    films = np.random.default_rng(0).integers(0, 256, (120, 32, 32), dtype=np.uint8)
    site = float(np.quantile([preprocess.detail(f) for f in films], 0.01))
    assert _site_detail(site + 0.1, films) == {"detail": site}   # softer than the card allows: their own
    assert _site_detail(site - 0.1, films) == {}            # the card's threshold already lets them through
    assert _site_detail(site + 0.1, films[:50]) == {}       # too few films to place a 1st percentile
    assert _site_detail(None, films) == {}                  # a card without the warning stays without it
