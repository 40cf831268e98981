"""Task metrics, in numpy (no scipy / scikit-learn needed): what the search compares candidates by.

===============  ========================================================================
kind             metrics (the first is :attr:`prunepeft.data.Task.primary_metric`)
===============  ========================================================================
classification   ``accuracy``; ``f1`` (binary: F1 of class 1, as GLUE reports it; more
                 classes: macro F1 over the classes present in labels or predictions);
                 ``matthews`` (multi-class Matthews correlation, as in scikit-learn)
regression       ``pearson``, ``spearman`` (Pearson of average ranks, ties averaged)
causal_lm        ``perplexity`` = exp(mean token cross-entropy); lower is better
===============  ========================================================================

Degenerate inputs give numbers, not NaN: a correlation with a constant side (every prediction
the same, or every label) is reported as 0.0, and so is Matthews when all predictions or all labels
are one class, and F1 of a class absent from both labels and predictions. Non-finite regression
predictions do give NaN correlations (a diverged model should not look merely uncorrelated).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["compute_metrics", "perplexity_from_loss"]


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        return x.numpy()
    return np.asarray(x)


def _class_ids(predictions: Any) -> np.ndarray:
    """Class ids from ids ``[N]`` or logits / probabilities ``[N, C]``."""
    p = _numpy(predictions)
    if p.ndim == 2:
        return p.argmax(axis=-1).astype(np.int64)
    if p.ndim != 1:
        raise ValueError(
            f"classification predictions must be class ids [N] or logits [N, C], got shape {p.shape}"
        )
    if p.dtype.kind == "f":
        if not np.all(np.isfinite(p)) or not np.all(p == np.round(p)):
            raise ValueError(
                "1-d classification predictions must be integer class ids (pass logits as [N, C])"
            )
    return p.astype(np.int64)


def _f1(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def _matthews(y: np.ndarray, p: np.ndarray) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K, as scikit-learn's); 0.0 when undefined."""
    classes = np.union1d(y, p)
    t = np.array([(y == c).sum() for c in classes], dtype=np.float64)  # true counts per class
    q = np.array([(p == c).sum() for c in classes], dtype=np.float64)  # predicted counts per class
    s = float(len(y))
    c = float((y == p).sum())
    cov_yp = c * s - float(t @ q)
    cov_pp = s * s - float(q @ q)
    cov_yy = s * s - float(t @ t)
    denom = cov_pp * cov_yy
    return 0.0 if denom == 0 else cov_yp / math.sqrt(denom)


def _classification(predictions: Any, labels: Any, num_labels: int | None) -> dict[str, float]:
    p = _class_ids(predictions)
    y = _numpy(labels).astype(np.int64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    binary = num_labels == 2 if num_labels is not None else max(int(p.max()), int(y.max())) <= 1
    if binary:
        f1 = _f1(
            float(((p == 1) & (y == 1)).sum()),
            float(((p == 1) & (y != 1)).sum()),
            float(((p != 1) & (y == 1)).sum()),
        )
    else:
        f1 = float(
            np.mean(
                [
                    _f1(
                        float(((p == c) & (y == c)).sum()),
                        float(((p == c) & (y != c)).sum()),
                        float(((p != c) & (y == c)).sum()),
                    )
                    for c in np.union1d(y, p)
                ]
            )
        )
    return {"accuracy": float((p == y).mean()), "f1": f1, "matthews": _matthews(y, p)}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return float("nan")
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # a constant side: correlation undefined, report 0
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return 0.0 if denom == 0 else float(np.clip(float(dx @ dy) / denom, -1.0, 1.0))


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of their positions (scipy's ``rankdata(method="average")``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.concatenate(([True], xs[1:] != xs[:-1]))
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.concatenate((starts[1:], [len(x)]))
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ((starts + ends - 1) / 2.0 + 1.0)[group]
    return ranks


def _regression(predictions: Any, labels: Any) -> dict[str, float]:
    p = _numpy(predictions).astype(np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    y = _numpy(labels).astype(np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"regression predictions of shape {p.shape} for {len(y)} labels")
    if len(y) < 2:
        raise ValueError("regression metrics need at least 2 examples")
    spearman = (
        _pearson(_ranks(p), _ranks(y)) if np.all(np.isfinite(p)) and np.all(np.isfinite(y)) else float("nan")
    )
    return {"pearson": _pearson(p, y), "spearman": spearman}


def perplexity_from_loss(mean_token_loss: float | torch.Tensor) -> float:
    """``exp(mean_token_loss)``: perplexity from the mean cross-entropy (nats) per target token.

    Overflow gives ``inf``; a NaN loss gives NaN.
    """
    loss = float(mean_token_loss.item() if isinstance(mean_token_loss, torch.Tensor) else mean_token_loss)
    if math.isnan(loss):
        return float("nan")
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _causal_lm(predictions: Any, labels: Any) -> dict[str, float]:
    p = predictions
    if not isinstance(p, torch.Tensor):
        p = torch.as_tensor(np.asarray(p))
    if p.ndim == 0:
        return {"perplexity": perplexity_from_loss(p)}
    if labels is None:
        raise ValueError("causal_lm metrics need labels with logits (or pass the mean token loss alone)")
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if p.ndim != y.ndim + 1 or p.shape[:-1] != y.shape:
        raise ValueError(f"causal_lm logits {tuple(p.shape)} do not match labels {tuple(y.shape)} (+ vocab)")
    logits = p[..., :-1, :].reshape(-1, p.shape[-1]).double()
    target = y[..., 1:].reshape(-1).long()
    if not bool((target != -100).any()):
        raise ValueError("causal_lm labels have no target token (all -100)")
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
    return {"perplexity": perplexity_from_loss(loss)}


def compute_metrics(
    kind: str, predictions: Any, labels: Any, *, num_labels: int | None = None
) -> dict[str, float]:
    """The metrics of ``kind`` (see the module doc) as python floats, keyed by name.

    Args:
        kind: ``"classification"``, ``"regression"`` or ``"causal_lm"``.
        predictions: numpy array, torch tensor or list. Classification: class ids ``[N]`` or logits
            ``[N, C]`` (argmax taken). Regression: ``[N]`` or ``[N, 1]``. causal_lm: logits
            ``[B, T, V]`` (shifted by one against ``labels``, as transformers' causal-LM loss), or a
            scalar, the mean token loss, to turn into perplexity.
        labels: classification: class ids ``[N]``; regression: ``[N]``; causal_lm: ``[B, T]`` with -100
            on positions without a target (ignored when ``predictions`` is a scalar loss).
        num_labels: classification only: the number of classes, to decide binary (F1 of class 1)
            vs macro F1; ``None``: binary when every label and prediction is 0 or 1.

    Degenerate inputs do not give NaN: constant predictions (or labels) give Matthews 0.0 and
    Pearson / Spearman 0.0 (the correlation is undefined); only non-finite regression predictions
    give NaN.

    Raises:
        ValueError: an unknown kind, empty inputs or mismatched shapes.
    """
    if kind == "causal_lm":
        return _causal_lm(predictions, labels)
    if kind not in ("classification", "regression"):
        raise ValueError(f"kind must be 'classification', 'regression' or 'causal_lm', got {kind!r}")
    if _numpy(labels).size == 0:
        raise ValueError("no labels to compute metrics on")
    if kind == "classification":
        return _classification(predictions, labels, num_labels)
    return _regression(predictions, labels)
