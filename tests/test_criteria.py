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
    bank.track_gate = True
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
    bank.track_gate = True
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


# ------------------------------------------------------------------------------ the hybrid strategy
import math  # noqa: E402

from prunepeft.hybrid import (  # noqa: E402
    Assignment,
    HybridStrategy,
    SingleCriterion,
    _normalise,
    _ranks,
    assign_criteria,
    pick_weights,
)


def _values(**per_unit):
    """Criterion values at module granularity: {name: (blocks (unused), per-candidate values)}."""
    return {
        n: (torch.zeros(0, dtype=torch.float64), torch.tensor(v, dtype=torch.float64))
        for n, v in per_unit.items()
    }


def test_ranks_share_ties_and_normalise_to_unit_interval():
    torch.testing.assert_close(
        _ranks(torch.tensor([3.0, 1.0, 2.0, 2.0])), torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(
        _ranks(torch.tensor([7.0, 7.0, 7.0])), torch.full((3,), 0.5, dtype=torch.float64)
    )


def test_normalise_minmax_and_rank_over_eligible_units():
    v = torch.tensor([2.0, 4.0, 6.0, math.inf])
    eligible = torch.tensor([True, True, False, True])
    theta, rank = _normalise(v, eligible, "minmax")
    # +inf (a sanitised non-finite statistic) is clamped to the largest finite value, 4
    torch.testing.assert_close(theta, torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(rank, torch.tensor([0.0, 0.75, 0.0, 0.75], dtype=torch.float64))
    theta_r, _ = _normalise(v, eligible, "rank")
    torch.testing.assert_close(theta_r, rank)
    theta_c, rank_c = _normalise(torch.ones(4), torch.ones(4, dtype=torch.bool))  # constant: no preference
    assert bool((theta_c == 0.5).all()) and bool((rank_c == 0.5).all())


def test_pick_weights_share_boundary_ties_and_constant_criteria_pick_nothing():
    all_ = torch.ones(4, dtype=torch.bool)
    assert pick_weights(torch.tensor([1.0, 2.0, 2.0, 3.0]), all_, 2) == {0: 1.0, 1: 0.5, 2: 0.5}
    assert pick_weights(torch.tensor([5.0, 5.0, 5.0, 5.0]), all_, 2) == {}
    assert pick_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([False, True, True, True]), 1) == {
        1: 1.0
    }


REGIONS = ["lora@0", "lora@0", "serial_adapter@3", "serial_adapter@3", "parallel_adapter@1"]


def test_assign_criteria_counts_ties_own_region_and_fallback():
    values = _values(
        gradient=[1, 2, 10, 20, 30],  # prunes the two lora@0 units first
        activation=[10, 20, 1, 2, 30],  # prunes the two serial adapters first
        taylor=[1, 10, 2, 20, 30],  # one pick in each: its own strongest region is the first on ties
        zeros=[0, 0, 0, 0, 0],  # constant at step 1 (nothing is exactly 0): picks nothing
    )
    a = assign_criteria(values, REGIONS, torch.ones(5, dtype=torch.bool), 2, "module",
                        ["gradient", "activation", "taylor", "zeros"])  # fmt: skip
    assert a.counts["gradient"] == {"lora@0": 2.0, "parallel_adapter@1": 0.0, "serial_adapter@3": 0.0}
    assert a.counts["activation"] == {"lora@0": 0.0, "parallel_adapter@1": 0.0, "serial_adapter@3": 2.0}
    assert a.counts["taylor"] == {"lora@0": 1.0, "parallel_adapter@1": 0.0, "serial_adapter@3": 1.0}
    assert a.counts["zeros"] == {"lora@0": 0.0, "parallel_adapter@1": 0.0, "serial_adapter@3": 0.0}
    assert a.regions == {"lora@0": ["gradient", "taylor"], "serial_adapter@3": ["activation"]}
    assert a.criteria_for("parallel_adapter@1") == ["taylor"]  # nobody picked there: the fallback
    assert Assignment.from_dict(a.to_dict()) == a


def test_assign_criteria_keeps_ties_between_criteria():
    values = _values(gradient=[1, 2, 10, 20, 30], fisher=[2, 1, 10, 20, 30])
    a = assign_criteria(values, REGIONS, torch.ones(5, dtype=torch.bool), 2, "module", ["gradient", "fisher"])
    assert a.regions == {"lora@0": ["gradient", "fisher"]}


def test_eq1_combination_by_hand():
    values = _values(gradient=[1.0, 3.0, 5.0, 9.0, 0.0], activation=[4.0, 0.0, 2.0, 0.0, 8.0])
    regions = ["a", "a", "b", "b", "b"]
    eligible = torch.tensor([True, True, True, True, False])
    s = HybridStrategy(Assignment({"a": ["gradient"], "b": ["activation"]}))
    z = s.scores(values, regions, eligible, "module")
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # gradient over the eligible units [1, 3, 5, 9]: theta (v - 1) / 8, rank pos / 3
    # activation over [4, 0, 2, 0]: theta v / 4; ranks: the two 0s tie at (0 + 1) / 2 -> 0.5 / 3, 2 -> 2 / 3
    want = [sig(0) * 0, sig(1 / 3) * 2 / 8, sig(2 / 3) * 2 / 4, sig(0.5 / 3) * 0, 0.0]
    torch.testing.assert_close(z, torch.tensor(want, dtype=torch.float64))
    p = s.last_probs
    e = [math.exp(x) for x in want[:4]]
    torch.testing.assert_close(p, torch.tensor([x / sum(e) for x in e] + [0.0], dtype=torch.float64))
    # two criteria in one region: the mean of their terms
    s2 = HybridStrategy(Assignment({"a": ["gradient", "activation"], "b": ["activation"]}))
    z2 = s2.scores(values, regions, eligible, "module")
    assert math.isclose(float(z2[0]), (sig(0) * 0 + sig(1.0) * 1.0) / 2)


def test_orientation_low_means_prune():
    from prunepeft.criteria import keep_scores

    v = torch.tensor([0.1, 0.9])
    for name, crit in CRITERIA.items():
        k = keep_scores(v, name)
        # the unit with more (near-)zero weights is the prunable one for zeros / threshold, the smaller
        # value for every other criterion
        assert (k[0] < k[1]) == (not crit.prune_high), name


def test_depth_partitions():
    from prunepeft.space import SearchSpace

    model, _ = tiny_model("bert")
    space = SearchSpace.from_model(model, SpaceConfig())
    space.num_layers = 6  # by the layer's centre: (l + 0.5) / 6 against 0.2 / 0.5 / 0.8
    assert [space.partition_of_layer(layer) for layer in range(6)] == [0, 1, 1, 2, 2, 3]
    space.num_layers = 12
    assert [space.partition_of_layer(layer) for layer in range(12)] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]


def test_strategies_keep_different_sets_when_criteria_disagree():
    values = _values(gradient=[1, 2, 10, 20, 30], activation=[10, 20, 1, 2, 30], taylor=[1, 10, 20, 2, 30])
    eligible = torch.ones(5, dtype=torch.bool)
    a = assign_criteria(values, REGIONS, eligible, 2, "module", ["gradient", "activation", "taylor"])

    def kept(strategy):
        z = strategy.scores(values, REGIONS, eligible, "module")
        return set(range(5)) - set(torch.argsort(z, stable=True)[:2].tolist())

    sets = {name: kept(SingleCriterion(name)) for name in ("gradient", "activation", "taylor")}
    sets["hybrid"] = kept(HybridStrategy(a))
    assert sets["gradient"] == {2, 3, 4} and sets["activation"] == {0, 1, 4} and sets["taylor"] == {1, 2, 4}
    # hybrid: lora@0 by gradient + taylor (z = 0 for unit 0), serial_adapter@3 by activation (z = 0 for
    # unit 2), parallel_adapter@1 by the fallback (taylor): it prunes {0, 2}, a set no single criterion prunes
    assert a.regions == {"lora@0": ["gradient", "taylor"], "serial_adapter@3": ["activation"]}
    assert sets["hybrid"] == {1, 3, 4}


def test_balance_ranks_within_each_group():
    from prunepeft.hybrid import balance_scores

    s = torch.tensor([5.0, 1.0, 3.0, 10.0, 20.0, 30.0, 7.0])
    groups = [0, 0, 0, 1, 1, 1, 1]
    eligible = torch.tensor([True, True, True, True, True, True, False])
    out = balance_scores(s, groups, eligible)
    # layer 0's best unit and layer 1's best unit both rank 1: pruning the lowest takes from each layer
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.5, 0.0, 0.5, 1.0, 7.0], dtype=torch.float64))


def test_role_layer_balance_compares_units_within_their_role_then_within_their_layer():
    from prunepeft.hybrid import balanced_scores, unit_groups

    model, _ = tiny_model("bert")  # 2 layers
    h = attach(
        model, SpaceConfig(lora_targets=("q", "v"), lora_rank=4, serial_adapter_targets=(), block_size=4)
    )
    bank = h.bank
    roles = unit_groups(bank, h.space, "module", "role")
    layers = unit_groups(bank, h.space, "module", "layer")
    assert sorted(zip(layers, roles, strict=True)) == [
        (0, "lora:q"),
        (0, "lora:v"),
        (1, "lora:q"),
        (1, "lora:v"),
    ]
    # raw scores where every lora:v unit is far above every lora:q unit (a shape artifact): balancing by
    # layer alone keeps v in both layers; by role first, q@1 (the better q) outranks v@1 (the worse v)
    raw = {("lora:q", 0): 1.0, ("lora:q", 1): 2.0, ("lora:v", 0): 200.0, ("lora:v", 1): 100.0}
    s = torch.tensor([raw[(r, layer)] for r, layer in zip(roles, layers, strict=True)], dtype=torch.float64)
    eligible = torch.ones(len(s), dtype=torch.bool)
    by_layer = balanced_scores(s, bank, h.space, "module", "layer", eligible)
    both = balanced_scores(s, bank, h.space, "module", "role_layer", eligible)
    want_layer = {("lora:q", 0): 0.0, ("lora:v", 0): 1.0, ("lora:q", 1): 0.0, ("lora:v", 1): 1.0}
    # role ranks: q@0 0, q@1 1, v@0 1, v@1 0; then within each layer: layer 0 q 0 / v 1, layer 1 q 1 / v 0
    want_both = {("lora:q", 0): 0.0, ("lora:v", 0): 1.0, ("lora:q", 1): 1.0, ("lora:v", 1): 0.0}
    for i, key in enumerate(zip(roles, layers, strict=True)):
        assert float(by_layer[i]) == want_layer[key] and float(both[i]) == want_both[key]
    assert torch.equal(balanced_scores(s, bank, h.space, "module", "none", eligible), s)
    # block granularity: every block of a candidate shares its candidate's groups
    assert len(unit_groups(bank, h.space, "block", "role")) == int(bank.block_mask.numel())


def test_spread_keeps_every_candidate_best_block_before_any_second_one():
    from prunepeft.hybrid import spread_scores

    # candidates 0 (blocks 0-2), 1 (blocks 3-4), 2 (block 5, not eligible: pruned already)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.5], dtype=torch.float64)
    cand_of = [0, 0, 0, 1, 1, 2]
    eligible = torch.tensor([True, True, True, True, True, False])
    out = spread_scores(scores, cand_of, eligible)
    # places: cand 0 -> 0.9 first, 0.8 second, 0.7 third; cand 1 -> 0.2 first, 0.1 second
    assert out.tolist() == pytest.approx([0.9, 0.8 - 2, 0.7 - 4, 0.1 - 2, 0.2, 0.5])
    # pruning the lowest: cand 0's third block, then cand 1's second (0.1 < 0.8), then cand 0's second;
    # the low-scoring candidate 1 keeps its best block while candidate 0 is cut to one
    assert torch.argsort(out[:5]).tolist() == [2, 3, 1, 4, 0]
    # a plain rank order would take candidate 1 whole before touching candidate 0
    assert torch.argsort(scores[:5]).tolist()[:2] == [3, 4]
