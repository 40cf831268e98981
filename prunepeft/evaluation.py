"""Metrics of a model on a split of a :class:`~prunepeft.taskdata.PreparedData`.

An evaluation forward runs in eval mode without gradients, so it leaves every statistic of an
attached supernet untouched (the sites collect activations only in training forwards, and the
gradient statistics come only from optimizer steps).
"""

from __future__ import annotations

import warnings

from torch import nn

from .taskdata import PreparedData
from .train import predict


def evaluate(
    model: nn.Module, data: PreparedData, split: str = "eval", limit: int | None = None
) -> dict[str, float]:
    """Metrics of the task on ``split`` (``"val"``: the train-carved validation split, ``"eval"``: the
    user's eval set), on its first ``limit`` examples at most. ``{}`` when the split is empty."""
    from .metrics import compute_metrics, perplexity_from_loss

    batches = data.split(split)
    if batches is None or limit == 0:
        return {}
    device = next(model.parameters()).device
    preds, labels, loss = predict(model, batches(limit), device, data.kind)
    if data.kind == "causal_lm":
        return {"perplexity": perplexity_from_loss(loss), "loss": loss}
    return compute_metrics(data.kind, preds.numpy(), labels.numpy(), num_labels=data.info.get("num_labels"))


#: a classification run whose Matthews correlation is at most this (a constant prediction scores 0), or
#: a regression run whose Pearson r is, has learned nothing it can show on held-out data
CONSTANT_LEVEL = {"matthews": 0.02, "pearson": 0.1}


def warn_if_constant(val_metrics: dict[str, float], lr: float, say=None) -> str | None:
    """Warn (``warnings.warn`` and ``say``) when the final training's validation metrics are at a constant
    prediction's level: it diverged, collapsed to the majority class, or learned nothing at this
    length. Returns the message, or None. Silent without a validation split or such a metric."""
    for name, level in CONSTANT_LEVEL.items():
        value = val_metrics.get(name)
        if value is not None and not value > level:  # NaN counts: the predictions were not finite
            msg = (f"the trained configuration scores {name} {value:.3f} on the validation split, the level of "
                   f"a constant prediction (<= {level}): training diverged, collapsed to one class, or learned "
                   f"nothing in this many steps; try a smaller learning rate than {lr:g} or more steps")  # fmt: skip
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            if say is not None:
                say(f"warning: {msg}")
            return msg
    return None
