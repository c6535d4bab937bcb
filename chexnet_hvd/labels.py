"""Pathology names in the one canonical order, and label parsing.

Every label vector, model output and table in the suite uses PATHOLOGIES' order (the NIH /
CheXNet order, Rajpurkar et al. 2017, Table 1). A name not in the list is an error, never a
silent zero.
"""

from __future__ import annotations

import numpy as np

PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_CLASSES = len(PATHOLOGIES)
NO_FINDING = "No Finding"
# CheXpert competition set (Irvin et al. 2019), in CheXpert's own names.
CHEXPERT_COMPETITION: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)


class UnknownLabelError(ValueError):
    """A pathology name that is not in the label list."""


def parse_finding_labels(text: str, names: tuple[str, ...] = PATHOLOGIES) -> np.ndarray:
    """Turn a `|`-joined 'Finding Labels' cell into a 0/1 float32 vector in `names` order."""
    vector = np.zeros(len(names), dtype=np.float32)
    index = {name: i for i, name in enumerate(names)}
    for raw in str(text).split("|"):
        name = raw.strip()
        if name == NO_FINDING:
            continue
        if name not in index:
            raise UnknownLabelError(f"unknown pathology {name!r}")
        vector[index[name]] = 1.0
    return vector


def format_finding_labels(vector: np.ndarray, names: tuple[str, ...] = PATHOLOGIES) -> str:
    """Inverse of parse_finding_labels: a 0/1 vector back to the NIH 'Finding Labels' text."""
    found = [name for name, v in zip(names, vector, strict=True) if v >= 0.5]
    return "|".join(found) if found else NO_FINDING
