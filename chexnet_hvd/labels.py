"""Pathology names in the one canonical order, label parsing, and CheXpert's uncertainty policies.

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

# All 14 CheXpert observations, in the column order of its train.csv / valid.csv.
CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# What an uncertain (-1) CheXpert label becomes (Irvin et al. 2019, U-Ones / U-Zeros / U-Ignore).
UNCERTAINTY_POLICIES = ("ones", "zeros", "ignore")


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


def chexpert_labels(cells, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """CheXpert label cells ('1.0', '0.0', '-1.0' or blank) -> (labels, mask) float32 arrays.

    Blank = not mentioned = negative. Uncertain (-1): `ones` -> positive, `zeros` -> negative,
    `ignore` -> masked out (mask 0, left out of the loss and the metrics)."""
    if policy not in UNCERTAINTY_POLICIES:
        raise ValueError(f"unknown uncertainty policy {policy!r}")
    cells = np.char.strip(np.asarray(cells, dtype=str))
    known = {"": 0.0, "0": 0.0, "0.0": 0.0, "1": 1.0, "1.0": 1.0, "-1": -1.0, "-1.0": -1.0}
    bad = ~np.isin(cells, list(known))
    if bad.any():
        raise UnknownLabelError(f"label value {cells[bad][0]!r} is not 1.0, 0.0, -1.0 or blank")
    values = np.vectorize(known.__getitem__, otypes=[np.float32])(cells) if cells.size else \
        np.zeros(cells.shape, np.float32)
    uncertain = values < 0
    labels = np.where(uncertain, 1.0 if policy == "ones" else 0.0, values).astype(np.float32)
    mask = np.where(uncertain & (policy == "ignore"), 0.0, 1.0).astype(np.float32)
    return labels, mask
