"""``PrunePEFTCallback``: the same search rounds inside a user's ``transformers.Trainer``.

Drop-in: build the callback on the model *before* the Trainer (it attaches the supernet, so the
Trainer's optimizer sees the bank), pass it in ``callbacks=[...]``, train as usual. During the first
``warmup_steps + rounds * steps_per_round`` optimizer steps the callback accumulates the bank's
statistics after gradient clipping (``on_pre_optimizer_step``), assigns criteria after the
warm-up, and at the end of each round prunes to the round's target and compacts the bank, gathering
the Trainer's AdamW state with it. Afterwards the Trainer simply keeps training the found
configuration (``final_init="continue"``)::

    cb = PrunePEFTCallback(model, SearchConfig(budget=73_728, rounds=4, steps_per_round=25))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    print(cb.kept())
"""

from __future__ import annotations

from transformers import TrainerCallback

from .config import SearchConfig
from .pruner import Pruner
from .scheduler import base_param_count, default_budget, resolve_budget
from .supernet import attach


class PrunePEFTCallback(TrainerCallback):
    """Run PrunePEFT's warm-up and prune rounds inside ``transformers.Trainer`` (see module doc)."""

    def __init__(self, model, config: SearchConfig | None = None) -> None:
        self.config = config or SearchConfig()
        base = base_param_count(model)
        self.handle = attach(model, self.config.space)
        try:
            budget = (
                resolve_budget(self.config.budget, base)
                if self.config.budget is not None
                else default_budget(self.handle)
            )
            self.pruner = Pruner(self.handle, self.config, budget)
        except ValueError:
            self.handle.detach()
            raise
        self.budget = budget

    @staticmethod
    def _inner(optimizer):
        # accelerate wraps the torch optimizer; compaction must re-key the real one's state
        return getattr(optimizer, "optimizer", optimizer)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            inner = self._inner(optimizer)
            held = any(p is self.handle.bank.flat for g in inner.param_groups for p in g["params"])
            if not held:
                raise ValueError(
                    "the Trainer's optimizer does not hold the prunepeft bank: create PrunePEFTCallback(model, ...) "
                    "before the Trainer, and do not pass an optimizer built earlier"
                )
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.on_grads()
        return control

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            raise ValueError("PrunePEFTCallback needs the Trainer's optimizer")
        self.pruner.after_step(self._inner(optimizer))
        return control

    @property
    def history(self):
        return self.pruner.history

    def kept(self) -> dict[str, int]:
        """``{candidate name: width}`` of what survives so far."""
        bank = self.handle.bank
        return {s.name: w for s, w in zip(bank.specs, bank.effective_widths(), strict=True) if w}
