"""The bank's statistics: everything the criteria read, accumulated during training (ARCHITECTURE.md §1).

:class:`BankStatistics` is the part of :class:`~prunepeft.bank.ModuleBank` that owns them:

- ``stats``: float64 ``[num_blocks + num_candidates, len(STAT_COLUMNS)]``, from one fused pass over
  the flat parameters and their gradients per optimizer step (:meth:`accumulate_stats`; the
  backend's ``block_stats``: C++, Triton or the torch reference), summed or averaged (EMA);
- ``gate``: float64 ``[num_blocks + num_candidates]``, ``|sum(w * g)|`` per unit and step;
- ``sens`` / ``unc``: AdaLoRA's per-element smoothed sensitivity and uncertainty;
- ``act_sum`` / ``act_tokens``: ``sum |h|`` of every unit's output and the tokens seen, filled by
  the sites during training forwards while ``collect_activations`` is on.

Compaction gathers all of them with the bank's own maps (:meth:`_gather_statistics`), so scoring
after a compaction reads exactly what it would have read from the masked bank.
"""

from __future__ import annotations

import torch

from .backends import get_backend, scoring_backend_name
from .layout import STAT_COLUMNS, Block, Seg


class BankStatistics:
    """Statistics of a :class:`~prunepeft.bank.ModuleBank` (a mixin: it reads the bank's plan,
    ``flat``, slabs and layout groups)."""

    STATISTICS = ("stats", "gate", "act_sum", "act_tokens", "sens", "unc")
    """Statistics saved in the bank's state_dict (checkpoints resume inside a round)."""

    def _init_statistics(self) -> None:
        self.stats: torch.Tensor | None = None  # float64 [nb + n, 8], accumulated statistics
        self.gate: torch.Tensor | None = None  # float64 [nb + n], accumulated |d loss / d unit gate|
        self.collect_activations = False  # when on, sites accumulate sum |h| per unit (activation criterion)
        self.act_sum: torch.Tensor | None = None  # float32 [total_units], sum over tokens of |h|
        self.act_tokens: torch.Tensor | None = None  # float64 [total_units], tokens seen per unit
        self.sens: torch.Tensor | None = None  # AdaLoRA smoothed sensitivity, per element
        self.unc: torch.Tensor | None = None  # AdaLoRA uncertainty, per element
        self.track_gate = (
            False  # accumulate the gate statistic (only when a strategy reads it: one more pass)
        )
        self.state_provider = None  # a callable returning a JSON-able dict saved with the bank (the pruner's)
        self.loaded_state: dict | None = None  # what a loaded state_dict carried from state_provider

    # ------------------------------------------------------------------ activations (forward)
    def activation_buffer(self, site: str, tap: str, n_tokens: int) -> torch.Tensor | None:
        """The slice of ``act_sum`` for a slab while ``collect_activations`` is on (else None).

        Counts ``n_tokens`` for the slab's units; :meth:`activation_means` divides by it.
        """
        if not self.collect_activations:
            return None
        slab = self._slabs[(site, tap)]
        if self.act_sum is None or self.act_sum.numel() != self.total_units:
            self.reset_activations()
        self.act_tokens[slab.unit_off : slab.unit_off + slab.width] += n_tokens
        return self.act_sum.narrow(0, slab.unit_off, slab.width)

    def reset_activations(self) -> None:
        """Zero the activation statistics (start of a round)."""
        self.act_sum = torch.zeros(self.total_units, dtype=torch.float32, device=self.flat.device)
        self.act_tokens = torch.zeros(self.total_units, dtype=torch.float64)

    def activation_means(self) -> torch.Tensor:
        """Per current block: mean over its units and the tokens seen of ``|h|`` (0 if none seen).

        Masked blocks get 0 on every backend: the fused kernels skip their units (nothing is added
        to ``act_sum`` for them) while the reference adds their unmasked ``|h|``, and a masked block
        is not eligible for pruning anyway, so its value carries no information.

        Returns float64 ``[num_blocks]``.
        """
        out = torch.zeros(self.num_blocks, dtype=torch.float64)
        if self.act_sum is None or self.act_sum.numel() != self.total_units:
            return out
        live = self.block_mask.cpu()
        sums = self.act_sum.double().cpu()
        for c, row in enumerate(self._cand):
            w, n_blocks, first = row.width, row.n_blocks, row.first_block
            if not w:
                continue
            bs, lo = self.specs[c].block_size, self._unit_off[c]
            tok = self.act_tokens[lo : lo + w].view(n_blocks, bs).sum(1)
            s = sums[lo : lo + w].view(n_blocks, bs).sum(1)
            seen = (tok > 0) & live[first : first + n_blocks]
            out[first : first + n_blocks] = torch.where(seen, s / tok.clamp_min(1), torch.zeros_like(s))
        return out

    def group_activation_buffer(self, gid: int, n_tokens: int) -> torch.Tensor | None:
        """:meth:`activation_buffer` for all sites of group ``gid`` at once (their units are one range)."""
        if not self.collect_activations:
            return None
        _, unit0, layout = self._groups[gid]
        if self.act_sum is None or self.act_sum.numel() != self.total_units:
            self.reset_activations()
        self.act_tokens[unit0 : unit0 + layout.width] += n_tokens
        return self.act_sum.narrow(0, unit0, layout.width)

    # ------------------------------------------------------------------ parameters and gradients (optimizer steps)
    @torch.no_grad()
    def accumulate_stats(
        self,
        threshold: float = 1e-3,
        *,
        ema: float | None = None,
        adalora: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """One fused pass over ``flat`` and ``flat.grad``: per-block statistics for every criterion.

        Rows are the current blocks, then one row per candidate for parameters owned by the
        candidate (``bu``); columns are :data:`STAT_COLUMNS`. The step's statistics are added to
        ``self.stats`` (a sum, or an exponential moving average with factor ``ema``). With
        ``adalora=(beta1, beta2)`` the per-element smoothed sensitivity and uncertainty are updated
        too and column ``sum_sens_unc`` holds their product's sum. Returns this step's statistics.
        """
        n_owners = self.num_blocks + self.num_candidates
        if self.stats is None or self.stats.shape[0] != n_owners:
            self.stats = torch.zeros(n_owners, len(STAT_COLUMNS), dtype=torch.float64)
        name = scoring_backend_name(self.flat.device.type, self.backend_name, self._explicit_backend)
        backend = get_backend(name)
        if name == "triton":
            # the fused Triton pass reads params and grads where they are (no copy to the host)
            param = self.flat.detach().float()
            grad = None if self.flat.grad is None else self.flat.grad.detach().float()
        else:
            param = self.flat.detach().float().cpu()
            grad = None if self.flat.grad is None else self.flat.grad.detach().float().cpu()
        if adalora is not None and (self.sens is None or self.sens.device != param.device):
            self.sens = torch.zeros_like(param) if self.sens is None else self.sens.to(param.device)
            self.unc = torch.zeros_like(param) if self.unc is None else self.unc.to(param.device)
        beta1, beta2 = adalora if adalora is not None else (0.85, 0.85)
        if grad is not None and self.track_gate:
            self._accumulate_gate(param, grad, ema)
        return backend.block_stats(
            param,
            grad,
            self.plan["seg"],
            n_owners,
            threshold,
            self.sens if adalora is not None else None,
            self.unc if adalora is not None else None,
            beta1,
            beta2,
            self.stats,
            -1.0 if ema is None else ema,
        )

    def _accumulate_gate(self, param: torch.Tensor, grad: torch.Tensor, ema: float | None) -> None:
        """Accumulate ``|sum(w * g)|`` of every block and of every whole candidate over the step.

        ``sum(w * g)`` over a unit's parameters is the derivative of the loss with respect to a gate
        scaling the unit's output (for LoRA the D and Ut halves each contribute it once; for a ReLU
        adapter too, by homogeneity): a loss-unit quantity, comparable across kinds, sites and depths.
        Rows: blocks, then candidates (each candidate's row holds the gate of the whole candidate,
        its blocks and its own bias together).
        """
        seg = self.plan["seg"].to(param.device)
        wg = (param.double() * grad.double()).cumsum(0)
        wg = torch.cat([wg.new_zeros(1), wg])
        per_seg = wg[seg[:, Seg.OFFSET] + seg[:, Seg.LENGTH]] - wg[seg[:, Seg.OFFSET]]
        nb, n = self.num_blocks, self.num_candidates
        owner = (
            torch.zeros(nb + n, dtype=torch.float64, device=param.device)
            .index_add_(0, seg[:, Seg.OWNER], per_seg)
            .cpu()
        )
        cand = owner[nb:].clone()
        block_cand = self.plan["block"][:, Block.CAND]
        cand.index_add_(0, block_cand, owner[:nb])
        step = torch.cat([owner[:nb].abs(), cand.abs()])
        if self.gate is None or self.gate.shape[0] != nb + n:
            self.gate = torch.zeros(nb + n, dtype=torch.float64)
        if ema is None:
            self.gate += step
        else:
            self.gate.mul_(ema).add_(step, alpha=1 - ema)

    def reset_stats(self) -> None:
        """Forget accumulated statistics (start of a new round)."""
        self.stats = None
        self.gate = None

    # ------------------------------------------------------------------ compaction
    def _gather_statistics(self, block_gather: torch.Tensor, gather: torch.Tensor) -> None:
        """Keep the statistics of the kept blocks (called by ``compact`` with the new plan's maps,
        before the plan is replaced): rows by ``block_gather``, per-element state by ``gather``."""
        n = self.num_candidates
        rows = torch.cat([block_gather, torch.arange(self.num_blocks, self.num_blocks + n)])
        if self.stats is not None:
            self.stats = self.stats[rows].clone()
        if self.gate is not None:
            self.gate = self.gate[rows].clone()
        self.act_sum = self.act_tokens = None  # per-round statistics; units renumber after compaction
        if self.sens is not None:
            self.sens = self.sens[gather.to(self.sens.device)].clone()
            self.unc = self.unc[gather.to(self.unc.device)].clone()
