"""The supernet on tiny models of every registered architecture: attach, train, mask, compact, detach."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, tiny_model, train_steps
from torch import nn

import prunepeft
from prunepeft import SearchSpace, SpaceConfig, attach
from prunepeft.modules import BottleneckSite

ALL_KINDS = SpaceConfig(
    lora_targets=("all",),
    lora_rank=8,
    serial_adapter_targets=("attn", "ffn"),
    parallel_adapter_targets=("up",),
    adapter_width=8,
    block_size=4,
    trainable_modules=(),
)


def _logits(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits


def _train(model, handle, batch, steps, lr=1e-2, opt=None):
    opt = opt or handle.optimizer(lr=lr)
    return opt, train_steps(model, opt, batch, steps)


def test_every_architecture_is_registered():
    for a in ARCHS:
        assert a in prunepeft.ARCHITECTURES


@pytest.mark.parametrize("model_type", ARCHS)
def test_attach_train_mask_compact_detach(model_type):
    model, batch = tiny_model(model_type)
    before = _logits(model, batch)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}

    handle = attach(model, ALL_KINDS)
    kinds = {c.kind for c in handle.space.candidates}
    assert kinds == {"lora", "serial_adapter", "parallel_adapter"}
    assert handle.space.num_layers == (4 if model_type == "t5" else 2)
    # only the bank trains
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prunepeft_bank.flat"]
    torch.testing.assert_close(_logits(model, batch), before, rtol=0, atol=0)

    opt, losses = _train(model, handle, batch, steps=6)
    assert losses[-1] < losses[0] - 1e-3, losses

    # mask a random third of the blocks; compact; same outputs and the same next steps
    g = torch.Generator().manual_seed(1)
    nb = handle.bank.num_blocks
    drop = torch.randperm(nb, generator=g)[: nb // 3].tolist()
    handle.mask_blocks(drop)
    masked_params = handle.num_trainable()
    masked_out = _logits(model, batch)
    twin = copy.deepcopy((model, handle, opt))  # masked twin keeps training without compaction
    handle.compact(optimizer=opt)
    assert handle.bank.num_blocks == nb - len(drop)
    assert handle.num_trainable(effective=False) == masked_params == handle.num_trainable()
    torch.testing.assert_close(_logits(model, batch), masked_out, rtol=1e-5, atol=1e-6)
    _train(model, handle, batch, steps=3, opt=opt)
    t_model, t_handle, t_opt = twin
    _train(t_model, t_handle, batch, steps=3, opt=t_opt)
    torch.testing.assert_close(_logits(model, batch), _logits(t_model, batch), rtol=1e-4, atol=1e-5)

    restored = handle.detach()
    assert restored is model
    assert not any(isinstance(m, BottleneckSite) for m in model.modules())
    assert not hasattr(model, "prunepeft_bank")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    for k in state_before:
        torch.testing.assert_close(state_after[k], state_before[k], rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, batch), before, rtol=0, atol=0)


def test_compaction_gathers_optimizer_state():
    model, batch = tiny_model("bert")
    handle = attach(model, SpaceConfig(lora_targets=("q", "v"), trainable_modules=()))
    opt, _ = _train(model, handle, batch, steps=2)
    bank = handle.bank
    old = bank.flat.detach().clone()
    old_state = {k: v.clone() for k, v in opt.state[bank.flat].items() if torch.is_tensor(v) and v.dim()}
    handle.mask_blocks([0, 3, 5])
    gather = bank.compact(optimizer=opt)
    assert opt.param_groups[0]["params"][0] is bank.flat
    torch.testing.assert_close(bank.flat.detach(), old[gather])
    for k, v in old_state.items():
        torch.testing.assert_close(opt.state[bank.flat][k], v[gather])
    assert bank.orig_block.tolist() == [b for b in range(bank.num_blocks + 3) if b not in (0, 3, 5)]


def test_default_space_is_the_papers_and_head_trains():
    model, batch = tiny_model("bert")
    handle = attach(model)
    kinds = sorted({(c.kind, c.role) for c in handle.space.candidates})
    assert kinds == [("lora", "q"), ("lora", "v"), ("serial_adapter", "down")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prunepeft_bank.flat", "classifier.weight", "classifier.bias"}
    assert handle.num_trainable(include_head=True) == handle.num_trainable() + 32 * 3 + 3


def test_module_names_and_aliases_resolve():
    model, _ = tiny_model("bert")
    space = SearchSpace.from_model(
        model, SpaceConfig(lora_targets=("query", "dense"), serial_adapter_targets=())
    )
    assert sorted({c.role for c in space.candidates}) == ["down", "o", "q", "up"]
    space = SearchSpace.from_model(model, SpaceConfig(lora_targets=(), serial_adapter_targets=("attn",)))
    assert {c.role for c in space.candidates} == {"o"}


def test_explicit_sites_for_unknown_model():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.out = nn.Linear(8, 8)

        def forward(self, x):
            return self.out(torch.relu(self.proj(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    net = Net()
    with pytest.raises(
        ValueError, match=r"not in prunepeft's architecture registry \(supported: bert, .*layers_path"
    ):
        attach(net, SpaceConfig())
    cfg = SpaceConfig(
        layers_path="blocks", sites={"q": "proj", "down": "out"}, lora_targets=("q",), block_size=4
    )
    x = torch.randn(3, 8)
    ref = net(x)
    handle = attach(net, cfg)
    assert len(handle.space.candidates) == 4
    torch.testing.assert_close(net(x), ref)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(lora_targets=("nonexistent",)), "unknown site 'nonexistent'.*known: .*query"),
        (dict(lora_rank=6, block_size=4), "lora_rank 6 is not divisible by block_size 4"),
        (dict(adapter_width=10, block_size=4), "adapter_width 10 is not divisible"),
        (dict(lora_rank=0), "lora_rank must be an integer >= 1"),
        (dict(depth_partitions=(0.5, 0.2)), "depth_partitions"),
        (dict(lora_targets=(), serial_adapter_targets=()), "no targets"),
        (dict(trainable_modules=("nohead",)), "no module named"),
        (dict(layers=(5,)), "layer 5 out of range"),
    ],
)
def test_bad_space_inputs(cfg, match):
    model, _ = tiny_model("bert")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        attach(model, SpaceConfig(**cfg))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not any(isinstance(m, BottleneckSite) for m in model.modules())


def test_model_without_linear_layers():
    net = nn.Sequential(nn.Conv1d(2, 2, 3), nn.ReLU())
    with pytest.raises(ValueError, match="has no Linear layers"):
        attach(net)


def test_attach_twice_is_refused():
    model, _ = tiny_model("bert")
    attach(model)
    with pytest.raises(ValueError, match="already attached"):
        attach(model)


def test_prune_to_budget_blocks_and_modules():
    model, batch = tiny_model("llama")
    handle = attach(
        model,
        SpaceConfig(lora_targets=("q", "k", "v", "o"), serial_adapter_targets=("ffn",), trainable_modules=()),
    )
    opt, _ = _train(model, handle, batch, steps=2)
    bank = handle.bank
    stats = bank.accumulate_stats()
    taylor = stats[: bank.num_blocks, 2] / stats[: bank.num_blocks, 7]
    budget = bank.num_params() // 2
    pruned = handle.prune_to_budget(budget, taylor, granularity="block", optimizer=opt)
    assert 0 < bank.num_params() <= budget
    max_block = max(bank.block_cost(c) + bank.candidate_extra(c) for c in range(bank.num_candidates))
    assert budget - bank.num_params() < max_block
    assert len(pruned) == sum(1 for _ in pruned)
    # module granularity on what is left
    alive = [c for c in range(bank.num_candidates) if bank.widths()[c]]
    scores = torch.arange(bank.num_candidates, dtype=torch.float64)
    budget2 = bank.num_params() - bank.candidate_params(alive[0]) - 1
    pruned = handle.prune_to_budget(budget2, scores, granularity="module", optimizer=opt)
    assert pruned[:1] == [alive[0]]
    assert bank.num_params() <= budget2
    with pytest.raises(ValueError, match="budget must be a positive"):
        handle.prune_to_budget(0, scores, granularity="module")
    with pytest.raises(ValueError, match="granularity"):
        handle.prune_to_budget(10, scores, granularity="layer")
    with pytest.raises(ValueError, match="scores must have shape"):
        handle.prune_to_budget(10, scores[:2], granularity="module")
    _train(model, handle, batch, steps=1, opt=opt)
