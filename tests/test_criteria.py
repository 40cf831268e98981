"""Criteria and the hybrid strategy with hand-computed expectations (issue: test the strategy itself)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from prunepeft import SpaceConfig, attach
from prunepeft.criteria import CRITERIA, criterion_values


def test_gate_statistic_is_the_derivative_of_the_loss_by_a_unit_gate():
    """sum(w * g) over a block = 2 x d loss / d (a gate on the block's units) for LoRA and ReLU adapters."""
    model, batch = tiny_model("bert")
    h = attach(model, SpaceConfig(lora_targets=("q", "v"), serial_adapter_targets=("ffn",), adapter_width=8))
    bank = h.bank
    torch.manual_seed(0)
    with torch.no_grad():
        bank.flat.normal_(0, 0.1)  # non-zero Ut everywhere, so every gate has a gradient
    bank._rebuild()
    bank.unit_scale.requires_grad_(True)  # the gates: scale per unit (1 x LoRA's alpha / r)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    bank.accumulate_stats()
    scale_grad = (bank.unit_scale.grad * bank.unit_scale.detach()).double()
    # the gate of block b = sum over its units of scale * d loss / d scale
    want = torch.zeros(bank.num_blocks, dtype=torch.float64)
    for c, spec in enumerate(bank.specs):
        lo = bank._unit_off[c]
        for j, b in enumerate(bank.candidate_blocks(c)):
            want[b] = scale_grad[lo + j * spec.block_size : lo + (j + 1) * spec.block_size].sum()
    got = bank.gate[: bank.num_blocks]
    torch.testing.assert_close(got, 2 * want.abs(), rtol=1e-4, atol=1e-9)
    # the candidate rows hold the gate of the whole candidate (blocks + its own output bias)
    values = criterion_values(bank)["gate"]
    assert values[0].shape == (bank.num_blocks,) and values[1].shape == (bank.num_candidates,)
    assert bool((values[1] > 0).all())


def test_every_criterion_says_which_end_prunes():
    assert {n for n, c in CRITERIA.items() if c.prune_high} == {"zeros", "threshold"}
    assert "gate" in CRITERIA


@pytest.mark.parametrize("ema", [None, 0.5])
def test_gate_accumulates_and_compacts_like_the_other_statistics(ema):
    model, batch = tiny_model("bert")
    h = attach(model, SpaceConfig(lora_targets=("q", "v"), serial_adapter_targets=(), block_size=4))
    bank = h.bank
    with torch.no_grad():
        bank.flat.normal_(0, 0.1)
    model.train()
    steps = []
    for _ in range(2):
        bank.flat.grad = None
        model(**batch).loss.backward()
        before = None if bank.gate is None else bank.gate.clone()
        bank.accumulate_stats(ema=ema)
        steps.append(bank.gate - (0 if before is None else (before if ema is None else ema * before)))
    keep = torch.ones(bank.num_blocks, dtype=torch.bool)
    keep[0] = False
    old = bank.gate.clone()
    bank.compact(keep)
    assert bank.gate.shape[0] == bank.num_blocks + bank.num_candidates
    torch.testing.assert_close(bank.gate, torch.cat([old[1 : len(keep)], old[len(keep) :]]))
