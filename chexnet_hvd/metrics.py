"""AUROC / AUPRC per class (scikit-learn), undefined classes, and gathering predictions across ranks.

A class whose labels in the split are all one value has no ROC curve: its AUROC is undefined
(NaN, reported as such), never 0.5, and the mean is over the defined classes only.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def _per_class(metric, y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    mask = np.ones_like(y_true) if mask is None else np.asarray(mask)
    values = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        keep = mask[:, c] > 0
        truth = y_true[keep, c] >= 0.5
        if 0 < truth.sum() < truth.size:
            values[c] = metric(truth, y_score[keep, c])
    return values


def per_class_auroc(y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """AUROC of each column; NaN where the (unmasked) labels hold only one class."""
    return _per_class(roc_auc_score, y_true, y_score, mask)


def per_class_auprc(y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Average precision (area under the PR curve) of each column; NaN where undefined."""
    return _per_class(average_precision_score, y_true, y_score, mask)


def mean_defined(values: np.ndarray) -> float:
    """Mean over defined (non-NaN) classes; NaN when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def masked_bce(y_true: np.ndarray, y_prob: np.ndarray, mask: np.ndarray) -> float:
    """Mean binary cross-entropy over unmasked entries (the validation loss)."""
    p = np.clip(np.asarray(y_prob, dtype=np.float64), 1e-7, 1 - 1e-7)
    bce = -(y_true * np.log(p) + (1 - y_true) * np.log(1 - p))
    return float((bce * mask).sum() / max(mask.sum(), 1))


def summarize(y_true: np.ndarray, y_prob: np.ndarray, mask: np.ndarray, names: list[str]) -> dict:
    """Per-class and mean AUROC / AUPRC plus loss, JSON-ready (undefined -> None)."""
    auroc, auprc = per_class_auroc(y_true, y_prob, mask), per_class_auprc(y_true, y_prob, mask)

    def clean(v: float):
        return None if not np.isfinite(v) else round(float(v), 6)

    return {
        "n": int(len(y_true)),
        "loss": clean(masked_bce(y_true, y_prob, mask)),
        "mean_auroc": clean(mean_defined(auroc)),
        "mean_auprc": clean(mean_defined(auprc)),
        "auroc": {n: clean(v) for n, v in zip(names, auroc, strict=True)},
        "auprc": {n: clean(v) for n, v in zip(names, auprc, strict=True)},
    }


def gather(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate each rank's arrays on every rank (rank order); identity without Horovod."""
    import horovod.tensorflow as hvd

    if not hvd.is_initialized() or hvd.size() == 1:
        return arrays
    parts = hvd.allgather_object(arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}
