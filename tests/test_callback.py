"""PrunePEFTCallback inside transformers.Trainer: fields the Trainer owns are refused, checkpoints carry
the search (kill between rounds or inside a round, resume, same result), skipped steps give no
statistics, and the optimizers QLoRA users run carry their state through compaction."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from prunepeft import SpaceConfig
from prunepeft.api import SearchConfig
from prunepeft.callback import PrunePEFTCallback

SPACE = SpaceConfig(lora_targets=("q", "k", "v", "o"), serial_adapter_targets=("ffn",), adapter_width=8,
                    trainable_modules=())  # fmt: skip


def _batches(n=5, bs=8, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(3, 100, (bs, seq), generator=g)),
             "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (bs,), generator=g)}
            for _ in range(n)]  # fmt: skip


def _cfg(**kw):
    base = dict(space=SPACE, budget=2000, granularity="block", rounds=3, steps_per_round=3, warmup_steps=3)
    base.update(kw)
    return SearchConfig(**base)


def _trainer(model, cb, out, max_steps, optim="adamw_torch", save_steps=None, extra_callbacks=()):
    from transformers import Trainer, TrainingArguments

    data = _batches()

    class Sequential(Trainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, learning_rate=1e-2, lr_scheduler_type="linear",
                             warmup_steps=0, per_device_train_batch_size=1, report_to=[], logging_steps=1000,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             use_cpu=True, seed=0, dataloader_num_workers=0, optim=optim)  # fmt: skip
    return Sequential(model=model, args=args, train_dataset=data, data_collator=lambda xs: xs[0],
                      callbacks=[cb, *extra_callbacks])  # fmt: skip


def test_fields_the_trainer_owns_are_refused():
    model, _ = tiny_model("bert")
    with pytest.raises(ValueError, match=r"lr \(set TrainingArguments learning_rate\).*final_steps"):
        PrunePEFTCallback(model, _cfg(lr=5e-3, final_steps=10))
    assert not hasattr(model, "prunepeft_bank")  # nothing attached
    cb = PrunePEFTCallback(model, _cfg(final_init="continue"))  # what the callback does anyway
    assert cb.budget == 2000


class _Kill(__import__("transformers").TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("kill_at", [6, 8])  # 6: between rounds (end of round 1), 8: inside round 2
def test_checkpoint_resume_equals_uninterrupted(tmp_path, kill_at):
    total = 3 + 3 * 3 + 2
    model, _ = tiny_model("bert")
    cb = PrunePEFTCallback(model, _cfg())
    _trainer(model, cb, tmp_path / "full", total).train()

    model_b, _ = tiny_model("bert")
    cb_b = PrunePEFTCallback(model_b, _cfg())
    with pytest.raises(KeyboardInterrupt):
        _trainer(
            model_b, cb_b, tmp_path / "run", total, save_steps=2, extra_callbacks=[_Kill(kill_at + 1)]
        ).train()

    model_c, _ = tiny_model("bert")
    cb_c = PrunePEFTCallback(model_c, _cfg())
    trainer = _trainer(model_c, cb_c, tmp_path / "run", total, save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{kill_at}"))
    assert cb_c.kept() == cb.kept() and cb_c.pruner.assignment == cb.pruner.assignment
    assert [h.pruned for h in cb_c.history] == [h.pruned for h in cb.history]
    for a, b in zip(cb_c.history, cb.history, strict=True):
        assert a.params == b.params and a.target == b.target and a.round == b.round
    torch.testing.assert_close(
        cb_c.handle.bank.flat.detach(), cb.handle.bank.flat.detach(), rtol=1e-5, atol=1e-6
    )


def test_save_model_holds_the_search_in_progress(tmp_path):
    model, _ = tiny_model("bert")
    cb = PrunePEFTCallback(model, _cfg())
    trainer = _trainer(model, cb, tmp_path / "t", 8)  # inside round 2
    trainer.train()
    sd = model.state_dict()
    assert sd["prunepeft_bank.layout_widths"].tolist() == cb.handle.bank.widths()
    assert "prunepeft_bank.stats" in sd and "prunepeft_bank.pruner_state" in sd
    fresh, _ = tiny_model("bert")
    cb2 = PrunePEFTCallback(fresh, _cfg())
    fresh.load_state_dict(sd)
    assert cb2.handle.bank.widths() == cb.handle.bank.widths()
    assert cb2.handle.bank.loaded_state["step"] == 8
    torch.testing.assert_close(cb2.handle.bank.stats, cb.handle.bank.stats)


def test_non_finite_steps_never_reach_the_statistics():
    model, batch = tiny_model("bert")
    cb = PrunePEFTCallback(model, _cfg())
    bank = cb.handle.bank
    model.train()
    model(**batch).loss.backward()
    bank.flat.grad[0] = float("nan")
    cb.on_pre_optimizer_step(None, None, None)
    assert bank.stats is None and cb.skipped_steps == 1
    bank.flat.grad[0] = 0.0
    cb.on_pre_optimizer_step(None, None, None)
    assert bank.stats is not None and cb.skipped_steps == 1


def test_4bit_base_trains_in_the_trainer(tmp_path):
    """transformers' Trainer refuses a quantized model without a peft adapter; with the supernet attached
    it trains, prunes and saves a checkpoint like a dense one."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import AutoModelForSequenceClassification

    from prunepeft.models import quantization_config

    dense, _ = tiny_model("llama", hidden=64)  # bitsandbytes' CPU 4-bit path wants in_features >= 64
    dense.save_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", quantization_config=quantization_config()
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    space = SpaceConfig(lora_targets=("q", "k", "v", "o"), serial_adapter_targets=("ffn",), adapter_width=8)
    cb = PrunePEFTCallback(model, _cfg(space=space))
    trainer = _trainer(model, cb, tmp_path / "t", 14, save_steps=14)
    trainer.train()
    assert cb.handle.num_trainable() <= 2000 and len(cb.history) == 3
    assert (tmp_path / "t" / "checkpoint-14").is_dir() and model.prunepeft_quantized_base
