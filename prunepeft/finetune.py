"""Training a fixed configuration: the search's final training and :func:`finetune` share it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .config import SearchConfig
from .evaluation import evaluate, warn_if_constant
from .space import SpaceConfig
from .supernet import DEFAULT_HEADS, Supernet, attach
from .taskdata import BatchStream, prepare_data
from .train import NonFiniteError, TrainState, train_steps


class SearchError(RuntimeError):
    """The search (or a training run) could not finish (e.g. too many non-finite steps)."""


def loop_options(cfg: SearchConfig) -> dict[str, Any]:
    """The :func:`~prunepeft.train.train_steps` options every phase takes from the config."""
    return dict(grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm, precision=cfg.precision,
                max_bad_steps=cfg.max_bad_steps)  # fmt: skip


def make_optimizer(handle: Supernet, cfg: SearchConfig, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(handle.parameters()), lr=lr, weight_decay=cfg.weight_decay)


def train_configuration(
    model: nn.Module,
    handle: Supernet,
    optimizer: torch.optim.Optimizer,
    stream: Iterator[dict],
    cfg: SearchConfig,
    *,
    what: str = "training",
    progress: Callable[[TrainState], None] | None = None,
) -> dict[str, Any]:
    """``cfg.final_steps`` steps of the found (or a fixed) configuration at ``cfg.final_lr or cfg.lr``,
    warm-up + linear decay over the phase. Returns ``{"seconds", "loss", "skipped"}``."""
    lr = cfg.final_lr or cfg.lr
    state = TrainState()
    t0 = time.perf_counter()
    try:
        train_steps(model, lambda: list(handle.parameters()), optimizer, stream, cfg.final_steps, state, lr=lr,
                    total_steps=cfg.final_steps, warmup_steps=int(cfg.lr_warmup_ratio * cfg.final_steps),
                    progress=progress, **loop_options(cfg))  # fmt: skip
    except NonFiniteError as e:
        raise SearchError(f"{what} stopped: {e}") from e
    tail = state.losses[-20:]
    return {"seconds": time.perf_counter() - t0, "loss": sum(tail) / len(tail) if tail else math.nan,
            "skipped": state.skipped}  # fmt: skip


def finetune(
    model: nn.Module,
    train_data,
    eval_data=None,
    config: SearchConfig | None = None,
    *,
    space: SpaceConfig | None = None,
    handle: Supernet | None = None,
    tokenizer=None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train a fixed configuration for ``config.final_steps`` steps and evaluate it (no pruning).

    The configuration is ``handle`` (e.g. ``prunepeft.load(model, path)`` of a found one) or, if
    None, ``space`` attached in full (e.g. a uniform LoRA baseline:
    ``SpaceConfig(lora_targets=("q", "v"), lora_rank=8, serial_adapter_targets=())``). Same loop,
    data order, validation split, schedule and evaluation as a search's final training, so the two
    compare fairly. Everything it creates (candidates, data order, dropout) is seeded with
    ``config.seed``; seed the model's new head yourself (``transformers.set_seed`` before
    ``from_pretrained``). Returns ``{"metrics", "val_metrics", "seconds", "steps", "params", "loss",
    "handle"}``: metrics on the eval set and on the train-carved validation split.
    """
    cfg = config or SearchConfig()
    say = log or (lambda s: None)
    seed_everything(cfg.seed)
    data = prepare_data(model, train_data, eval_data, cfg, tokenizer)
    if handle is None:
        handle = attach(model, space or cfg.space)
    opt = make_optimizer(handle, cfg, cfg.final_lr or cfg.lr)
    run = train_configuration(model, handle, opt, BatchStream(data.train_epoch), cfg)
    val = evaluate(model, data, "val")
    warn_if_constant(val, cfg.final_lr or cfg.lr, say)
    metrics = evaluate(model, data, "eval")
    shown = metrics or val
    say(f"trained {handle.num_trainable():,} parameters for {cfg.final_steps} steps in {run['seconds']:.0f}s"
        + (": " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) if shown else ""))  # fmt: skip
    return {"metrics": metrics, "val_metrics": val, "seconds": run["seconds"], "steps": cfg.final_steps,
            "params": handle.num_trainable(), "loss": run["loss"], "handle": handle}  # fmt: skip


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CPU and CUDA), as ``transformers.set_seed``."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


def init_regression_head(model: nn.Module, train_data, val_examples: int | float | None = None) -> bool:
    """Set a new regression head's output bias to the mean training label; returns whether it could.

    A freshly drawn head predicts about 0 while STS-B-style labels lie in [0, 5]: for its first few
    hundred steps the squared error is dominated by that offset, and a short PEFT training barely
    learns the task (MiniLM on STS-B, 200 steps, LoRA r=8 q,v: Pearson 0.29 without, 0.80 with).
    Starting the bias at the mean is the usual fix; the CLI does it when it loads a model for a
    regression task, and the API leaves your model alone unless you call this.

    Args:
        model: a sequence-classification model with one output (``num_labels=1``).
        train_data: a :class:`~prunepeft.data.Task` (its training examples minus the validation
            split a search carves: the mean reads no validation label) or the labels themselves.
        val_examples: the search's ``SearchConfig.val_examples`` (None: its default, 10 %).

    Returns False (and changes nothing) when the output layer has no bias (Llama's ``score``).
    """
    from .data import Task

    if isinstance(train_data, Task):
        if train_data.kind != "regression":
            raise ValueError(f"init_regression_head needs a regression task, got a {train_data.kind} one")
        train_data = [ex.label for ex in train_data.split_validation(val_examples)[0].train]
    values = [float(v) for v in train_data]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError("init_regression_head needs finite training labels, got none or a non-finite one")
    out = None
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in DEFAULT_HEADS:
            linears = [m for m in mod.modules() if isinstance(m, nn.Linear)]
            out = linears[-1] if linears else None
            break
    if out is None:
        raise ValueError(
            f"init_regression_head: the model has no linear head named {' or '.join(DEFAULT_HEADS)}"
        )
    if out.out_features != 1:
        raise ValueError(
            f"init_regression_head: the head has {out.out_features} outputs; a regression head has 1"
        )
    if out.bias is None:
        return False
    with torch.no_grad():
        out.bias.fill_(sum(values) / len(values))
    return True
