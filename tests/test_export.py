"""Export: peft LoRA adapters that reload with PeftModel.from_pretrained, and prunepeft's own save/load."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers as T
from conftest import tiny_config, tiny_model
from peft import PeftModel
from peft.utils.other import get_pattern_key

from prunepeft import SpaceConfig, attach
from prunepeft.export import CONFIG_NAME, WEIGHTS_NAME, export_peft, is_lora_only, load, save
from prunepeft.modules import BottleneckSite

LORA_ALL = SpaceConfig(lora_targets=("all",), lora_rank=8, serial_adapter_targets=(), block_size=4)
ALL_KINDS = SpaceConfig(
    lora_targets=("all",),
    lora_rank=8,
    serial_adapter_targets=("attn", "ffn"),
    parallel_adapter_targets=("up",),
    adapter_width=8,
    block_size=4,
)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@torch.no_grad()
def _randomize(handle, seed=0):
    """Non-zero values everywhere (so every candidate contributes), the head too."""
    g = torch.Generator().manual_seed(seed)
    flat = handle.bank.flat
    flat.copy_(torch.randn(flat.shape, generator=g) * 0.2)
    for p in handle.head_parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _mask_some(handle, seed=0):
    """Mask 0, 1 or all blocks of each candidate (cycling), choosing which blocks at random."""
    g = torch.Generator().manual_seed(seed)
    bank, drop = handle.bank, []
    for c in range(bank.num_candidates):
        blocks = list(bank.candidate_blocks(c))
        n = c % 3 if len(blocks) > 1 else 0
        drop += [blocks[i] for i in torch.randperm(len(blocks), generator=g)[:n].tolist()]
    handle.mask_blocks(drop)


def _peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(path)).eval()


@pytest.mark.parametrize(
    "model_type, compact",
    [("bert", False), ("bert", True), ("roberta", True), ("llama", True), ("gpt2", False), ("t5", True)],
)
def test_export_peft_reloads_with_peft(tmp_path, model_type, compact):
    model, batch = tiny_model(model_type)
    base = copy.deepcopy(model)
    handle = attach(model, LORA_ALL)
    _randomize(handle)
    _mask_some(handle)
    if compact:
        handle.compact()
        handle.mask_blocks([0])  # masked on top of a compacted bank
    widths = handle.bank.effective_widths()
    assert {0, 4, 8} <= set(widths)
    expected = _logits(model, batch)
    assert (expected - _logits(base, batch)).abs().max() > 1e-2  # the LoRAs and the head contribute
    flat_before = handle.bank.flat.detach().clone()
    mask_before = handle.bank.block_mask.clone()

    assert is_lora_only(handle)
    out = export_peft(handle, tmp_path / "adapter")
    # the handle is untouched
    torch.testing.assert_close(handle.bank.flat.detach(), flat_before, rtol=0, atol=0)
    assert torch.equal(handle.bank.block_mask, mask_before)

    cfg = json.loads((out / "adapter_config.json").read_text())
    live = {s.site: w for s, w in zip(handle.bank.specs, widths, strict=True) if w}
    assert sorted(cfg["target_modules"]) == sorted(live)
    assert cfg["rank_pattern"] == live and cfg["r"] > 0
    assert all(v > 0 for v in cfg["rank_pattern"].values())
    assert "^" not in json.dumps(cfg)
    assert {k: v / live[k] for k, v in cfg["alpha_pattern"].items()} == dict.fromkeys(live, 2.0)
    assert cfg["fan_in_fan_out"] == (model_type == "gpt2")
    head = {
        "bert": ["classifier"],
        "roberta": ["classifier"],
        "llama": ["score"],
        "gpt2": ["score"],
        "t5": None,
    }
    head = head[model_type]  # roberta's two-layer head is saved as one module
    assert cfg["modules_to_save"] == head
    assert cfg["task_type"] == ("SEQ_2_SEQ_LM" if model_type == "t5" else "SEQ_CLS")

    peft_model = _peft_load(base, out)
    torch.testing.assert_close(_logits(peft_model, batch), expected, rtol=1e-5, atol=1e-6)
    lora_modules = {n: m for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert {n: m.r["default"] for n, m in lora_modules.items()} == live
    assert all(m.scaling["default"] == 2.0 for m in lora_modules.values())


def test_export_peft_twelve_layers_exact_keys(tmp_path):
    """``layer.1`` keys must not catch ``layer.11`` (peft matches rank_pattern keys as regex suffixes)."""
    cfg = tiny_config("bert")
    cfg.num_hidden_layers, cfg.num_labels = 12, 3
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    base = copy.deepcopy(model)
    handle = attach(model, SpaceConfig(lora_targets=("q",), lora_rank=8, serial_adapter_targets=()))
    _randomize(handle)
    names = [s.site for s in handle.bank.specs]
    q = "bert.encoder.layer.{}.attention.self.query"
    handle.mask_blocks([handle.bank.candidate_blocks(names.index(q.format(1)))[0]])  # layer 1: rank 4
    handle.mask_candidates([q.format(10) + ":lora"])  # layer 10: rank 0, not a target
    expected = _logits(model, batch)
    out = export_peft(handle, tmp_path / "a")

    pattern = json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern[q.format(1)] == 4 and pattern[q.format(11)] == 8 and q.format(10) not in pattern
    for name in pattern:
        assert get_pattern_key(list(pattern), name) == name
    peft_model = _peft_load(base, out)
    layers = peft_model.base_model.model.bert.encoder.layer
    assert layers[1].attention.self.query.r["default"] == 4
    assert layers[11].attention.self.query.r["default"] == 8
    assert not hasattr(layers[10].attention.self.query, "lora_A")
    torch.testing.assert_close(_logits(peft_model, batch), expected, rtol=1e-5, atol=1e-6)


def test_export_peft_refuses_adapters(tmp_path):
    model, _ = tiny_model("bert")
    handle = attach(model, ALL_KINDS)
    assert not is_lora_only(handle)
    with pytest.raises(ValueError, match=r"serial_adapter.*prunepeft\.export\.save"):
        export_peft(handle, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    # once every adapter is pruned, the kept set is LoRA-only and exports
    handle.mask_candidates([i for i, s in enumerate(handle.bank.specs) if s.kind != "lora"])
    assert is_lora_only(handle)
    export_peft(handle, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    # nothing live: peft cannot express it
    handle.mask_candidates(range(handle.bank.num_candidates))
    assert not is_lora_only(handle)
    with pytest.raises(ValueError, match="nothing to export"):
        export_peft(handle, tmp_path / "b")


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "t5"])
def test_save_load_round_trip_all_kinds(tmp_path, model_type):
    model, batch = tiny_model(model_type)
    base = copy.deepcopy(model)
    handle = attach(model, ALL_KINDS)
    assert {s.kind for s in handle.bank.specs} == {"lora", "serial_adapter", "parallel_adapter"}
    _randomize(handle)
    _mask_some(handle, seed=1)
    handle.compact()
    _mask_some(handle, seed=2)  # and masked again on the compacted bank
    expected = _logits(model, batch)
    assert (expected - _logits(base, batch)).abs().max() > 1e-2
    extra = {"budget": 1234, "history": [{"round": 0, "loss": 1.5}]}
    out = save(handle, tmp_path / "run", extra=extra)
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["extra"] == extra and meta["model_type"] == model_type
    assert [c["width"] for c in meta["candidates"]] == handle.bank.effective_widths()

    loaded = load(base, out)
    assert loaded.bank.widths() == handle.bank.effective_widths()
    assert loaded.num_trainable(include_head=True) == handle.num_trainable(include_head=True)
    torch.testing.assert_close(_logits(base, batch), expected, rtol=1e-6, atol=1e-6)
    # the loaded handle is a normal supernet: it trains and detaches
    loaded.optimizer(lr=1e-3)
    loaded.detach()
    assert not any(isinstance(m, BottleneckSite) for m in base.modules())


def test_load_errors(tmp_path):
    model, _ = tiny_model("bert")
    handle = attach(model, ALL_KINDS)
    _randomize(handle)
    out = save(handle, tmp_path / "run")

    other, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="saved from a 'bert' model, not 'llama'"):
        load(other, out)

    cfg = tiny_config("bert")
    cfg.num_hidden_layers, cfg.num_labels = 3, 3
    deeper = T.BertForSequenceClassification(cfg)
    with pytest.raises(ValueError, match=r"candidates do not match.*not saved: \['bert\.encoder\.layer\.2"):
        load(deeper, out)
    assert not any(isinstance(m, BottleneckSite) for m in deeper.modules())

    fresh, _ = tiny_model("bert")
    weights = out / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load(fresh, out)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="prunepeft_weights.safetensors is missing"):
        load(fresh, out)
    weights.write_bytes(data)
    meta = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ValueError, match="unknown format version 99"):
        load(fresh, out)
    (out / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is corrupt"):
        load(fresh, out)
    assert not any(isinstance(m, BottleneckSite) for m in fresh.modules())
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load(fresh, tmp_path / "nowhere")


def test_save_is_atomic(tmp_path, monkeypatch):
    model, _ = tiny_model("bert")
    handle = attach(model, ALL_KINDS)
    out = save(handle, tmp_path / "run", extra={"v": 1})
    _randomize(handle)

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save(handle, out, extra={"v": 2})
    monkeypatch.undo()
    # the earlier save is intact and nothing is left behind
    assert json.loads((out / CONFIG_NAME).read_text())["extra"] == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    save(handle, out, extra={"v": 3})  # overwrite in place
    assert json.loads((out / CONFIG_NAME).read_text())["extra"] == {"v": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save(handle, tmp_path / "bad", extra={"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
