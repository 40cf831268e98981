"""``PrunePEFTCallback``: the same search rounds inside a user's ``transformers.Trainer``.

Drop-in: build the callback on the model *before* the Trainer (it attaches the supernet, so the
Trainer's optimizer sees the bank), pass it in ``callbacks=[...]``, train as usual. During the first
``warmup_steps + rounds * steps_per_round`` optimizer steps the callback accumulates the bank's
statistics after gradient clipping (``on_pre_optimizer_step``), assigns criteria after the
warm-up, and at the end of each round prunes to the round's target and compacts the bank, gathering
the Trainer's optimizer state with it. Afterwards the Trainer simply keeps training the found
configuration (``final_init="continue"``)::

    cb = PrunePEFTCallback(model, SearchConfig(budget=73_728, rounds=4, steps_per_round=25))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    print(cb.kept())

What the Trainer owns stays the Trainer's: the learning rate and its schedule, batch size, precision,
clipping, gradient accumulation, the number of steps, evaluation. The :class:`SearchConfig` fields
that would set those are rejected with a message naming the ``TrainingArguments`` field to use.

Checkpoints: the bank's ``state_dict`` carries its compacted layout, the statistics of the round in
progress and the pruner's state, so ``trainer.save_model`` / checkpoints hold the search, and
``trainer.train(resume_from_checkpoint=...)`` continues with the same kept set, round and
statistics. Several processes (DDP through accelerate / ``torchrun``): the bank's tensor is left out
of DDP's reducer (compaction replaces it) and its gradient is averaged by a hook instead; activation
statistics are summed over ranks before scoring and every round checks that ranks agree.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import TrainerCallback

from . import distributed
from .config import SearchConfig
from .optim_state import check_carriable
from .pruner import Pruner
from .scheduler import base_param_count, default_budget, resolve_budget
from .supernet import BANK_ATTR, attach

#: SearchConfig fields the Trainer owns, and the TrainingArguments field that sets each instead
TRAINER_OWNS = {
    "lr": "learning_rate", "final_lr": "learning_rate", "weight_decay": "weight_decay",
    "lr_warmup_ratio": "warmup_ratio / warmup_steps", "max_grad_norm": "max_grad_norm",
    "grad_accum": "gradient_accumulation_steps", "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size", "precision": "bf16 / fp16",
    "final_steps": "max_steps (the Trainer keeps training the found configuration)",
    "final_init": "(the Trainer continues from the search's weights: only 'continue')",
    "warmup_subset": "(the Trainer feeds every step from its own dataloader)",
    "max_bad_steps": "(the Trainer decides what a non-finite step does)",
    "max_length": "(your data collator / tokenizer)", "val_examples": "eval_dataset",
    "round_eval_examples": "eval_strategy", "task_kind": "(your model's head)",
}  # fmt: skip


class PrunePEFTCallback(TrainerCallback):
    """Run PrunePEFT's warm-up and prune rounds inside ``transformers.Trainer`` (see module doc)."""

    def __init__(self, model, config: SearchConfig | None = None) -> None:
        self.config = config or SearchConfig()
        _reject_trainer_fields(self.config)
        distributed.reject_sharded(model)
        base = base_param_count(model)
        self.model = model
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
        self.skipped_steps = 0
        self.handle.bank.state_provider = self.pruner.state_dict
        self._allow_quantized_base(model)
        self._setup_processes()

    @staticmethod
    def _allow_quantized_base(model) -> None:
        """Let the Trainer train a 4-bit base that carries the supernet.

        transformers' Trainer refuses a quantized model unless it is a ``peft`` model
        (``validate_quantization_for_training``: "cannot perform fine-tuning on purely quantized
        models"); the bank is this model's trainable adapter, so the model's ``is_quantized`` flag,
        which only that check and the ``.half()`` / ``.float()`` guards read (the quantizer,
        ``save_pretrained`` and device placement read ``hf_quantizer`` / ``is_loaded_in_4bit``), is
        cleared; ``prunepeft_quantized_base`` records that it was set.
        """
        if getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is not None:
            model.is_quantized = False
            model.prunepeft_quantized_base = True

    # ------------------------------------------------------------------ several processes
    def _setup_processes(self) -> None:
        """Before DDP wraps the model: leave the bank out of its reducer, average the bank's gradient
        with a hook instead, and start every rank from rank 0's bank (idempotent)."""
        if distributed.world()[1] == 1:
            return
        if not self.handle.head_parameters():
            raise ValueError(
                "PrunePEFTCallback under DDP needs a trainable module besides the bank (the bank is kept out of "
                "DDP's reducer, which refuses a model with nothing left to synchronise): keep the task head "
                "trainable (SpaceConfig.trainable_modules), or run prunepeft.search under torchrun"
            )
        names = [f"{BANK_ATTR}.{n}" for n, _ in self.handle.bank.named_parameters()]
        names += [f"{BANK_ATTR}.{n}" for n, _ in self.handle.bank.named_buffers()]
        ignored = set(getattr(self.model, "_ddp_params_and_buffers_to_ignore", ()))
        self.model._ddp_params_and_buffers_to_ignore = sorted(ignored | set(names))
        flat = self.handle.bank.flat
        if not getattr(flat, "_prunepeft_grad_average", False):
            distributed.broadcast_(flat)
            distributed.install_grad_average(flat)

    def on_init_end(self, args, state, control, **kwargs):
        self._setup_processes()  # the Trainer has initialised the process group by now
        return control

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
            check_carriable(inner, self.handle.bank.flat)
        loaded = self.handle.bank.loaded_state
        if loaded is not None:  # trainer.train(resume_from_checkpoint=...) loaded a search in progress
            self.pruner.load_state_dict(loaded)
            self.handle.bank.loaded_state = None
            if self.pruner.step != state.global_step:
                raise ValueError(
                    f"the checkpoint's search is at step {self.pruner.step} but the Trainer resumes at step "
                    f"{state.global_step}; resume from the checkpoint the Trainer wrote together with it"
                )
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        flat = self.handle.bank.flat
        if flat.grad is not None and not bool(torch.isfinite(flat.grad).all()):
            self.skipped_steps += 1  # a step the grad scaler / the optimizer will skip: no statistics
            return control
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


def _reject_trainer_fields(config: SearchConfig) -> None:
    """A SearchConfig field the Trainer owns, set to anything but its default, is an error (the
    Trainer would silently ignore it). ``final_init="continue"`` is what the callback does anyway."""
    if not isinstance(config, SearchConfig):
        raise ValueError(f"PrunePEFTCallback takes a SearchConfig, got {type(config).__name__}")
    defaults = SearchConfig()
    bad = [f.name for f in dataclasses.fields(SearchConfig)
           if f.name in TRAINER_OWNS and getattr(config, f.name) != getattr(defaults, f.name)]  # fmt: skip
    bad = [b for b in bad if not (b == "final_init" and config.final_init == "continue")]
    if bad:
        raise ValueError(
            "PrunePEFTCallback: the Trainer owns "
            + "; ".join(f"{b} (set TrainingArguments {TRAINER_OWNS[b]})" for b in bad)
            + ". Leave these SearchConfig fields at their defaults"
        )
