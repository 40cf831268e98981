"""``prunepeft plan``: the supernet attached on the meta device, parameter counts equal to a real
attach, the memory estimate's terms (weights, bank state, activations measured against autograd's
saved tensors), the per-phase estimate, the CLI subcommand and its errors.

Every model here is built from a config in code (nothing is downloaded); the 7B-70B shapes live on
the meta device, so the whole file runs in seconds on CPU.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import transformers as T
from conftest import tiny_config

from prunepeft import SpaceConfig, attach
from prunepeft.config import default_search_space
from prunepeft.planner import add_parser, build_meta_model, format_plan, plan_model, run
from prunepeft.scheduler import base_param_count, default_budget, resolve_budget

RICH = SpaceConfig(lora_targets=("all",), lora_rank=8, serial_adapter_targets=("attn", "ffn"),
                   parallel_adapter_targets=("up",), adapter_width=8, block_size=4)  # fmt: skip
PAPER = SpaceConfig()  # the paper's space (LoRA r=8 on q, v; a serial adapter w=16 after the FFN)


def _llama_like_params(L, h, f, heads, kv_heads, vocab, tied=False, qkv_bias=False):
    """Parameters of a Llama-family decoder (embeddings, attention, gated FFN, RMSNorms, lm_head)."""
    kv = h // heads * kv_heads
    attn = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if qkv_bias else 0)
    layer = attn + 3 * h * f + 2 * h
    return vocab * h * (1 if tied else 2) + L * layer + h


# (name, config, tied, qkv bias); LlamaConfig() is the 7B shape
BIG = [
    ("llama-7b", T.LlamaConfig(), False, False),
    (
        "llama-13b",
        T.LlamaConfig(
            num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40
        ),
        False,
        False,
    ),  # fmt: skip
    (
        "llama-70b",
        T.LlamaConfig(
            num_hidden_layers=80,
            hidden_size=8192,
            intermediate_size=28672,
            num_attention_heads=64,
            num_key_value_heads=8,
        ),
        False,
        False,
    ),  # fmt: skip
    ("mistral-7b", T.MistralConfig(), False, False),
    ("qwen2-7b", T.Qwen2Config(), False, True),
]


# ------------------------------------------------------------------------------ meta attach
def test_attach_on_meta_matches_a_real_attach():
    cfg = tiny_config("llama", hidden=64)
    real = T.AutoModelForCausalLM.from_config(cfg)
    with torch.device("meta"):
        meta = T.AutoModelForCausalLM.from_config(cfg)
    hr, hm = attach(real, RICH), attach(meta, RICH)
    assert hm.bank.flat.is_meta and hm.bank.block_mask.device.type == "cpu"
    assert [s.name for s in hm.bank.specs] == [s.name for s in hr.bank.specs]
    assert hm.bank.widths() == hr.bank.widths()
    assert hm.num_trainable() == hr.num_trainable() == hr.space.supernet_params()
    # the dense path is untouched: real values, initialised (D kaiming-uniform, Ut zero)
    assert not hr.bank.flat.is_meta and hr.bank.block_mask.device == hr.bank.flat.device
    t = hr.bank.candidate_tensors(0)
    assert t["D"].abs().sum() > 0 and t["Ut"].abs().sum() == 0
    # the host bookkeeping works on meta: masking changes the counts as on the real bank
    for h in (hr, hm):
        h.mask_candidates([0])
    assert hm.num_trainable() == hr.num_trainable() < hr.space.supernet_params()
    hm.detach()
    assert not hasattr(meta, "prunepeft_bank")


# ------------------------------------------------------------------------------ exact counts
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
@pytest.mark.parametrize("space", [SpaceConfig(), RICH], ids=["default", "rich"])
def test_plan_counts_equal_a_real_attach(family, space):
    cfg = tiny_config(family, hidden=64)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    base = base_param_count(model)
    handle = attach(model, space)
    bank = handle.bank
    plan = plan_model(cfg, space)
    assert plan.base_params == base
    assert plan.num_candidates == bank.num_candidates
    assert plan.supernet_params == handle.num_trainable()
    for s in plan.by_kind:
        ids = [c for c in range(bank.num_candidates) if bank.specs[c].kind == s.name]
        assert s.candidates == len(ids)
        assert s.params == sum(bank.candidate_params(c) for c in ids)
    for slices in (plan.by_kind, plan.by_partition, plan.by_role):
        assert sum(s.params for s in slices) == plan.supernet_params
        assert sum(s.candidates for s in slices) == plan.num_candidates
        assert all(s.params == sum(s.params_by_kind.values()) for s in slices)
    for s in plan.by_role:
        assert s.params == sum(
            bank.candidate_params(c) for c, sp in enumerate(bank.specs) if sp.role == s.name
        )
    assert plan.budget == default_budget(handle.space)
    assert plan_model(cfg, space, budget="0.5%").budget == resolve_budget("0.5%", base)
    assert plan_model(cfg, space, budget=0.004).budget == resolve_budget(0.004, base)
    assert plan_model(cfg, space, budget=1000).budget == 1000


def test_classification_plan_counts_the_head():
    cfg = tiny_config("llama", hidden=64)
    model = T.AutoModelForSequenceClassification.from_config(tiny_config("llama", hidden=64))
    handle = attach(model, SpaceConfig())
    plan = plan_model(cfg, SpaceConfig(), task="classification")
    assert plan.head_params == sum(p.numel() for p in handle.head_parameters()) == 2 * 64
    assert plan.supernet_params == handle.num_trainable()
    assert "activations: head input" in [t.name for t in plan.memory]
    assert plan.term("head: grads, AdamW").bytes == 2 * 64 * 3 * 2


def test_partitions_follow_the_space():
    cfg = T.LlamaConfig(num_hidden_layers=10, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                        vocab_size=100)  # fmt: skip
    plan = plan_model(cfg, PAPER)
    assert [s.name for s in plan.by_partition] == ["0-20%", "20-50%", "50-80%", "80-100%"]
    assert [s.detail for s in plan.by_partition] == ["layers 0-1", "layers 2-4", "layers 5-7", "layers 8-9"]
    per_layer = plan.supernet_params // 10
    assert [s.params for s in plan.by_partition] == [
        2 * per_layer,
        3 * per_layer,
        3 * per_layer,
        2 * per_layer,
    ]


# ------------------------------------------------------------------------------ 7B - 70B on meta
@pytest.mark.parametrize("name,cfg,tied,qkv_bias", BIG, ids=[b[0] for b in BIG])
def test_big_models_plan_on_meta(name, cfg, tied, qkv_bias):
    L, h, f = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    kv = h // cfg.num_attention_heads * (cfg.num_key_value_heads or cfg.num_attention_heads)
    plan = plan_model(
        cfg, PAPER
    )  # the paper's space: LoRA r=8 on q, v; serial adapter width 16 after the FFN
    expected_base = _llama_like_params(L, h, f, cfg.num_attention_heads, cfg.num_key_value_heads or
                                       cfg.num_attention_heads, cfg.vocab_size, tied, qkv_bias)  # fmt: skip
    assert plan.base_params == expected_base
    known = {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama-70b": 68_976_648_192,
             "mistral-7b": 7_241_732_096}  # fmt: skip
    if name in known:
        assert plan.base_params == known[name]
    by_kind = {s.name: s for s in plan.by_kind}
    assert by_kind["lora"].params == L * 8 * ((h + h) + (h + kv)) and by_kind["lora"].candidates == 2 * L
    assert by_kind["serial_adapter"].params == L * (16 * (2 * h + 1) + h)
    assert by_kind["parallel_adapter"].params == 0 and by_kind["parallel_adapter"].candidates == 0
    assert plan.supernet_params == by_kind["lora"].params + by_kind["serial_adapter"].params
    assert plan.budget == L * 8 * ((h + h) + (h + kv))  # peft LoRA r=8 on q, v
    assert plan.budget_percent == pytest.approx(100 * plan.budget / expected_base)
    assert plan.num_layers == L and plan.hidden_size == h
    # bank state: 16 B per trainable parameter (fp32 master, grad, AdamW) + 8 B AdaLoRA statistics
    assert plan.term("bank: masters, grads, AdamW").bytes == 16 * plan.supernet_params
    assert plan.term("bank: AdaLoRA statistics").bytes == 8 * plan.supernet_params
    assert plan.term("base weights").bytes == 2 * expected_base  # bf16


def test_base_weights_by_precision_and_4bit_formula():
    cfg = T.LlamaConfig()
    fp32 = plan_model(cfg, PAPER, dtype="float32")
    bf16 = plan_model(cfg, PAPER)
    q4 = plan_model(cfg, PAPER, load_in_4bit=True)
    w32, w16, w4 = (p.term("base weights").bytes for p in (fp32, bf16, q4))
    assert w32 == 2 * w16 == 4 * bf16.base_params
    # NF4: every linear of the layers (not lm_head) at 0.5 B + 1 B absmax per 64 + 4 B per 64*256 (+ 4 B
    # offset per tensor); embeddings, lm_head and norms stay bf16
    h, f, L, V = 4096, 11008, 32, 32000
    per_layer = [h * h] * 4 + [h * f] * 3
    q_bytes = L * sum(n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 for n in per_layer)
    rest = 2 * V * h + (2 * L + 1) * h
    assert w4 == q_bytes + 2 * rest
    assert 3.5 * 2**30 < w4 < 4.0 * 2**30 < w16 < w32
    assert q4.peak_bytes < bf16.peak_bytes < fp32.peak_bytes
    assert q4.base_precision == "nf4 + bfloat16" and "double quant" in q4.term("base weights").formula


# ------------------------------------------------------------------------------ phases
@pytest.mark.parametrize("schedule", ["linear", "cubic"])
def test_the_estimate_shrinks_round_by_round(schedule):
    plan = plan_model(T.LlamaConfig(), PAPER, rounds=5, schedule=schedule, budget="0.02%")
    assert len(plan.phases) == plan.rounds + 1 == 6
    trains = [p.trainable_params for p in plan.phases]
    assert trains == [plan.supernet_params, *plan.targets] and trains[-1] == plan.budget
    totals = [p.total_bytes for p in plan.phases]
    assert all(a > b for a, b in zip(totals, totals[1:], strict=False))
    for p in plan.phases:
        assert p.total_bytes == plan.category_bytes("weights") + plan.category_bytes("runtime") + (
            p.optimizer_bytes + p.activation_bytes
        )
    assert plan.phases[0].total_bytes == sum(t.bytes for t in plan.memory) == plan.peak_bytes
    # compaction holds old and new state: more than the state alone, never the activations
    first = plan.phases[0]
    assert first.compaction_bytes > first.total_bytes - first.activation_bytes
    assert plan.phases[-1].compaction_bytes == 0


# ------------------------------------------------------------------------------ activations
def _saved_bytes(model, batch, vocab: int) -> int:
    """Bytes autograd keeps for backward (distinct storages, parameters and logits excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if t.is_floating_point() and st.data_ptr() not in params and t.shape[-1:] != (vocab,):
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("space", [SpaceConfig(), RICH], ids=["default", "rich"])
def test_activation_estimate_matches_what_autograd_keeps(dtype, space):
    """The activation terms (logits aside) against the tensors autograd saves on CPU (reference
    kernels, SDPA, a padded batch): an upper bound within 10 %."""
    V, B, L = 97, 2, 64
    cfg = T.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=V, max_position_embeddings=128, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    attach(model, space)
    model.train()
    ids = torch.randint(1, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, -7:] = 0
    measured = _saved_bytes(model, {"input_ids": ids, "attention_mask": mask, "labels": ids}, V)
    plan = plan_model(cfg, space, dtype=dtype, batch_size=B, max_length=L, backend="reference")
    estimate = plan.category_bytes("activations") - plan.term("activations: logits").bytes
    assert measured <= estimate <= 1.1 * measured
    assert plan.term("activations: logits").bytes == B * L * V * (
        torch.empty((), dtype=getattr(torch, dtype)).element_size() + 8
    )


def test_training_shares_one_input_copy_per_layout_group():
    """Training groups the sites that share an input on either path: q and v read one fp32 copy."""
    cfg = T.LlamaConfig()
    tri, ref = (
        plan_model(cfg, PAPER, backend=b).term("activations: candidate inputs")
        for b in ("triton", "reference")
    )
    tokens, h, L = 8 * 512, 4096, 32
    assert tri.bytes == ref.bytes == tokens * L * (h + h) * 4  # q and v one copy; the serial adapter its own
    same = plan_model(cfg, PAPER, dtype="float32").term("activations: candidate inputs")
    assert same.bytes == tri.bytes  # no cast: q and v share the norm's output


# ------------------------------------------------------------------------------ output and CLI
def test_format_plan_prints_the_tables():
    plan = plan_model(T.LlamaConfig(), PAPER, gpu_memory_gib=80)
    text = format_plan(plan)
    for needle in ("Candidates by kind", "Candidates by depth partition", "Candidates by site role",
                   "Budget: 4,194,304 parameters", "Memory estimate", "Per phase", "warm-up + round 1",
                   "final training", "base weights", "6,738,415,616", "fits in 80.00 GiB", "Assumptions"):  # fmt: skip
        assert needle in text, needle
    for t in plan.memory:
        assert t.name in text and t.formula in text


def _parser():
    parser = argparse.ArgumentParser(prog="prunepeft")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_plan_subcommand(tmp_path, capsys):
    cfg = tiny_config("llama", hidden=64)
    cfg.save_pretrained(tmp_path)
    args = _parser().parse_args(["plan", "--model", str(tmp_path), "--lora-targets", "q", "k", "v", "o",
                                 "--lora-rank", "16", "--serial-adapters", "attn", "ffn", "--parallel-adapters",
                                 "up", "--adapter-width", "8", "--block-size", "4", "--load-in-4bit",
                                 "--batch-size", "4", "--max-length", "128", "--budget", "2,000",
                                 "--rounds", "3", "--gpu-memory", "0.25"])  # fmt: skip
    assert args.func is run
    assert run(args) == 0
    text = capsys.readouterr().out
    space = SpaceConfig(lora_targets=("q", "k", "v", "o"), lora_rank=16, serial_adapter_targets=("attn", "ffn"),
                        parallel_adapter_targets=("up",), adapter_width=8, block_size=4)  # fmt: skip
    plan = plan_model(cfg, space, load_in_4bit=True, batch_size=4, max_length=128, budget="2,000", rounds=3,
                      gpu_memory_gib=0.25)  # fmt: skip
    assert text.strip() == format_plan(plan).strip()
    assert "Budget: 2,000 parameters" in text and "nf4 + bfloat16" in text and "does NOT fit" in text
    # a config.json path and the classification task work too
    args = _parser().parse_args(
        ["plan", "--model", str(tmp_path / "config.json"), "--task", "classification"]
    )
    assert run(args) == 0
    assert "activations: head input" in capsys.readouterr().out


def test_plan_defaults_to_what_search_attaches(tmp_path, capsys):
    """With no space flag, plan counts the supernet ``search()`` / ``prunepeft search`` would attach."""
    cfg = tiny_config("llama", hidden=64)
    cfg.save_pretrained(tmp_path)
    plan = plan_model(cfg)
    assert plan.supernet_params == plan_model(cfg, default_search_space()).supernet_params
    model = T.AutoModelForCausalLM.from_config(cfg)
    assert plan.supernet_params == attach(model, default_search_space()).num_trainable()
    assert run(_parser().parse_args(["plan", "--model", str(tmp_path)])) == 0
    assert capsys.readouterr().out.strip() == format_plan(plan).strip()


# ------------------------------------------------------------------------------ errors
def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        plan_model(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        plan_model(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(ValueError, match="'not-a-model'.*not known to transformers"):
        plan_model(tmp_path)
    neox = T.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    with pytest.raises(ValueError, match="'gpt_neox' is not in prunepeft's architecture registry.*llama"):
        plan_model(neox)
    cfg = tiny_config("llama", hidden=64)
    with pytest.raises(ValueError, match="lora_targets: unknown site 'query' for llama"):
        plan_model(cfg, SpaceConfig(lora_targets=("query",)))
    with pytest.raises(ValueError, match="budget .* is above the supernet"):
        plan_model(cfg, budget=10**9)
    gpt2 = tiny_config("gpt2")
    with pytest.raises(ValueError, match="gpt2 has no separate q/v projections.*--budget"):
        plan_model(gpt2, SpaceConfig(lora_targets=("qkv",)))
    assert plan_model(gpt2, SpaceConfig(lora_targets=("qkv",)), budget=100).budget == 100
    with pytest.raises(ValueError, match="task must be one of"):
        plan_model(cfg, task="regression")
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        plan_model(cfg, batch_size=0)


def test_meta_model_has_no_storage():
    model = build_meta_model(T.LlamaConfig(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                                           num_attention_heads=64, num_key_value_heads=8))  # fmt: skip
    assert all(p.is_meta for p in model.parameters())
