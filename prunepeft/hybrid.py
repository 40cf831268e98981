"""Pruning strategies: single criterion, random, and the paper's hybrid strategy.

A strategy turns the criteria's values into one *keep score* per prunable unit (a candidate at
module granularity, a width-block at block granularity): low = prune first.

Hybrid (PrunePEFT §3): regions are (module kind) x (depth partition). After a warm-up, each
criterion's prune picks (the units it would prune first) are counted per region; each region is
assigned the criterion or criteria that pick there most (ties kept), and each criterion is also
assigned its own strongest region. A unit's score uses its region's criteria, combined with the
paper's Eq. 1: ``p(m) = softmax_m(k_m * Theta(m, S_m))`` with ``k_m = sigmoid(rank(m, S_m))``.

Choices the paper leaves open (documented defaults): Theta is a criterion's keep score min-max
normalised to [0, 1] over the eligible units; rank is the unit's ascending rank under that criterion
normalised to [0, 1] (so k is in [0.5, 0.73]: a mild boost for units the criterion ranks high);
with several criteria in a region the unit's term is their mean; a region nobody picked in uses
``taylor``. Since softmax is monotonic, pruning the lowest p prunes the lowest ``k * Theta``; p is
kept for reporting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .bank import ModuleBank
from .criteria import CRITERIA, keep_scores
from .layout import Block
from .space import SearchSpace

DEFAULT_FALLBACK = "taylor"


def region_key(kind: str, partition: int) -> str:
    return f"{kind}@{partition}"


def block_candidates(bank: ModuleBank) -> list[int]:
    """The candidate of every current block."""
    return bank.plan["block"][:, Block.CAND].tolist()


def unit_regions(bank: ModuleBank, space: SearchSpace, granularity: str) -> list[str]:
    """The region of every unit (current blocks, or candidates)."""
    cand_region = [region_key(*space.region(s)) for s in bank.specs]
    if granularity == "module":
        return cand_region
    return [cand_region[c] for c in block_candidates(bank)]


BALANCES = ("none", "layer", "region", "role_layer", "spread")


def unit_groups(bank: ModuleBank, space: SearchSpace, granularity: str, how: str) -> list:
    """The balancing group of every unit: its layer (``layer``), its region (``region``) or its
    candidate kind at its site role (``role``: ``lora:q``, ``serial_adapter:down`` ...)."""
    if how == "layer":
        cand = [s.layer for s in bank.specs]
    elif how == "region":
        cand = [region_key(*space.region(s)) for s in bank.specs]
    elif how == "role":
        cand = [f"{s.kind}:{s.role}" for s in bank.specs]
    else:
        raise ValueError(f"a balancing group is layer, region or role, got {how!r}")
    if granularity == "module":
        return cand
    return [cand[c] for c in block_candidates(bank)]


def balance_scores(scores: torch.Tensor, groups: Sequence, eligible: torch.Tensor) -> torch.Tensor:
    """Scores replaced by their rank within the unit's group, in [0, 1] (ties share the average rank).

    Pruning the lowest then takes about the same share of every group: the strategy decides which
    units of a layer (or region) go, not how much each layer keeps. Early in training, the criteria
    that read gradients or outputs grow toward the loss (the top layers learn first), so values are
    not comparable across depths; ranks within a layer are.
    """
    out = scores.clone().double()
    by_group: dict = {}
    for i in eligible.nonzero().flatten().tolist():
        by_group.setdefault(groups[i], []).append(i)
    for idx in by_group.values():
        t = torch.tensor(idx)
        out[t] = _ranks(scores[t].double())
    return out


def spread_scores(scores: torch.Tensor, cand_of: Sequence[int], eligible: torch.Tensor) -> torch.Tensor:
    """Block scores in [0, 1] ordered first by the block's place among its candidate's eligible blocks
    (its best-scoring block first), then by score: ``score - 2 * place``. Pruning the lowest takes the
    weakest last block of any candidate before any candidate's best, so the budget spreads over many
    sites at a low rank, and the scores decide which sites get a second (third ...) rank. Uniform LoRA
    of rank 1 on every linear beat rank 8 on q,v at a smaller size in the quality protocol, and ranks
    alone keep whole candidates together (a candidate's blocks score alike)."""
    out = scores.clone().double()
    by_cand: dict[int, list[int]] = {}
    for i in eligible.nonzero().flatten().tolist():
        by_cand.setdefault(cand_of[i], []).append(i)
    for idx in by_cand.values():
        for place, i in enumerate(sorted(idx, key=lambda j: (-float(scores[j]), j))):
            out[i] = float(scores[i]) - 2.0 * place
    return out


def balanced_scores(
    scores: torch.Tensor,
    bank: ModuleBank,
    space: SearchSpace,
    granularity: str,
    how: str,
    eligible: torch.Tensor,
) -> torch.Tensor:
    """A strategy's keep scores after the ``balance`` step (``none``: unchanged).

    ``spread`` (blocks): ``role_layer``'s scores, then :func:`spread_scores`: every candidate keeps
    its best block before any candidate keeps a second one (at module granularity: ``role_layer``).

    ``role_layer``: ranks within the unit's (kind, site role) first, then ranks of those within its
    layer. Criteria values of different shapes are not comparable (LoRA on ``down`` reads 1,536
    inputs, on ``q`` 384; the ``weight`` criterion's mean w^2 of a kaiming-uniform D, bound
    1/sqrt(in), falls with the input width), so the first step compares a unit only with units of its
    own kind and role; the second keeps about the same share of every layer, as ``layer`` does. Every
    role then keeps about its share of the supernet, every layer its share, and the criteria decide
    where within those.
    """
    if how == "none":
        return scores
    if how == "spread":
        scores = balanced_scores(scores, bank, space, granularity, "role_layer", eligible)
        if granularity == "module":
            return scores
        return spread_scores(scores, block_candidates(bank), eligible)
    if how == "role_layer":
        scores = balance_scores(scores, unit_groups(bank, space, granularity, "role"), eligible)
        how = "layer"
    return balance_scores(scores, unit_groups(bank, space, granularity, how), eligible)


def unit_values(
    values: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str, granularity: str
) -> torch.Tensor:
    """One criterion's keep scores for the units of the granularity."""
    v = values[name][0 if granularity == "block" else 1]
    return keep_scores(v, name)


NORMALISATIONS = ("minmax", "rank")


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ascending ranks of ``v`` normalised to [0, 1]; tied values share their average rank."""
    n = v.numel()
    if n <= 1:
        return torch.full_like(v, 0.5, dtype=torch.float64)
    order = torch.argsort(v, stable=True)
    sv = v[order]
    ranks = torch.empty(n, dtype=torch.float64)
    i = 0
    while i < n:  # runs of ties get the mean of their positions
        j = i
        while j + 1 < n and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2
        i = j + 1
    return ranks / (n - 1)


def _normalise(
    v: torch.Tensor, eligible: torch.Tensor, how: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Theta, rank) over the eligible units (0 elsewhere).

    ``rank``: ascending rank normalised to [0, 1], ties sharing their average rank (a constant
    criterion ranks every unit 0.5, so it cannot prefer units by their index). ``Theta``: the
    min-max normalised values (``how="minmax"``; 0.5 for a constant criterion; +-inf, from
    sanitised non-finite statistics, go to the ends) or the rank itself (``how="rank"``: every
    criterion then has the same uniform distribution of Theta, whatever the tails of its values).
    """
    theta = torch.zeros_like(v, dtype=torch.float64)
    rank = torch.zeros_like(v, dtype=torch.float64)
    idx = eligible.nonzero().flatten()
    if idx.numel() == 0:
        return theta, rank
    ve = v[idx].double().clone()
    finite = torch.isfinite(ve)
    if finite.any():
        lo, hi = ve[finite].min(), ve[finite].max()
        ve = ve.clamp(lo, hi)
        theta[idx] = (ve - lo) / (hi - lo) if hi > lo else torch.full_like(ve, 0.5)
    else:
        theta[idx] = 0.5
    rank[idx] = _ranks(ve)
    if how == "rank":
        theta = rank.clone()
    return theta, rank


def pick_weights(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> dict[int, float]:
    """The ``k`` lowest eligible scores as ``{unit: weight}``: 1 for units strictly below the k-th
    lowest value; the units tied at that value share the remaining picks equally. A criterion
    whose eligible values are all equal carries no information and picks nothing."""
    idx = eligible.nonzero().flatten()
    if idx.numel() == 0 or k <= 0:
        return {}
    v = scores[idx].double()
    if bool((v == v[0]).all()):
        return {}
    k = min(k, idx.numel())
    kth = torch.sort(v).values[k - 1]
    below = (v < kth).nonzero().flatten().tolist()
    tied = (v == kth).nonzero().flatten().tolist()
    share = (k - len(below)) / len(tied)
    out = {int(idx[i]): 1.0 for i in below}
    out.update({int(idx[i]): share for i in tied})
    return out


@dataclass
class Assignment:
    """Which criteria score which region, and the warm-up counts that decided it."""

    regions: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, dict[str, float]] = field(default_factory=dict)  # criterion -> region -> picks
    fallback: str = DEFAULT_FALLBACK

    def criteria_for(self, region: str) -> list[str]:
        return self.regions.get(region) or [self.fallback]

    def to_dict(self) -> dict:
        return {"regions": self.regions, "counts": self.counts, "fallback": self.fallback}

    @classmethod
    def from_dict(cls, d: dict) -> Assignment:
        return cls(dict(d["regions"]), dict(d["counts"]), d.get("fallback", DEFAULT_FALLBACK))


def assign_criteria(
    values: dict[str, tuple[torch.Tensor, torch.Tensor]],
    regions: Sequence[str],
    eligible: torch.Tensor,
    n_picks: int,
    granularity: str,
    criteria: Sequence[str] | None = None,
) -> Assignment:
    """The hybrid warm-up decision from one set of statistics (all criteria at once).

    Each criterion picks the ``n_picks`` units it would prune first (:func:`pick_weights`: ties at
    the boundary share the picks, a constant criterion picks nothing); its picks are counted per
    region. A region is assigned the criteria with the most picks in it (ties kept, within 1e-9),
    and every criterion that picked anything is also assigned its own strongest region (the first
    in sorted order on ties). A region nobody picked in is left to the fallback.
    """
    criteria = list(criteria or CRITERIA)
    all_regions = sorted(set(regions))
    counts: dict[str, dict[str, float]] = {}
    for name in criteria:
        c = dict.fromkeys(all_regions, 0.0)
        for i, w in pick_weights(unit_values(values, name, granularity), eligible, n_picks).items():
            c[regions[i]] += w
        counts[name] = {r: round(x, 9) for r, x in c.items()}
    assigned: dict[str, list[str]] = {r: [] for r in all_regions}
    for r in all_regions:
        best = max(counts[name][r] for name in criteria)
        if best > 0:
            assigned[r] = [name for name in criteria if abs(counts[name][r] - best) <= 1e-9]
    for name in criteria:  # each criterion's own strongest region (first on ties)
        strongest = max(all_regions, key=lambda r: (counts[name][r], -all_regions.index(r)))
        if counts[name][strongest] > 0 and name not in assigned[strongest]:
            assigned[strongest].append(name)
    return Assignment({r: v for r, v in assigned.items() if v}, counts)


class Strategy:
    """Base: ``scores(values, regions, eligible, granularity) -> keep scores`` (low = prune)."""

    name = "base"

    def scores(
        self, values, regions: Sequence[str], eligible: torch.Tensor, granularity: str
    ) -> torch.Tensor:
        raise NotImplementedError


class SingleCriterion(Strategy):
    def __init__(self, criterion: str) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        self.name = criterion

    def scores(self, values, regions, eligible, granularity):
        return unit_values(values, self.name, granularity)


class RandomStrategy(Strategy):
    """Uniformly random keep scores (the ablation baseline), reproducible from ``seed`` and the round."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.calls = 0

    def scores(self, values, regions, eligible, granularity):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        return torch.rand(len(regions), generator=gen, dtype=torch.float64)


class HybridStrategy(Strategy):
    """The paper's hybrid strategy with a fixed :class:`Assignment` (see module doc)."""

    name = "hybrid"

    def __init__(self, assignment: Assignment, normalise: str = "minmax") -> None:
        if normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {', '.join(NORMALISATIONS)}, got {normalise!r}")
        self.assignment = assignment
        self.normalise = normalise
        self.last_probs: torch.Tensor | None = None

    def scores(self, values, regions, eligible, granularity):
        n = len(regions)
        needed = {c for r in set(regions) for c in self.assignment.criteria_for(r)}
        norm = {c: _normalise(unit_values(values, c, granularity), eligible, self.normalise) for c in needed}
        z = torch.zeros(n, dtype=torch.float64)
        for i, r in enumerate(regions):
            crits = self.assignment.criteria_for(r)
            z[i] = sum(_sigmoid(float(norm[c][1][i])) * float(norm[c][0][i]) for c in crits) / len(crits)
        probs = torch.zeros(n, dtype=torch.float64)
        idx = eligible.nonzero().flatten()
        if idx.numel():
            probs[idx] = torch.softmax(z[idx], 0)
        self.last_probs = probs
        return z


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def make_strategy(
    name: str, seed: int = 0, assignment: Assignment | None = None, normalise: str = "minmax"
) -> Strategy:
    """``hybrid`` (needs an assignment), ``random``, or any criterion name."""
    if name == "hybrid":
        if assignment is None:
            raise ValueError("the hybrid strategy needs the warm-up's criterion assignment")
        return HybridStrategy(assignment, normalise)
    if name == "random":
        return RandomStrategy(seed)
    return SingleCriterion(name)
