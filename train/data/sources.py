"""The data sources of the shared development set, with who is in them.

A source is what `manifest.csv` names in `source_repo`. The figures that decide whether a model
helps at the next hospital are per population, not per split: adult pneumonia recall and adult
normal specificity (`cohort_of`), because the set's children and adults come from different
hospitals and a model can score well overall by telling them apart. Citations: the shared set's
README.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str          # short name, accepted wherever a source is asked for
    repo: str          # the manifest's source_repo
    population: str    # "adult" | "child"
    description: str


SOURCES = (
    Source("kermany", "lecuong1502/BTL_Machine_Learning", "child",
           "Kermany et al., Cell 2018: Guangzhou Women and Children's Medical Center, ages 1-5"),
    Source("ieee8023", "s-mostafa-a/covid-chestxray-dataset", "adult",
           "Cohen et al., arXiv:2006.11988: COVID-19 image data collection, many hospitals"),
    Source("rsna-normal", "rtchanon/Machine-Learning-for-COVID-19-detection-from-chest-X-RAYS", "adult",
           "RSNA Pneumonia Detection Challenge 'Normal' (NIH Clinical Center), Shih et al. 2019"),
    Source("rsna-pneumonia", "jas127/PS_Covid19", "adult",
           "RSNA 'Lung Opacity' (NIH Clinical Center) via COVID-QU-Ex, Tahir et al. 2021"),
)
_BY_KEY = {key: s for s in SOURCES for key in (s.name, s.repo)}


def resolve(name: str) -> str:
    """The manifest's source_repo for a short name or a repo; other names are returned as they are
    (a user's own dataset names its sources freely)."""
    return _BY_KEY[name].repo if name in _BY_KEY else name


def short_name(source: str | None) -> str:
    return _BY_KEY[source].name if source in _BY_KEY else (source or "unknown")


def population_of(source: str | None) -> str:
    """"adult" or "child" for a known source; the source itself (or "unknown") for another."""
    known = _BY_KEY.get(source or "")
    return known.population if known else (source or "unknown")


def cohort_of(source: str | None, label: str) -> str | None:
    """'adult pneumonia', 'child normal', ... for a known source; None for an unknown one."""
    known = _BY_KEY.get(source or "")
    return f"{known.population} {label}" if known else None
