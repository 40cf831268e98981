"""The pruning schedule: pure functions of the round (like peft AdaLoRA's ``budget_schedule``).

Kept apart from the code that mutates the model, so a schedule can be printed, tested and resumed
without touching a model.
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cubic")


def resolve_budget(budget: int | float | str, base_params: int) -> int:
    """A budget as an absolute parameter count.

    ``int``: that many parameters. ``str`` ending in ``%`` or a ``float``: a percentage of the base
    model's parameters (``"0.5%"`` and ``0.5`` both mean 0.5 %).
    """
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a number of parameters or a percentage, got {budget!r}")
    if isinstance(budget, str):
        text = budget.strip()
        if text.endswith("%"):
            try:
                budget = float(text[:-1])
            except ValueError:
                raise ValueError(f"budget {budget!r} is not a percentage like '0.5%'") from None
        else:
            try:
                budget = int(text.replace(",", "").replace("_", ""))
            except ValueError:
                raise ValueError(
                    f"budget {budget!r} is neither an integer nor a percentage like '0.5%'"
                ) from None
    if isinstance(budget, float):
        if not 0 < budget < 100 or not math.isfinite(budget):
            raise ValueError(f"budget percentage must be in (0, 100), got {budget}")
        return max(1, int(base_params * budget / 100))
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive number of parameters, got {budget!r}")
    return budget


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
