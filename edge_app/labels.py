"""Raw labels onto the three canonical classes: training's ingestion and the device's on-site
validation (`python -m edge_app validate`) read class names the same way.

Every source spells its classes its own way ("PNEUMONIA", "Pnemonia", "bacteria",
"Pneumonia/Viral/COVID-19", "COVID-19, ARDS", "No Finding", ...). SYNONYMS and EXCLUDED
below are the one place that says what each spelling means; matching ignores case,
spaces and punctuation. A label in neither raises, so that a new source is looked at
rather than silently mislabelled.

Hierarchical (`/`) and combined (`,` `;`) labels not listed whole are read part by part,
and the most severe class named wins: covid over pneumonia over normal
("Pneumonia/Viral/COVID-19" is covid, "Pneumonia/Bacterial/Streptococcus" is pneumonia).
A normal part never outweighs an excluded one ("No Finding, Tuberculosis" is excluded).
"""
from __future__ import annotations

import re

# `normal` always comes first: the device reads "abnormal" as 1 - p(normal).
TASKS = {"3class": ("normal", "pneumonia", "covid"),
         "pneumonia": ("normal", "pneumonia"),
         "covid": ("normal", "covid")}
CLASSES = TASKS["3class"]

SYNONYMS = {
    "normal": ("normal", "No Finding"),
    "covid": ("covid", "COVID-19", "SARS-CoV-2"),
    "pneumonia": (
        "pneumonia", "Pnemonia",  # sic: the CoronaHack metadata
        "bacteria", "bacterial", "Bacterial Pneumonia", "virus", "viral", "Viral Pneumonia",
        "fungal", "Aspiration", "Aspiration Pneumonia", "Lipoid",
        # organisms and named pneumonias (the ieee8023 findings)
        "Streptococcus", "Klebsiella", "Legionella", "Chlamydophila", "E.Coli", "Mycoplasma",
        "Mycoplasma Bacterial Pneumonia", "Staphylococcus", "MRSA", "Nocardia",
        "SARS", "MERS", "MERS-CoV", "Influenza", "Influenza (H1N1)", "Varicella", "Herpes",
        "Herpes Pneumonia", "Pneumocystis", "Aspergillosis", "Histoplasmosis",
    ),
}

# Known labels that belong to no task: their images are dropped and counted.
EXCLUDED = ("Tuberculosis", "ARDS", "Lung Opacity", "todo", "Unknown")


def _key(label: str) -> str:
    return re.sub(r"[^0-9a-z]", "", label.casefold())


def _index() -> dict[str, str | None]:
    """Spelling key -> class (None for excluded), refusing a spelling listed twice."""
    entries = [(name, cls) for cls, names in SYNONYMS.items() for name in names]
    entries += [(name, None) for name in EXCLUDED]
    index: dict[str, str | None] = {}
    for name, cls in entries:
        if _key(name) in index:
            raise ValueError(f"label {name!r} is listed twice in {__name__} (SYNONYMS / EXCLUDED)")
        index[_key(name)] = cls
    return index


_INDEX = _index()
_UNKNOWN = object()


def canonical_label(raw: str, where: str) -> str | None:
    """The class `raw` names, or None when it is excluded; `where` (file or row) goes into errors."""
    whole = _INDEX.get(_key(raw), _UNKNOWN)
    if whole is not _UNKNOWN:
        return whole
    parts = [_INDEX.get(_key(part), _UNKNOWN) for part in re.split(r"[/,;]", raw) if _key(part)]
    for cls in ("covid", "pneumonia"):  # the most severe class named wins
        if cls in parts:
            return cls
    if not parts or _UNKNOWN in parts:
        raise ValueError(f"unknown label {raw!r} ({where}): add it to SYNONYMS under its class, or to "
                         f"EXCLUDED if it belongs to no task, in {__file__}")
    return None if None in parts else "normal"
