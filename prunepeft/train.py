"""A lean training loop for the search and the final training.

AdamW over the bank (and the head), linear warm-up + linear decay (a pure function of the step,
:func:`prunepeft.scheduler.lr_at`), gradient clipping, gradient accumulation, bf16/fp16 autocast
where the device supports it. A step whose loss or gradients are not finite is skipped and counted;
``max_bad_steps`` such steps in a row stop training with :class:`NonFiniteError`.

Hooks: ``on_grads()`` runs after clipping and before the optimizer step (the bank's statistics are
accumulated there, as ``PrunePEFTCallback.on_pre_optimizer_step`` does inside a ``Trainer``), and
``after_step(step)`` after it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed
from .scheduler import lr_at

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradients."""


@dataclass
class TrainState:
    """Progress of one training phase (resumable: it is all a function of these counters)."""

    step: int = 0  # optimizer steps taken or skipped in this phase
    skipped: int = 0  # steps skipped for non-finite loss/gradients
    bad_in_row: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _grads_finite(params: list[nn.Parameter]) -> bool:
    for p in params:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return False
    return True


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_steps(
    model: nn.Module,
    params: Callable[[], list[nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    stream: Iterator[dict],
    n_steps: int,
    state: TrainState,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    precision: str = "fp32",
    max_bad_steps: int = 10,
    on_grads: Callable[[], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    progress: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Run ``n_steps`` optimizer steps (each of ``grad_accum`` micro-batches from ``stream``).

    ``params`` is called every step, because compaction may replace the bank's parameter.
    ``state.step`` counts steps of the phase; the learning rate at step s is
    ``lr_at(s, total_steps, warmup_steps, lr)``.
    """
    device = next(iter(params())).device
    precision = resolve_precision(precision, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    model.train()
    for _ in range(n_steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step, total_steps, warmup_steps, lr)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, finite = 0.0, True
        for _ in range(grad_accum):
            batch = move_batch(next(stream), device)  # every micro-batch is consumed, even after a bad one
            if not finite:
                continue
            with _autocast(precision, device):
                loss = model(**batch).loss / grad_accum
            if not bool(torch.isfinite(loss.detach())):
                finite = False
                continue
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += float(loss.detach())
        ps = params()
        finite = distributed.all_min(finite)  # several processes skip a step together or not at all
        if finite:
            distributed.average_gradients(ps)
            loss_sum = distributed.average_mean(loss_sum)
        if finite and scaler is not None:
            scaler.unscale_(optimizer)
        if finite and not _grads_finite(ps):
            finite = False
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            state.skipped += 1
            state.bad_in_row += 1
            state.step += 1
            if scaler is not None:
                scaler.update()
            if state.bad_in_row >= max_bad_steps:
                raise NonFiniteError(
                    f"{state.bad_in_row} steps in a row had a non-finite loss or gradients "
                    f"(at step {state.step}); lower the learning rate or check the data"
                )
            continue
        state.bad_in_row = 0
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(ps, max_grad_norm)
        if on_grads is not None:
            on_grads()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state.step += 1
        state.losses.append(loss_sum)
        state.seconds += time.perf_counter() - t0
        if after_step is not None:
            after_step(state.step)
        if progress is not None:
            progress(state)
    return state


@torch.no_grad()
def predict(
    model: nn.Module, batches, device: torch.device, kind: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Predictions, labels and (for causal LM) the mean token loss over ``batches``."""
    model.eval()
    preds, labels, loss_sum, tokens = [], [], 0.0, 0
    for batch in batches:
        batch = move_batch(batch, device)
        out = model(**batch)
        if kind == "causal_lm":
            n = int((batch["labels"][..., 1:] != -100).sum())
            loss_sum += float(out.loss) * n
            tokens += n
            continue
        logits = out.logits.float()
        preds.append(logits.squeeze(-1) if kind == "regression" else logits.argmax(-1))
        labels.append(batch["labels"])
    model.train()
    if kind == "causal_lm":
        return torch.empty(0), torch.empty(0), loss_sum / max(1, tokens)
    return torch.cat(preds).cpu(), torch.cat(labels).cpu(), math.nan
