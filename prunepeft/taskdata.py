"""Data preparation for a search or a training run: splits, batch streams, what the metric is.

:func:`prepare_data` turns what the user passed (a path, a :class:`~prunepeft.data.Task`, or a list
of ready batches) into a :class:`PreparedData`: endless, resumable streams of training batches
(main and low-fidelity warm-up), and the validation and eval sets as batch factories. The
validation split is carved out of the training data (ARCHITECTURE.md §5b: the eval set is read once, for the
final metric; every decision reads the validation split).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from . import distributed
from .config import SearchConfig

PRIMARY_METRIC = {"classification": "accuracy", "regression": "pearson", "causal_lm": "perplexity"}


class BatchStream:
    """An endless, resumable stream of batches: epoch ``e`` is ``make_epoch(e)``; ``consumed`` counts."""

    def __init__(self, make_epoch: Callable[[int], Iterable[dict]], consumed: int = 0) -> None:
        self.make_epoch = make_epoch
        self.consumed = 0
        self._epoch = 0
        self._it: Iterator[dict] = iter(make_epoch(0))
        for _ in range(consumed):
            next(self)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict:
        for _ in range(2):
            try:
                b = next(self._it)
                self.consumed += 1
                return b
            except StopIteration:
                self._epoch += 1
                self._it = iter(self.make_epoch(self._epoch))
        raise ValueError("the training data yields no batch (is it empty, or smaller than one batch?)")


Batches = Callable[[int | None], Iterable[dict]]
"""A batch factory: ``make(limit)`` iterates the first ``limit`` examples (None: all) in order."""


@dataclass
class PreparedData:
    """A task ready for training and evaluation.

    Attributes:
        kind: classification, regression or causal_lm.
        train_epoch / warmup_epoch: epoch -> batches (shuffled per epoch from the seed).
        val: the validation split carved from the training data (None: no split).
        eval: the user's eval set (None: none given); read once, for the final metric.
        primary, higher_is_better: the metric decisions and reports compare.
        info: what the result records about the task.
    """

    kind: str
    train_epoch: Callable[[int], Iterable[dict]]
    warmup_epoch: Callable[[int], Iterable[dict]]
    val: Batches | None
    eval: Batches | None
    primary: str
    higher_is_better: bool
    info: dict

    def split(self, name: str) -> Batches | None:
        if name not in ("val", "eval"):
            raise ValueError(f"split must be 'val' or 'eval', got {name!r}")
        return self.val if name == "val" else self.eval


def is_batch_list(x) -> bool:
    return (
        isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and len(x) > 0 and isinstance(x[0], dict)
    )


def prepare_data(model: nn.Module, train_data, eval_data, cfg: SearchConfig, tokenizer) -> PreparedData:
    """See the module doc. ``train_data``: a path, a Task, or a list of batches (dicts of tensors)."""
    if is_batch_list(train_data):
        return _prepare_batches(train_data, eval_data, cfg)
    from . import data as D

    if isinstance(train_data, (str, os.PathLike)):
        task = D.load_task(train=train_data, eval=eval_data, kind=cfg.task_kind)
    elif isinstance(train_data, D.Task):
        task = train_data
        if eval_data is not None:
            raise ValueError(
                "pass the eval set inside the Task (task.eval), not as eval_data, when train_data is a Task"
            )
    else:
        raise ValueError(
            "train_data must be a path to a data file, a prunepeft.data.Task, or a list of batches (dicts of tensors)"
        )
    if not task.train:
        raise ValueError("the training data is empty")
    if (
        task.kind == "classification"
        and getattr(model.config, "num_labels", task.num_labels) != task.num_labels
    ):
        raise ValueError(
            f"the task has {task.num_labels} classes but the model's head has {model.config.num_labels}; "
            f"load the model with num_labels={task.num_labels}"
        )
    task, val = task.split_validation(cfg.val_examples)
    if tokenizer is None:
        from transformers import AutoTokenizer

        name = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        if not name:
            raise ValueError("pass tokenizer=... : the model has no name_or_path to load its tokenizer from")
        tokenizer = AutoTokenizer.from_pretrained(name)
    kw = dict(tokenizer=tokenizer, max_length=cfg.max_length, kind=task.kind)
    warm_examples = (
        task.class_balanced_subset(cfg.warmup_subset, cfg.seed) if cfg.warmup_subset else task.train
    )

    rank, n_proc = distributed.world()

    def epoch_of(examples, offset: int):
        bs = min(cfg.batch_size, len(examples))

        def make(e: int):
            # every process draws the same global batches and trains on its shard of each
            out = D.batches(examples, batch_size=bs, shuffle=True, seed=cfg.seed * 100_003 + offset + e,
                            drop_last=True, **kw)  # fmt: skip
            return distributed.shard(out, rank, n_proc) if n_proc > 1 else out

        return make

    def fixed(examples) -> Batches | None:
        if not examples:
            return None

        def make(limit: int | None):
            ex = examples if limit is None else examples[:limit]
            return D.batches(ex, batch_size=cfg.eval_batch_size, shuffle=False, **kw)

        return make

    info = {"kind": task.kind, "num_labels": task.num_labels, "label_names": list(task.label_names),
            "train_examples": len(task.train), "val_examples": len(val),
            "eval_examples": len(task.eval or [])}  # fmt: skip
    return PreparedData(task.kind, epoch_of(task.train, 0), epoch_of(warm_examples, 7919), fixed(val),
                        fixed(task.eval), task.primary_metric, task.higher_is_better, info)  # fmt: skip


def _prepare_batches(train_data, eval_data, cfg: SearchConfig) -> PreparedData:
    """Pre-batched data, used in order and cyclically. A validation split only when ``val_examples`` is
    set: evenly spaced whole batches holding about that many examples."""
    from .data import resolve_validation_size

    kind = cfg.task_kind or "classification"
    rank, n_proc = distributed.world()
    batches = list(train_data)
    ev = list(eval_data) if eval_data is not None else None
    per = max(1, len(batches[0].get("labels", batches[0].get("input_ids", [0]))))
    n_val = resolve_validation_size(cfg.val_examples, len(batches) * per) if cfg.val_examples else 0
    k = min(len(batches) - 1, math.ceil(n_val / per)) if n_val else 0
    held = set(range(len(batches) - 1, -1, -max(1, len(batches) // k))[:k]) if k else set()
    train = [b for i, b in enumerate(batches) if i not in held]
    val = [b for i, b in enumerate(batches) if i in held]
    if n_proc > 1:  # the global batches, each process on its shard (evaluation reads whole batches)
        train = list(distributed.shard(train, rank, n_proc))

    def fixed(bs) -> Batches | None:
        if not bs:
            return None
        return lambda limit: bs if limit is None else bs[: max(1, math.ceil(limit / per))]

    info = {"kind": kind, "source": "batches", "train_batches": len(train), "val_batches": len(val),
            "eval_batches": len(ev or [])}  # fmt: skip
    return PreparedData(kind, lambda e: train, lambda e: train, fixed(val), fixed(ev), PRIMARY_METRIC[kind],
                        kind != "causal_lm", info)  # fmt: skip
