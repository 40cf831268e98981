"""Metrics of a model on a split of a :class:`~prunepeft.taskdata.PreparedData`.

An evaluation forward runs in eval mode without gradients, so it leaves every statistic of an
attached supernet untouched (the sites collect activations only in training forwards, and the
gradient statistics come only from optimizer steps).
"""

from __future__ import annotations

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
