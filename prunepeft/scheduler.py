"""The pruning schedule: pure functions of the round (like peft AdaLoRA's ``budget_schedule``).

Kept apart from the code that mutates the model, so a schedule can be printed, tested and resumed
without touching a model.
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cubic")


def resolve_budget(budget: int | float | str, base_params: int) -> int:
    """A budget as an absolute parameter count.

    ``int`` (or a string of digits, ``"73,728"``): that many parameters. ``str`` ending in ``%``:
    a percentage of the base model's parameters (``"0.5%"``). ``float`` in (0, 1), or a string of
    one (``"0.005"``): a fraction of them (0.005 = 0.5 %).
    """
    accepted = "an integer number of parameters (73728), a percentage ('0.5%') or a fraction below 1 (0.005)"
    if isinstance(budget, bool):
        raise ValueError(f"budget must be {accepted}, got {budget!r}")
    if isinstance(budget, str):
        text = budget.strip().replace(",", "").replace("_", "")
        try:
            if text.endswith("%"):
                pct = float(text[:-1])
                if not 0 < pct < 100 or not math.isfinite(pct):
                    raise ValueError
                return max(1, int(base_params * pct / 100))
            budget = int(text) if text.isdigit() else float(text)
        except ValueError:
            raise ValueError(f"budget {budget!r} is not {accepted}") from None
    if isinstance(budget, float):
        if budget.is_integer() and budget >= 1:
            budget = int(budget)
        elif not 0 < budget < 1 or not math.isfinite(budget):
            raise ValueError(f"budget {budget!r} is not {accepted}")
        else:
            return max(1, int(base_params * budget))
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget {budget!r} is not {accepted}")
    return budget


def default_budget(space) -> int:
    """Parameters of peft LoRA r=8 on the attention query and value projections of every layer of
    ``space`` (a :class:`~prunepeft.space.SearchSpace`, or anything with ``.space``)."""
    space = getattr(space, "space", space)
    sites = [s for s in space.sites if s.role in ("q", "v")]
    if not sites:
        raise ValueError(
            f"{space.model_type} has no separate q/v projections: give SearchConfig(budget=...) explicitly"
        )
    return sum(8 * (s.in_dim + s.out_dim) for s in sites)


def base_param_count(model) -> int:
    """Parameters of the base model (4-bit weights counted by their logical shape)."""
    n = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        n += int(qs.shape.numel()) if qs is not None and hasattr(qs, "shape") else p.numel()
    return n


def round_targets(start: int, budget: int, rounds: int, schedule: str = "linear") -> list[int]:
    """Trainable-parameter target after each of ``rounds`` rounds, from ``start`` down to ``budget``.

    ``linear`` removes the same amount every round; ``cubic`` removes most early
    (``1 - (1 - t)^3``, as AdaLoRA's budget schedule). The last target is exactly ``budget``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if budget > start:
        raise ValueError(f"budget {budget} is above the supernet's {start} trainable parameters")
    out = []
    for r in range(1, rounds + 1):
        t = r / rounds
        frac = t if schedule == "linear" else 1 - (1 - t) ** 3
        out.append(budget if r == rounds else int(round(start - (start - budget) * frac)))
    return out


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    linear decay to 0 at ``total`` -- exactly transformers' ``get_linear_schedule_with_warmup``, so
    the loop and a ``Trainer`` with the callback follow the same schedule."""
    if step < warmup:
        return base_lr * step / max(1, warmup)
    return base_lr * max(0.0, (total - step) / max(1, total - warmup))
