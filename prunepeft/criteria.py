"""Pruning criteria (paper Table 1, plus fisher and AdaLoRA's smoothed sensitivity x uncertainty).

Every criterion is a mean over the parameters of a block (or of a whole candidate) of one statistic
that the bank's fused pass already produced (``ModuleBank.accumulate_stats``), except
``activation``, whose ``mean |h|`` the sites collect during the forward pass. So all criteria come
out of the same statistics at once: computing one more criterion costs nothing.

Each criterion says which end means "prune": for ``zeros`` and ``threshold`` a *high* fraction of
(near-)zero weights marks a module as prunable; for all others a *low* value does. ``keep_scores``
orients every criterion so that low = prune.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bank import ModuleBank
from .layout import STAT_COLUMNS, Stat


@dataclass(frozen=True)
class Criterion:
    """One pruning criterion: the statistic column it averages and which end means prune."""

    name: str
    column: str | None  # a STAT_COLUMNS entry, or None for the activation criterion
    prune_high: bool
    doc: str


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("weight", "sum_w2", False, "mean(w^2): small weights matter little"),
        Criterion("zeros", "n_zero", True, "mean(w == 0): mostly-zero modules are prunable"),
        Criterion("threshold", "n_below", True, "mean(|w| < t): mostly-tiny weights are prunable"),
        Criterion("activation", None, False, "mean|h| of the bottleneck output over the round's tokens"),
        Criterion("gradient", "sum_abs_g", False, "mean|g|: parameters the loss barely pulls on"),
        Criterion("taylor", "sum_abs_wg", False, "mean|w*g|: first-order Taylor sensitivity"),
        Criterion("fisher", "sum_wg2", False, "mean((w*g)^2): empirical Fisher"),
        Criterion("adalora", "sum_sens_unc", False, "AdaLoRA's smoothed sensitivity x uncertainty"),
        Criterion(
            "gate",
            None,
            False,
            "|d loss / d gate| of the unit's output per parameter (comparable across kinds)",
        ),
    )
}


def criterion_values(
    bank: ModuleBank, stats: torch.Tensor | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every criterion's raw value per current block and per candidate.

    Returns ``{name: (per_block [num_blocks], per_candidate [num_candidates])}`` (float64, CPU).
    Candidates with width 0 and blocks never seen get NaN (they are not eligible anyway);
    non-finite statistics are replaced by the criterion's "prune" end, so a corrupt statistic can
    only make a module prunable, never crash or silently protect it.
    """
    stats = bank.stats if stats is None else stats
    nb, n = bank.num_blocks, bank.num_candidates
    if stats is None or stats.shape[0] != nb + n:
        raise ValueError(
            "no statistics for the current plan: train some steps with bank.accumulate_stats() first"
        )
    stats = stats.double().cpu()
    block_rows, cand_rows = stats[:nb], stats[nb:]
    # candidate totals = its blocks + its own row (bu)
    cand_tot = cand_rows.clone()
    for c in range(n):
        blocks = bank.candidate_blocks(c)
        if len(blocks):
            cand_tot[c] += block_rows[blocks.start : blocks.stop].sum(0)
    count_b = block_rows[:, Stat.COUNT]
    count_c = cand_tot[:, Stat.COUNT]
    act_b = bank.activation_means()
    act_c = torch.full((n,), float("nan"), dtype=torch.float64)
    live = bank.block_mask.cpu()
    for c in range(n):
        blocks = bank.candidate_blocks(c)
        keep = live[blocks.start : blocks.stop]
        if keep.any():  # masked blocks see no tokens (the kernels skip them): average the live ones
            act_c[c] = act_b[blocks.start : blocks.stop][keep].mean()
    gate = bank.gate if bank.gate is not None else torch.zeros(nb + n, dtype=torch.float64)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, crit in CRITERIA.items():
        if name == "gate":
            vb, vc = gate[:nb] / count_b, gate[nb:] / count_c
        elif crit.column is None:
            vb, vc = act_b.clone(), act_c
        else:
            j = STAT_COLUMNS.index(crit.column)
            vb = block_rows[:, j] / count_b
            vc = cand_tot[:, j] / count_c
        out[name] = (_sanitize(vb, crit), _sanitize(vc, crit, keep_nan=count_c == 0))
    return out


def _sanitize(v: torch.Tensor, crit: Criterion, keep_nan: torch.Tensor | None = None) -> torch.Tensor:
    bad = ~torch.isfinite(v)
    if keep_nan is not None:
        bad &= ~keep_nan
    if bad.any():
        v = v.clone()
        v[bad] = float("inf") if crit.prune_high else float("-inf")
    return v


def keep_scores(values: torch.Tensor, criterion: str) -> torch.Tensor:
    """Orient a criterion's values so that low = prune (negate for prune-high criteria)."""
    crit = CRITERIA[criterion]
    return -values if crit.prune_high else values
