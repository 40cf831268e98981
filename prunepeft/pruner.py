"""The round logic shared by :func:`prunepeft.search` and :class:`PrunePEFTCallback`.

A :class:`Pruner` owns no training: the caller tells it when gradients are ready
(:meth:`on_grads`, to accumulate statistics) and when an optimizer step ended (:meth:`after_step`).
It decides, from the step count alone, when the warm-up ends (the hybrid strategy's criterion
assignment) and when a round ends (score, prune to the round's target, compact with the optimizer).
Fed the same batches in the same order, the loop and a ``transformers.Trainer`` therefore reach
the same configuration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from . import distributed
from .criteria import CRITERIA, criterion_values
from .hybrid import (
    BALANCES,
    NORMALISATIONS,
    Assignment,
    assign_criteria,
    balanced_scores,
    block_candidates,
    make_strategy,
    unit_regions,
)
from .scheduler import round_targets
from .supernet import Supernet

GRANULARITIES = ("module", "block", "both")
STRATEGIES = ("hybrid", "random", *CRITERIA)
#: the criteria of the paper's Table 1 plus fisher and AdaLoRA's: the hybrid strategy's default pool
PAPER_CRITERIA = ("weight", "zeros", "threshold", "activation", "gradient", "taylor", "fisher", "adalora")


@dataclass
class PruneConfig:
    """How the search prunes (a part of :class:`prunepeft.SearchConfig`).

    Attributes:
        strategy: ``hybrid`` (paper), ``random``, or one criterion name (see ``prunepeft.criteria``).
        granularity: ``module`` (whole candidates, paper), ``block`` (width-blocks: rank
            allocation) or ``both`` (modules in every round but the last, blocks in the last, so
            the budget is met within one block).
        rounds: number of prune rounds (>= 1).
        steps_per_round: optimizer steps trained before each prune (>= 1).
        warmup_steps: steps before the first round whose statistics assign the hybrid strategy's
            criteria (>= 1; they also train the supernet).
        schedule: ``linear`` or ``cubic`` trainable-parameter targets per round.
        threshold: ``t`` of the threshold criterion (``mean(|w| < t)``).
        stats_ema: None sums the statistics over a round's steps; a float in (0, 1) is an EMA factor.
        adalora_betas: AdaLoRA's (beta1, beta2) for smoothed sensitivity and uncertainty.
        balance: ``none``: units compete across the whole supernet; ``layer`` / ``region``: every
            strategy's scores become ranks within the unit's layer (or kind x depth region), so each
            layer keeps about the same share and the strategy chooses which of its units survive;
            ``role_layer``: ranks within the unit's (kind, site role), then within its layer, so every
            role and every layer keep about their share (see :func:`prunepeft.hybrid.balanced_scores`);
            ``spread``: ``role_layer``, then every candidate keeps its best block before any keeps a
            second (the budget spreads over many sites at a low rank).
        normalise: how the hybrid strategy's Eq. 1 normalises each criterion before combining
            regions: ``minmax`` (Theta = min-max of the values) or ``rank`` (Theta = the rank).
        hybrid_criteria: the criteria the hybrid strategy may assign (None: all of them).
        seed: seed of the random strategy.
    """

    strategy: str = "hybrid"
    granularity: str = "block"
    rounds: int = 4
    steps_per_round: int = 2  # 5 before issue 12: cheap16 in bench/results/quality.md
    warmup_steps: int = 8
    schedule: str = "linear"
    threshold: float = 1e-3
    stats_ema: float | None = None
    adalora_betas: tuple[float, float] = (0.85, 0.85)
    balance: str = "layer"
    normalise: str = "minmax"
    hybrid_criteria: tuple[str, ...] | None = PAPER_CRITERIA
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        for name in ("rounds", "steps_per_round", "warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.stats_ema is not None and not 0 < self.stats_ema < 1:
            raise ValueError(f"stats_ema must be None or in (0, 1), got {self.stats_ema}")
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        self.adalora_betas = tuple(self.adalora_betas)
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {self.balance!r}")
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {', '.join(NORMALISATIONS)}, got {self.normalise!r}")
        if self.hybrid_criteria is not None:
            self.hybrid_criteria = tuple(self.hybrid_criteria)
            unknown = [c for c in self.hybrid_criteria if c not in CRITERIA]
            if unknown or not self.hybrid_criteria:
                raise ValueError(
                    f"hybrid_criteria must name criteria among {', '.join(CRITERIA)}, got {self.hybrid_criteria!r}"
                )

    @property
    def search_steps(self) -> int:
        return self.warmup_steps + self.rounds * self.steps_per_round


@dataclass
class RoundRecord:
    """What one round did."""

    round: int
    target: int
    params: int
    granularity: str
    pruned: list[str]
    score_min: float
    score_max: float
    loss: float = math.nan
    eval: dict[str, float] = field(default_factory=dict)  # metrics on the validation split
    seconds: float = 0.0
    step_seconds: float = 0.0
    probs: dict[str, float] = field(default_factory=dict)  # hybrid: Eq. 1's p(m) of every scored unit

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Pruner:
    """Drives warm-up, rounds and compaction of one attached supernet (see module doc)."""

    def __init__(self, handle: Supernet, config: PruneConfig, budget: int) -> None:
        self.handle = handle
        self.config = config
        self.budget = budget
        self.start_params = handle.num_trainable()
        bank = handle.bank
        min_unit = min(bank.block_cost(c) for c in range(bank.num_candidates))
        if budget >= self.start_params:
            raise ValueError(
                f"budget {budget:,} is not below the supernet's {self.start_params:,} trainable parameters: "
                "nothing to prune (raise the space or lower the budget)"
            )
        if budget < min_unit:
            raise ValueError(
                f"budget {budget:,} is below one block ({min_unit:,} parameters): nothing could be kept"
            )
        self.targets = round_targets(self.start_params, budget, config.rounds, config.schedule)
        self.assignment: Assignment | None = None
        self.strategy = None if config.strategy == "hybrid" else make_strategy(config.strategy, config.seed)
        self.history: list[RoundRecord] = []
        self.step = 0
        self._round_t0 = time.perf_counter()
        self._round_losses: list[float] = []
        self._round_step_s: list[float] = []
        bank.collect_activations = True
        bank.track_gate = self._reads_gate()
        bank.reset_stats()
        bank.reset_activations()

    def _reads_gate(self) -> bool:
        c = self.config
        pool = c.hybrid_criteria if c.hybrid_criteria is not None else tuple(CRITERIA)
        return c.strategy == "gate" or (c.strategy == "hybrid" and "gate" in pool)

    @classmethod
    def restore(cls, handle: Supernet, config: PruneConfig, budget: int, state: dict) -> Pruner:
        """A pruner continuing from :meth:`state_dict` (the bank is already partly pruned, so the
        fresh-start checks of ``__init__`` do not apply)."""
        self = cls.__new__(cls)
        self.handle, self.config, self.budget = handle, config, budget
        self.assignment = None
        self.strategy = None if config.strategy == "hybrid" else make_strategy(config.strategy, config.seed)
        self.history, self.step = [], 0
        self._round_t0, self._round_losses, self._round_step_s = time.perf_counter(), [], []
        self.load_state_dict(state)
        handle.bank.track_gate = self._reads_gate()
        handle.bank.reset_stats()
        handle.bank.reset_activations()
        return self

    # ------------------------------------------------------------------ phase
    @property
    def done(self) -> bool:
        return len(self.history) >= self.config.rounds

    @property
    def round(self) -> int:
        """1-based index of the round being trained (0 during warm-up)."""
        c = self.config
        if self.step < c.warmup_steps:
            return 0
        return min(c.rounds, (self.step - c.warmup_steps) // c.steps_per_round + 1)

    def granularity_of(self, round_index: int) -> str:
        g = self.config.granularity
        if g == "both":
            return "block" if round_index == self.config.rounds else "module"
        return g

    # ------------------------------------------------------------------ hooks
    def on_grads(self) -> None:
        """Gradients of one optimizer step are ready (after clipping): accumulate the statistics."""
        if self.done:
            return
        c = self.config
        self.handle.bank.accumulate_stats(c.threshold, ema=c.stats_ema, adalora=c.adalora_betas)

    def after_step(
        self, optimizer: torch.optim.Optimizer, loss: float | None = None, seconds: float = 0.0
    ) -> RoundRecord | None:
        """An optimizer step finished; at a phase boundary, assign criteria or prune. Returns a new round record."""
        if self.done:
            return None
        self.step += 1
        if loss is not None:
            self._round_losses.append(loss)
        if seconds:
            self._round_step_s.append(seconds)
        c = self.config
        if self.step == c.warmup_steps:
            self._end_warmup()
            return None
        if self.step > c.warmup_steps and (self.step - c.warmup_steps) % c.steps_per_round == 0:
            return self._prune_round(optimizer)
        return None

    # ------------------------------------------------------------------ decisions
    def _eligible(self, granularity: str) -> torch.Tensor:
        bank = self.handle.bank
        if granularity == "block":
            return bank.block_mask.cpu().clone()
        return torch.tensor([w > 0 for w in bank.effective_widths()], dtype=torch.bool)

    def _sync_statistics(self) -> None:
        """Several processes: each saw its own shard in the forward passes, so the activation sums and
        token counts are summed over ranks (the gradient statistics come from averaged gradients and
        are equal everywhere already)."""
        bank = self.handle.bank
        if distributed.world()[1] > 1 and bank.act_sum is not None:
            distributed.all_reduce_sum_(bank.act_sum)
            distributed.all_reduce_sum_(bank.act_tokens)

    def _check_ranks_agree(self, what: str) -> None:
        """Several processes: every rank must hold the same kept set and parameters (else raise on all)."""
        if distributed.world()[1] == 1:
            return
        bank = self.handle.bank
        distributed.check_agree(
            distributed.checksum(bank.effective_widths(), bank.block_mask), f"the kept set {what}"
        )
        distributed.check_agree(distributed.checksum(bank.flat), f"the bank's parameters {what}")

    def _end_warmup(self) -> None:
        bank = self.handle.bank
        self._sync_statistics()
        if self.config.strategy == "hybrid":
            g = self.granularity_of(1)
            values = criterion_values(bank)
            regions = unit_regions(bank, self.handle.space, g)
            eligible = self._eligible(g)
            n_units = int(eligible.sum())
            # as many picks as the first round will prune, estimated from the mean unit cost
            share = (self.start_params - self.targets[0]) / max(1, self.start_params)
            n_picks = max(1, min(n_units, math.ceil(share * n_units)))
            self.assignment = assign_criteria(
                values, regions, eligible, n_picks, g, self.config.hybrid_criteria
            )
            self.strategy = make_strategy(
                "hybrid", assignment=self.assignment, normalise=self.config.normalise
            )
            if distributed.world()[1] > 1:
                distributed.check_agree(
                    distributed.checksum(self.assignment.to_dict()), "the criteria assignment"
                )
        bank.reset_stats()
        bank.reset_activations()
        self._round_t0 = time.perf_counter()
        self._round_losses, self._round_step_s = [], []

    def _prune_round(self, optimizer: torch.optim.Optimizer) -> RoundRecord:
        bank, handle = self.handle.bank, self.handle
        r = len(self.history) + 1
        g = self.granularity_of(r)
        target = self.targets[r - 1]
        self._sync_statistics()
        values = criterion_values(bank)
        regions = unit_regions(bank, handle.space, g)
        eligible = self._eligible(g)
        scores = self.strategy.scores(values, regions, eligible, g)
        scores = balanced_scores(scores, bank, handle.space, g, self.config.balance, eligible)
        names = self._unit_names(g)
        pruned_ids = []
        if handle.num_trainable() > target:
            pruned_ids = handle.prune_to_budget(
                target, scores, granularity=g, optimizer=optimizer, compact=True
            )
        else:
            bank.compact(optimizer=optimizer)
        finite = scores[eligible & torch.isfinite(scores)]
        rec = RoundRecord(
            round=r,
            target=target,
            params=handle.num_trainable(),
            granularity=g,
            pruned=[names[i] for i in pruned_ids],
            score_min=float(finite.min()) if finite.numel() else math.nan,
            score_max=float(finite.max()) if finite.numel() else math.nan,
            loss=sum(self._round_losses) / len(self._round_losses) if self._round_losses else math.nan,
            seconds=time.perf_counter() - self._round_t0,
            step_seconds=_median(self._round_step_s),
            probs=self._probs(names, eligible),
        )
        self._check_ranks_agree(f"after round {r}")
        self.history.append(rec)
        bank.reset_stats()
        bank.reset_activations()
        if self.done:
            bank.collect_activations = False
        self._round_t0 = time.perf_counter()
        self._round_losses, self._round_step_s = [], []
        return rec

    def _probs(self, names: list[str], eligible: torch.Tensor) -> dict[str, float]:
        """Eq. 1's probabilities of the last scoring (hybrid strategy only), rounded for the record."""
        probs = getattr(self.strategy, "last_probs", None)
        if probs is None:
            return {}
        return {names[i]: float(f"{float(probs[i]):.6g}") for i in eligible.nonzero().flatten().tolist()}

    def _unit_names(self, granularity: str) -> list[str]:
        bank = self.handle.bank
        if granularity == "module":
            return [s.name for s in bank.specs]
        out = []
        orig = bank.orig_block.tolist()
        for b, c in enumerate(block_candidates(bank)):
            out.append(f"{bank.specs[c].name}#{orig[b]}")
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "history": [h.to_dict() for h in self.history],
            "assignment": None if self.assignment is None else self.assignment.to_dict(),
            "random_calls": getattr(self.strategy, "calls", 0),
            "start_params": self.start_params,
            "round_losses": list(self._round_losses),
            "round_step_seconds": list(self._round_step_s),
        }

    def load_state_dict(self, d: dict) -> None:
        self.step = d["step"]
        self.history = [RoundRecord(**h) for h in d["history"]]
        self.start_params = d["start_params"]
        self._round_losses = list(d.get("round_losses", []))
        self._round_step_s = list(d.get("round_step_seconds", []))
        self.targets = round_targets(self.start_params, self.budget, self.config.rounds, self.config.schedule)
        if d["assignment"] is not None:
            self.assignment = Assignment.from_dict(d["assignment"])
            self.strategy = make_strategy(
                "hybrid", assignment=self.assignment, normalise=self.config.normalise
            )
        elif self.config.strategy == "random":
            self.strategy.calls = d.get("random_calls", 0)
        self.handle.bank.collect_activations = not self.done


def _median(xs: list[float]) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])
