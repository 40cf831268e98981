"""bench/bench_step.py's floor of the full supernet's step (issue 12's 0.85x goal).

The floor is the base model's own work (``base_frozen``) plus the fewest FLOPs the candidates need
(``adapter_flops``) at the best GEMM rate. Here, counted by torch's FLOP counter on MiniLM: the
supernet's step does exactly the base's FLOPs plus ``adapter_flops`` (so the bound is tight, not a
guess), peft LoRA of equal size does no fewer, and ``base_frozen`` runs backward exactly as far as
the supernet does (through layer 0's q, k, v outputs, not into the embeddings).
"""

from __future__ import annotations

import copy

import pytest
from conftest import bench_module
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture(scope="module")
def setup():
    bs = bench_module("bench_step")
    base, tok = bs.load_minilm()
    batch = bs.make_batch(tok, 2, 16)
    model = copy.deepcopy(base)
    bank = bs.build_supernet(model).bank
    no_dx = bs.sites_without_input_grad(model, bank, batch)
    ranks = bs.equal_lora_ranks(model, bs.site_params(bank))
    return bs, base, batch, bank, no_dx, ranks


def _flops(bs, v, base, batch) -> int:
    step, _, _ = bs.prepare(v, base, batch, "cpu")
    step()
    with FlopCounterMode(display=False) as fc:
        step("train" if v["kind"] == "base" else "backward")
    return fc.get_total_flops()


def test_only_layer0_qkv_sites_read_an_input_without_gradient(setup):
    _, _, _, _, no_dx, _ = setup
    assert no_dx == [f"bert.encoder.layer.0.attention.self.{n}" for n in ("key", "query", "value")]


def test_supernet_step_is_base_work_plus_adapter_flops_and_peft_does_no_fewer(setup):
    bs, base, batch, bank, no_dx, ranks = setup
    tokens = batch["input_ids"].numel()
    need = bs.adapter_flops(bank, tokens, no_dx)
    base_f = _flops(bs, dict(variant="base_frozen", kind="base", state="full", no_dx=no_dx), base, batch)
    sup = _flops(bs, dict(variant="supernet_full", kind="supernet", state="full", keep=None), base, batch)
    peft = _flops(bs, dict(variant="peft_equal_full", kind="peft", state="full", ranks=ranks), base, batch)
    # the classifier head's weight gradient is the only extra (a few kFLOP); a base step that also
    # back-propagated into the embeddings would count layer 0's q, k, v input gradients as base
    # work and fail the lower end
    assert need <= sup - base_f <= need * 1.001
    assert peft - base_f >= need


def test_base_frozen_step_trains_nothing_and_gemm_rate_is_positive(setup):
    bs, base, batch, _, no_dx, _ = setup
    step, trainable, bank = bs.prepare(
        dict(variant="base_frozen", kind="base", no_dx=no_dx), base, batch, "cpu"
    )
    step()
    assert trainable == 0 and bank is None
    assert bs.gemm_peak_gflops(base, 32, repeat=1) > 0
    assert 0 < bs.adamw_seconds(1000, repeat=1) < 1
