"""Optimizer state through compaction: one step after compaction equals a never-pruned twin that only
ever had the kept rows (exactly for elementwise fp32 state, within the 8-bit optimizers' own
quantisation error), for the optimizers QLoRA users run; an optimizer whose state cannot be carried
fails before anything changes; the Trainer's optim names work with the callback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunepeft.optim_state import check_carriable, swap_param

N = 12_288  # >= bitsandbytes' min_8bit_size (4096): its 8-bit optimizers keep 8-bit state
KEEP_LARGE = torch.cat([torch.arange(0, 4096), torch.arange(8192, 12_288)])  # 8192 rows kept: still 8-bit
KEEP_SMALL = torch.arange(1000, 3000)  # 2000 rows: below min_8bit_size, bitsandbytes would keep fp32


def _factories():
    import bitsandbytes as bnb
    from transformers.optimization import Adafactor

    return {
        "torch AdamW": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01), True),
        "torch Adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2), True),
        "torch SGD momentum": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), True),
        "torch Adafactor": (lambda ps: torch.optim.Adafactor(ps, lr=1e-2), False),
        "transformers Adafactor": (
            lambda ps: Adafactor(ps, lr=1e-2, relative_step=False, scale_parameter=False),
            False,
        ),
        "bnb AdamW8bit": (lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2), True),
        "bnb PagedAdamW": (lambda ps: bnb.optim.PagedAdamW(ps, lr=1e-2), True),
        "bnb PagedAdamW8bit": (lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-2), True),
    }


def _grads(step: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(100 + step))


def _state_tensors(opt, p) -> dict[str, torch.Tensor]:
    """The optimizer's per-element state of ``p`` in fp32 (8-bit state dequantised)."""
    import bitsandbytes.functional as F

    st = opt.state[p]
    out = {}
    for k, v in st.items():
        if not torch.is_tensor(v) or v.shape != p.shape:
            continue
        if v.dtype == torch.uint8:
            i = k[-1]
            v = F.dequantize_blockwise(v, absmax=st[f"absmax{i}"], code=st[f"qmap{i}"], blocksize=256)
        out[k] = v.float()
    return out


@pytest.mark.parametrize("keep", [KEEP_LARGE, KEEP_SMALL], ids=["8192-rows", "2000-rows"])
@pytest.mark.parametrize("name", list(_factories()))
def test_one_step_after_compaction_equals_a_twin(name, keep, recwarn):
    make, elementwise = _factories()[name]
    torch.manual_seed(0)
    p0 = torch.randn(N)
    a = nn.Parameter(p0.clone())
    opt_a = make([a])
    b = nn.Parameter(p0[keep].clone())  # the twin: only ever the kept rows
    opt_b = make([b])
    for t in range(3):
        a.grad, b.grad = _grads(t), _grads(t)[keep]
        opt_a.step()
        opt_b.step()
    new = nn.Parameter(a.detach()[keep].clone())
    swap_param(opt_a, a, new, keep)
    assert opt_a.param_groups[0]["params"][0] is new and a not in opt_a.state
    eight_bit = "8bit" in name
    got, want = _state_tensors(opt_a, new), _state_tensors(opt_b, b)
    assert set(got) == set(want) and got
    for k in want:
        if eight_bit:  # re-quantised with fresh block maxima: within 8-bit quantisation of the twin's state
            err = (got[k] - want[k]).abs().max() / want[k].abs().max()
            assert err < 0.02, (k, float(err))
        elif elementwise:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        else:  # Adafactor: elementwise state, but its step size reads the whole tensor's RMS
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)
    if eight_bit and keep.numel() < 4096:  # as bitsandbytes would for a parameter this small: fp32 state
        assert opt_a.state[new]["state1"].dtype == torch.float32 == opt_b.state[b]["state1"].dtype
    if not elementwise:
        return
    before_a, before_b = new.detach().clone(), b.detach().clone()
    new.grad, b.grad = _grads(3)[keep], _grads(3)[keep]
    opt_a.step()
    opt_b.step()
    da, db = new.detach() - before_a, b.detach() - before_b
    # the 3 steps before compaction: 8-bit moments of the full tensor vs of the rows alone differ by
    # quantisation, so the parameters do too (lr 1e-2: well under one step)
    torch.testing.assert_close(before_a, before_b, rtol=1e-5, atol=1e-6 if not eight_bit else 5e-3)
    rel = float((da - db).norm() / db.norm())
    assert rel < (0.05 if eight_bit else 1e-5), (name, rel)


def test_state_that_cannot_be_carried_fails_before_anything_changes():
    from conftest import tiny_model

    from prunepeft import SpaceConfig, attach

    model, batch = tiny_model("bert")
    h = attach(model, SpaceConfig(lora_targets=("q", "v"), serial_adapter_targets=()))
    opt = torch.optim.AdamW(list(h.parameters()), lr=1e-3)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    opt.state[h.bank.flat]["preconditioner"] = torch.zeros(3, 3)  # e.g. Shampoo-like matrix state
    flat, mask = h.bank.flat, h.bank.block_mask.clone()
    with pytest.raises(ValueError, match="cannot carry it through compaction"):
        h.prune_to_budget(h.num_trainable() // 2, torch.rand(h.bank.num_blocks), optimizer=opt)
    assert h.bank.flat is flat and torch.equal(h.bank.block_mask, mask)  # nothing changed
    with pytest.raises(ValueError, match="cannot carry"):
        check_carriable(opt, flat)


@pytest.mark.parametrize("optim", ["adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_bnb_8bit"])
def test_trainer_optim_names_work_with_the_callback(tmp_path, optim, recwarn):
    from conftest import tiny_model
    from test_callback import _cfg, _trainer

    from prunepeft.callback import PrunePEFTCallback

    model, _ = tiny_model("bert", hidden=64)  # big enough for 8-bit state (>= 4096 elements)
    cb = PrunePEFTCallback(model, _cfg(budget=8000))
    trainer = _trainer(model, cb, tmp_path, 3 + 3 * 3 + 1, optim=optim)
    trainer.train()
    assert cb.pruner.done and cb.handle.num_trainable() <= 8000
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert any(p is cb.handle.bank.flat for g in inner.param_groups for p in g["params"])
    st = inner.state[cb.handle.bank.flat]
    assert all(v.shape == cb.handle.bank.flat.shape for v in st.values() if torch.is_tensor(v) and v.numel() > 1
               and v.shape[0] == cb.handle.bank.flat.shape[0])  # fmt: skip
