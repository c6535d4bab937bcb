"""Pathology names in the one canonical order, label parsing, and the uncertainty policies.

Every dataset's label names map onto CANONICAL (the 14 NIH names in the NIH / CheXNet order,
Rajpurkar et al. 2017, Table 1, then CheXpert's other observations); a records set's classes are
the canonical names its sources annotate, in that order. A name that is neither canonical nor an
alias nor mapped by the user is an error, never a silent zero.
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
# The canonical label list every dataset's names map onto: the 14 NIH names (in their order, so
# NIH-only records keep it), then the CheXpert observations NIH does not have (Irvin et al. 2019).
CANONICAL: tuple[str, ...] = PATHOLOGIES + (
    "Enlarged Cardiomediastinum",
    "Lung Opacity",
    "Lung Lesion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
# Other spellings of canonical names (compared case-, space- and underscore-blind, see `_key`).
ALIASES = {"Pleural Effusion": "Effusion"}

# What an uncertain (-1) label becomes (Irvin et al. 2019, U-Ones / U-Zeros / U-Ignore).
UNCERTAINTY_POLICIES = ("ones", "zeros", "ignore")


class UnknownLabelError(ValueError):
    """A label name, label cell, uncertainty policy or label-map item the suite cannot take."""


def _key(name: str) -> str:
    return " ".join(str(name).replace("_", " ").split()).casefold()


_LOOKUP = {_key(n): n for n in CANONICAL} | {_key(a): n for a, n in ALIASES.items()}


def parse_label_map(items: list[str]) -> dict[str, str | None]:
    """`--label-map` items 'Their Name=Canonical Name' (or 'Their Name=' to drop a column) ->
    {their name: canonical name or None}."""
    mapping: dict[str, str | None] = {}
    for item in items:
        name, sep, target = item.partition("=")
        if not sep or not name.strip():
            raise UnknownLabelError(f"label map {item!r} is not NAME=CANONICAL (or NAME= to drop)")
        if target.strip() and _key(target) not in _LOOKUP:
            raise UnknownLabelError(f"label map {item!r}: {target.strip()!r} is not a canonical "
                                    f"label ({', '.join(CANONICAL)})")
        mapping[name.strip()] = _LOOKUP[_key(target)] if target.strip() else None
    return mapping


def is_known(name: str, mapping: dict[str, str | None] | None = None) -> bool:
    """Whether `canonical` takes a name (canonical, an alias, or mapped)."""
    return _key(name) in _LOOKUP or _key(name) in {_key(k) for k in (mapping or {})}


def canonical(name: str, mapping: dict[str, str | None] | None = None) -> str | None:
    """A dataset's label name -> its canonical name (None: dropped by the map). An unknown name
    is refused: mapped explicitly or not at all, never guessed."""
    mapped = {_key(k): v for k, v in (mapping or {}).items()}
    if _key(name) in mapped:
        return mapped[_key(name)]
    if _key(name) not in _LOOKUP:
        raise UnknownLabelError(f"label {name.strip()!r} is not a canonical label; map it with "
                                f"--label-map '{name.strip()}=<canonical name>' (or "
                                f"'{name.strip()}=' to leave it out)")
    return _LOOKUP[_key(name)]


def in_canonical_order(names) -> tuple[str, ...]:
    """Canonical names, without repeats, in CANONICAL's order."""
    names = set(names)
    return tuple(n for n in CANONICAL if n in names)


def uncertainty_rules(text: str, mapping: dict | None = None) -> tuple[str, dict[str, str]]:
    """'--uncertainty' as one policy for every class ('ones') or per class, an optional default
    first: 'zeros,Atelectasis=ones,Edema=ones' -> ('zeros', {canonical name: policy})."""
    default, per_class = "ones", {}
    for item in (i.strip() for i in str(text).split(",") if i.strip()):
        name, sep, policy = item.rpartition("=")
        if policy not in UNCERTAINTY_POLICIES:
            raise UnknownLabelError(f"uncertainty {item!r}: the policy must be one of "
                                    f"{', '.join(UNCERTAINTY_POLICIES)}")
        if sep:
            if (target := canonical(name, mapping)) is None:
                raise UnknownLabelError(f"uncertainty {item!r}: {name.strip()!r} is left out by --label-map")
            per_class[target] = policy
        else:
            default = policy
    return default, per_class


def parse_uncertainty(text: str, names, mapping: dict | None = None) -> dict[str, str]:
    """The policy of each of `names` under '--uncertainty' (see `uncertainty_rules`)."""
    default, per_class = uncertainty_rules(text, mapping)
    return {n: per_class.get(n, default) for n in names}


def parse_finding_labels(text: str, names: tuple[str, ...] = PATHOLOGIES) -> np.ndarray:
    """Turn a `|`-joined 'Finding Labels' cell into a 0/1 float32 vector in `names` order."""
    vector = np.zeros(len(names), dtype=np.float32)
    if unknown := unknown_findings(text, names):
        raise UnknownLabelError(f"unknown pathology {unknown[0]!r}")
    index = {name: i for i, name in enumerate(names)}
    for raw in str(text).split("|"):
        if raw.strip() != NO_FINDING:
            vector[index[raw.strip()]] = 1.0
    return vector


def unknown_findings(text: str, names: tuple[str, ...] = PATHOLOGIES) -> list[str]:
    """The names in a 'Finding Labels' cell that are neither in `names` nor 'No Finding'."""
    return [n for n in (raw.strip() for raw in str(text).split("|")) if n != NO_FINDING and n not in names]


def format_finding_labels(vector: np.ndarray, names: tuple[str, ...] = PATHOLOGIES) -> str:
    """Inverse of parse_finding_labels: a 0/1 vector back to the NIH 'Finding Labels' text."""
    found = [name for name, v in zip(names, vector, strict=True) if v >= 0.5]
    return "|".join(found) if found else NO_FINDING


CELLS = {"0": 0.0, "0.0": 0.0, "1": 1.0, "1.0": 1.0, "-1": -1.0, "-1.0": -1.0}


def label_cells(cells, policies, blank: str = "negative") -> tuple[np.ndarray, np.ndarray]:
    """Label cells [rows, classes] ('1', '0', '-1', their '.0' forms, or blank) -> (labels,
    mask) float32 arrays. `policies`: one uncertainty policy, or one per class (column).
    Uncertain (-1): `ones` -> positive, `zeros` -> negative, `ignore` -> masked out (mask 0,
    left out of the loss and the metrics). Blank: `negative` (CheXpert: not mentioned) or
    `masked` (not annotated: own data)."""
    cells = np.char.strip(np.asarray(cells, dtype=str))
    policies = np.broadcast_to(np.asarray(policies, dtype=str), cells.shape[-1:] if cells.ndim else ())
    # str(): under numpy 2 the repr of a numpy string is "np.str_('yes')", not "'yes'"
    unknown = [str(p) for p in np.unique(policies) if p not in UNCERTAINTY_POLICIES]
    if unknown:
        raise ValueError(f"unknown uncertainty policy {unknown[0]!r}")
    bad = ~np.isin(cells, [*CELLS, ""])
    if bad.any():
        raise UnknownLabelError(f"label value {str(cells[bad][0])!r} is not 1, 0, -1 or blank")
    values = np.vectorize(lambda c: CELLS.get(c, 0.0), otypes=[np.float32])(cells) if cells.size \
        else np.zeros(cells.shape, np.float32)
    uncertain = values < 0
    labels = np.where(uncertain & (policies == "ones"), 1.0, np.maximum(values, 0.0)).astype(np.float32)
    masked = (uncertain & (policies == "ignore")) | ((cells == "") & (blank == "masked"))
    return labels, np.where(masked, 0.0, 1.0).astype(np.float32)
