"""The packed module bank: every candidate's parameters in one flat tensor (ARCHITECTURE.md §3).

Layout (planned by the backend, ``prunepeft._C`` or its pure-torch reference): candidates that share
an input form a group; a group stores the ``D`` ([width, in]) of all its candidates stacked, then
each candidate's ``Ut`` ([width, out]), then the biases. A width-block's parameters are therefore
contiguous segments, and the candidates of one site form one ``[W, in]`` / ``[W, out]`` slab, so a
site computes all its down-projections with one GEMM and all its up-projections with another.

The sites read their slabs as views of ``flat`` at forward time, so one optimizer over ``flat``
trains everything, and compaction (dropping pruned blocks) is one gather applied alike to the
parameters, their gradients, the optimizer state and the accumulated statistics. With grad enabled
the views come from :class:`~prunepeft.ops.FlatGrad` (:meth:`ModuleBank._views`): their gradients
are written into one full-size buffer per backward pass, which becomes ``flat.grad`` (no full-size
zero tensor per view).

This module is the layout (plan, slabs, layout groups, masks, compaction); the statistics the
criteria read are :mod:`prunepeft.statistics` (a mixin of :class:`ModuleBank`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import distributed
from .backends import get_backend
from .layout import CandRow
from .ops import ACTIVATIONS, FlatGrad, GroupLayout, GroupSite, Piece, Span
from .optim_state import check_carriable, swap_param
from .statistics import BankStatistics

KINDS = ("lora", "parallel_adapter", "serial_adapter")


@dataclass(frozen=True)
class CandidateSpec:
    """One candidate PEFT module at one site.

    Attributes:
        name: unique name, ``"<site>:<kind>"``.
        kind: one of :data:`KINDS`.
        site: qualified name of the wrapped linear in the model.
        role: canonical role of the site (``q``, ``v``, ``down`` ...).
        layer: depth index of the site's transformer layer (0-based).
        in_dim: input width of the bottleneck (site input, or site output for serial adapters).
        out_dim: output width (the site's output width).
        width: bottleneck width (LoRA rank / adapter size) as planned.
        block_size: units per prunable block; must divide ``width``.
        activation: one of :data:`prunepeft.ops.ACTIVATIONS` (``identity`` for LoRA).
        bias: whether the candidate has biases ``bd`` and ``bu`` (adapters).
        scaling: constant output scale (``alpha / r`` for LoRA, 1 for adapters).
        group: layout group key; candidates that read the same input tensor share it.
    """

    name: str
    kind: str
    site: str
    role: str
    layer: int
    in_dim: int
    out_dim: int
    width: int
    block_size: int
    activation: str = "identity"
    bias: bool = False
    scaling: float = 1.0
    group: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{self.name}: activation must be one of {', '.join(ACTIVATIONS)}")
        for field in ("in_dim", "out_dim", "width", "block_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{self.name}: {field} must be >= 1, got {getattr(self, field)}")
        if self.width % self.block_size:
            raise ValueError(
                f"{self.name}: width {self.width} is not divisible by block_size {self.block_size}"
            )

    @property
    def tap(self) -> str:
        """``"output"`` for serial adapters (they read the site's output), else ``"input"``."""
        return "output" if self.kind == "serial_adapter" else "input"


@dataclass
class _Slab:
    """Cached offsets of one (site, tap) slab; rebuilt whenever the plan or the mask changes."""

    d_off: int
    u_off: int
    width: int
    in_dim: int
    out_dim: int
    unit_off: int
    pieces: list[tuple[int, int, str, int, int]]  # lo, hi, activation, bd_off, bu_off (-1: none)
    spans: tuple[Span, ...] = ()  # the views slab() takes: D, Ut, then each piece's bd / bu
    piece_views: tuple[tuple[int, int], ...] = ()  # per piece: index of its bd / bu in spans (-1: none)

    def make_spans(self) -> None:
        spans: list[Span] = [
            (self.d_off, self.width * self.in_dim, (self.width, self.in_dim)),
            (self.u_off, self.width * self.out_dim, (self.width, self.out_dim)),
        ]
        idx = []
        for lo, hi, _, bd, bu in self.pieces:
            i = j = -1
            if bd >= 0:
                i = len(spans)
                spans.append((bd, hi - lo, (hi - lo,)))
            if bu >= 0:
                j = len(spans)
                spans.append((bu, self.out_dim, (self.out_dim,)))
            idx.append((i, j))
        self.spans, self.piece_views = tuple(spans), tuple(idx)

    def assemble(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[Piece]]:
        """``D``, ``Ut`` and the pieces from the views of :attr:`spans`."""
        pieces = [
            Piece(lo, hi, act, views[i] if i >= 0 else None, views[j] if j >= 0 else None)
            for (lo, hi, act, _, _), (i, j) in zip(self.pieces, self.piece_views, strict=True)
        ]
        return views[0], views[1], pieces


class ModuleBank(BankStatistics, nn.Module):
    """All candidates' parameters in one flat ``nn.Parameter`` plus the tables that describe it.

    Candidate ids (positions in ``specs``) are stable for the bank's lifetime; a candidate pruned
    away keeps its id with width 0. Block ids refer to the current plan; ``orig_block`` maps them to
    the block ids of the initial plan.
    """

    def __init__(
        self,
        specs: list[CandidateSpec],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str | None = None,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if not specs:
            raise ValueError("a ModuleBank needs at least one candidate")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("candidate names must be unique")
        self.specs = list(specs)
        self.backend_name = get_backend(backend).__name__.rsplit(".", 1)[-1]
        self._explicit_backend = backend is not None
        groups: dict[str, int] = {}
        self._group_ids = [groups.setdefault(s.group or s.name, len(groups)) for s in specs]
        self._widths = [s.width for s in specs]
        plan = self._plan(self._widths)
        self.flat = nn.Parameter(torch.zeros(plan["total"], dtype=dtype, device=device))
        nb = plan["block"].shape[0]
        # on the meta device (planning a big model without its weights, prunepeft.planner) the flat
        # tensor has no storage; the mask is host bookkeeping that must stay readable, so it lives on
        # the CPU there, and reset_parameters has nothing to initialise
        mask_device = "cpu" if self.flat.is_meta else device
        self.register_buffer("block_mask", torch.ones(nb, dtype=torch.bool, device=mask_device))
        self.register_buffer("orig_block", torch.arange(nb, dtype=torch.int64))
        self._init_statistics()
        self._set_plan(plan)
        self.reset_parameters(seed=seed)

    # ------------------------------------------------------------------ plan and tables
    def _plan_inputs(self, widths: list[int]) -> tuple[torch.Tensor, ...]:
        s = self.specs
        t = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
        return (
            t([c.in_dim for c in s]),
            t([c.out_dim for c in s]),
            t(widths),
            t([c.block_size for c in s]),
            t(self._group_ids),
            torch.tensor([c.bias for c in s], dtype=torch.bool),
        )

    def _plan(self, widths: list[int]) -> dict:
        return self.backend.plan(*self._plan_inputs(widths))

    def _set_plan(self, plan: dict) -> None:
        self.plan = plan
        cand = plan["cand"]
        self._cand = [CandRow(*row) for row in cand.tolist()]
        self._widths = [row.width for row in self._cand]
        # global unit offset of each candidate, in layout order (= order of d_off)
        order = sorted(
            (i for i in range(len(self.specs)) if self._widths[i] > 0), key=lambda i: self._cand[i].d_off
        )
        self._unit_off = [0] * len(self.specs)
        acc = 0
        for i in order:
            self._unit_off[i] = acc
            acc += self._widths[i]
        self.total_units = acc
        self._rebuild()

    def _rebuild(self) -> None:
        """Recompute the per-site slabs and the per-unit scale (mask × scaling)."""
        dev = self.flat.device
        mask = self.block_mask.to(torch.float32).cpu()
        units = torch.zeros(self.total_units, dtype=torch.float32)
        alive = [False] * len(self.specs)
        for c, row in enumerate(self._cand):
            w = row.width
            if w == 0:
                continue
            bs = self.specs[c].block_size
            m = mask[row.first_block : row.first_block + row.n_blocks]
            alive[c] = bool(m.any())
            units[self._unit_off[c] : self._unit_off[c] + w] = m.repeat_interleave(bs) * self.specs[c].scaling
        self._alive = alive
        self.unit_scale = units.to(device=dev, dtype=self.flat.dtype)
        self._flat_grad: FlatGrad | None = None  # views of this flat for forwards with grad (_views)
        self._slabs: dict[tuple[str, str], _Slab] = {}
        by_site: dict[tuple[str, str], list[int]] = {}
        for c, spec in enumerate(self.specs):
            if self._widths[c] > 0:
                by_site.setdefault((spec.site, spec.tap), []).append(c)
        for key, cands in by_site.items():
            cands.sort(key=lambda i: self._cand[i].d_off)
            first = cands[0]
            slab = _Slab(
                d_off=self._cand[first].d_off,
                u_off=self._cand[first].u_off,
                width=0,
                in_dim=self.specs[first].in_dim,
                out_dim=self.specs[first].out_dim,
                unit_off=self._unit_off[first],
                pieces=[],
            )
            for c in cands:
                row, w = self._cand[c], self._widths[c]
                if (
                    row.d_off != slab.d_off + slab.width * slab.in_dim
                    or row.u_off != slab.u_off + slab.width * slab.out_dim
                    or self._unit_off[c] != slab.unit_off + slab.width
                ):
                    raise RuntimeError(
                        f"bank layout: candidates of site {key[0]} are not adjacent (internal error)"
                    )
                spec = self.specs[c]
                bu = row.bu_off if alive[c] else -1
                slab.pieces.append((slab.width, slab.width + w, spec.activation, row.bd_off, bu))
                slab.width += w
            slab.make_spans()
            self._slabs[key] = slab
        self._build_groups()

    def _build_groups(self) -> None:
        """Layout groups whose input-tap candidates sit at two or more sites (q, k, v of a layer):
        one region of ``flat`` each, described by a :class:`~prunepeft.ops.GroupLayout`, so the
        Triton path computes all their sites in one launch. A group whose layout does not qualify
        (not one contiguous region, an output-tap member, a site with two output biases) is left
        out: its sites run per site."""
        self._groups: dict[int, tuple[int, int, GroupLayout]] = {}  # gid -> region off, unit off, layout
        self._group_spans: dict[int, tuple[tuple[Span, ...], list[_Slab]]] = {}  # gid -> group_slabs' views
        self._site_group: dict[str, int] = {}
        self._pending = None  # (gid, x, grad enabled, {site: output}): siblings' outputs not yet taken
        members: dict[int, list[int]] = {}
        for c, w in enumerate(self._widths):
            if w > 0:
                members.setdefault(self._group_ids[c], []).append(c)
        for gid, cands in members.items():
            specs = [self.specs[c] for c in cands]
            sites = list(dict.fromkeys(s.site for s in specs))
            if len(sites) < 2 or any(s.tap != "input" for s in specs):
                continue
            slabs = sorted(((self._slabs[(s, "input")], s) for s in sites), key=lambda t: t[0].d_off)
            start, unit0, in_dim = slabs[0][0].d_off, slabs[0][0].unit_off, slabs[0][0].in_dim
            end = size = 0
            for c in cands:
                row, w, sp = self._cand[c], self._widths[c], self.specs[c]
                ends = [row.d_off + w * sp.in_dim, row.u_off + w * sp.out_dim]
                ends += [row.bd_off + w] if row.bd_off >= 0 else []
                ends += [row.bu_off + sp.out_dim] if row.bu_off >= 0 else []
                end = max(end, *ends)
                size += (
                    w * (sp.in_dim + sp.out_dim)
                    + (w if row.bd_off >= 0 else 0)
                    + (sp.out_dim if row.bu_off >= 0 else 0)
                )
            group_sites, width, ok = [], 0, end - start == size
            for slab, site in slabs:
                n_bu = sum(p[4] >= 0 for p in slab.pieces)
                if slab.unit_off != unit0 + width or slab.d_off != start + width * in_dim or n_bu > 1:
                    ok = False
                    break
                pieces = tuple(
                    (lo, hi, act, bd - start if bd >= 0 else -1, bu - start if bu >= 0 else -1)
                    for lo, hi, act, bd, bu in slab.pieces
                )
                group_sites.append(
                    GroupSite(site, width, slab.width, slab.out_dim, slab.u_off - start, pieces)
                )
                width += slab.width
            if not ok or width != sum(self._widths[c] for c in cands):
                continue
            self._groups[gid] = (start, unit0, GroupLayout(in_dim, width, size, tuple(group_sites)))
            # group_slabs: the stacked D of all sites, then each site's Ut and biases (slab spans)
            site_slabs = [slab for slab, _ in slabs]
            spans = [(start, width * in_dim, (width, in_dim))]
            spans += [sp for slab in site_slabs for sp in slab.spans[1:]]
            self._group_spans[gid] = (tuple(spans), site_slabs)
            for site in sites:
                self._site_group[site] = gid

    # ------------------------------------------------------------------ properties
    @property
    def backend(self):
        """The backend module (``reference`` or ``native``) that plans, scores and compacts this bank."""
        return get_backend(self.backend_name)

    @property
    def num_candidates(self) -> int:
        return len(self.specs)

    @property
    def num_blocks(self) -> int:
        return int(self.plan["block"].shape[0])

    def widths(self) -> list[int]:
        """Current (physical) width of every candidate; 0 once pruned away."""
        return list(self._widths)

    def effective_widths(self) -> list[int]:
        """Width of every candidate counting only unmasked blocks."""
        mask = self.block_mask.cpu().tolist()
        out = []
        for c, row in enumerate(self._cand):
            out.append(sum(mask[row.first_block : row.first_block + row.n_blocks]) * self.specs[c].block_size)
        return out

    def candidate_blocks(self, cand: int) -> range:
        """Current block ids of candidate ``cand``."""
        row = self._cand[cand]
        return range(row.first_block, row.first_block + row.n_blocks)

    def block_cost(self, cand: int) -> int:
        """Parameters freed by pruning one block of ``cand``."""
        s = self.specs[cand]
        return s.block_size * (s.in_dim + s.out_dim + (1 if s.bias else 0))

    def candidate_extra(self, cand: int) -> int:
        """Parameters owned by the candidate itself, not by a block (``bu``)."""
        s = self.specs[cand]
        return s.out_dim if s.bias else 0

    def candidate_params(self, cand: int, effective: bool = True) -> int:
        """Trainable parameters of candidate ``cand`` (counting only unmasked blocks if ``effective``)."""
        w = self.effective_widths()[cand] if effective else self._widths[cand]
        if w == 0:
            return 0
        return w // self.specs[cand].block_size * self.block_cost(cand) + self.candidate_extra(cand)

    def num_params(self, effective: bool = True) -> int:
        """Trainable parameters in the bank: unmasked ones if ``effective``, else all stored ones."""
        if not effective:
            return int(self.plan["total"])
        widths = self.effective_widths()
        total = 0
        for c, w in enumerate(widths):
            if w:
                total += w // self.specs[c].block_size * self.block_cost(c) + self.candidate_extra(c)
        return total

    # ------------------------------------------------------------------ parameters
    def candidate_tensors(self, cand: int) -> dict[str, torch.Tensor]:
        """Views of candidate ``cand``'s parameters: ``D`` [w, in], ``Ut`` [w, out], ``bd``, ``bu``."""
        row, s = self._cand[cand], self.specs[cand]
        w = row.width
        out = {
            "D": self.flat.narrow(0, row.d_off, w * s.in_dim).view(w, s.in_dim),
            "Ut": self.flat.narrow(0, row.u_off, w * s.out_dim).view(w, s.out_dim),
        }
        if s.bias and w:
            out["bd"] = self.flat.narrow(0, row.bd_off, w)
            out["bu"] = self.flat.narrow(0, row.bu_off, s.out_dim)
        return out

    @torch.no_grad()
    def reset_parameters(self, cands: list[int] | None = None, seed: int | None = 0) -> None:
        """(Re-)initialise candidates: ``D`` as peft's LoRA A (kaiming-uniform), ``Ut`` and biases 0.

        With ``Ut = 0`` every candidate starts as the zero function, so attaching changes nothing.
        A bank on the meta device has no values: nothing happens.
        """
        if self.flat.is_meta:
            return
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        for c in range(len(self.specs)) if cands is None else cands:
            if self._widths[c] == 0:
                continue
            t = self.candidate_tensors(c)
            bound = 1.0 / math.sqrt(self.specs[c].in_dim)
            d = torch.rand(t["D"].shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound
            t["D"].copy_(d)
            t["Ut"].zero_()
            if "bd" in t:
                t["bd"].zero_()
                t["bu"].zero_()

    def _views(self, spans: Sequence[Span]) -> tuple[torch.Tensor, ...]:
        """``flat.narrow(0, off, n).view(shape)`` per span.

        With grad enabled (and ``flat`` trainable) the views are outputs of one
        :class:`~prunepeft.ops.FlatGrad` node: their gradients go straight into the one full-size
        buffer of the backward pass that becomes ``flat.grad``. The FlatGrad is shared by every
        forward until ``flat`` changes (an optimizer step, a compaction). Under ``torch.no_grad()``
        they are plain views: nothing is recorded, no gradient buffer is ever allocated.
        """
        flat = self.flat
        if not (flat.requires_grad and torch.is_grad_enabled()):
            return tuple(flat.narrow(0, off, n).view(shape) for off, n, shape in spans)
        fg = self._flat_grad
        if fg is None or not fg.matches(flat):
            fg = self._flat_grad = FlatGrad(flat)
        return fg.views(spans)

    def slab(
        self, site: str, tap: str
    ) -> tuple[torch.Tensor, torch.Tensor, list[Piece], torch.Tensor] | None:
        """The stacked ``D``, ``Ut``, pieces and unit scale of the candidates at ``(site, tap)``.

        Returns None when no live candidate sits there. The tensors are views of ``flat`` taken now
        (:meth:`_views`), so autograd routes their gradients into ``flat.grad``.
        """
        slab = self._slabs.get((site, tap))
        if slab is None:
            return None
        d, ut, pieces = slab.assemble(self._views(slab.spans))
        scale = self.unit_scale.narrow(0, slab.unit_off, slab.width)
        return d, ut, pieces, scale

    # ------------------------------------------------------------------ layout groups
    def input_group(self, site: str) -> int | None:
        """The layout group whose sites share ``site``'s input, if it spans two or more sites."""
        return self._site_group.get(site)

    def group(self, gid: int) -> tuple[torch.Tensor, GroupLayout, torch.Tensor]:
        """``(region, layout, unit_scale)`` of group ``gid``: the 1-D view of ``flat`` holding all its
        input-tap parameters (taken now, so gradients reach ``flat.grad``), where each site's lie in
        it, and the group's slice of the unit scale."""
        start, unit0, layout = self._groups[gid]
        (region,) = self._views([(start, layout.size, (layout.size,))])
        return region, layout, self.unit_scale.narrow(0, unit0, layout.width)

    def group_slabs(
        self, gid: int
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, list[Piece]]], GroupLayout, torch.Tensor]:
        """``(d, sites, layout, unit_scale)`` of group ``gid`` for
        :func:`~prunepeft.ops.bottleneck_stacked`: ``d`` the ``[width, in]`` stacked ``D`` rows of all
        its sites, ``sites`` each site's ``(Ut, pieces)`` in ``layout.sites`` order (views taken now,
        by :meth:`_views`)."""
        start, unit0, layout = self._groups[gid]
        spans, site_slabs = self._group_spans[gid]
        views = self._views(spans)
        sites, k = [], 1
        for slab in site_slabs:
            n = len(slab.spans) - 1  # the site's own views after the stacked D
            _, ut, pieces = slab.assemble((None, *views[k : k + n]))
            sites.append((ut, pieces))
            k += n
        return views[0], sites, layout, self.unit_scale.narrow(0, unit0, layout.width)

    def stash_group_outputs(self, gid: int, x: torch.Tensor, outputs: dict) -> None:
        """Keep the outputs a group launch computed for ``site``'s siblings (tensors, or on the
        reference path pending up-projections: see :meth:`prunepeft.modules.BottleneckSite._group_forward`) until they
        are called with the same tensor ``x`` (at most one pending group per bank: this replaces any
        other)."""
        self._pending = (gid, x, torch.is_grad_enabled(), dict(outputs)) if outputs else None

    def take_group_output(self, site: str, x: torch.Tensor) -> tuple[bool, object]:
        """``(pending, output)`` for ``site`` called on ``x``.

        ``pending`` is False when no output of ``site`` is pending (the caller launches the group);
        otherwise the entry is removed, and ``output`` is it when it was computed from this very
        tensor ``x`` in the current grad mode, else None (the caller runs its own slab). The cache
        is dropped once every sibling has taken (or refused) its output, so it keeps no tensor
        alive after the group's sites have run.
        """
        p = self._pending
        if p is None or self._site_group.get(site) != p[0] or site not in p[3]:
            return False, None
        out = p[3].pop(site)
        if not p[3]:
            self._pending = None
        if p[1] is x and p[2] == torch.is_grad_enabled():
            return True, out
        return True, None

    # ------------------------------------------------------------------ masking
    @torch.no_grad()
    def set_block_mask(self, keep: torch.Tensor) -> None:
        """Set which current blocks are active (``keep``: bool ``[num_blocks]``)."""
        keep = torch.as_tensor(keep)
        if keep.shape != (self.num_blocks,):
            raise ValueError(f"block mask must have shape ({self.num_blocks},), got {tuple(keep.shape)}")
        self.block_mask.copy_(keep.to(torch.bool))
        self._rebuild()

    def mask_blocks(self, blocks) -> None:
        """Deactivate the given current block ids (the model then computes as if they were removed)."""
        keep = self.block_mask.clone()
        idx = torch.as_tensor(list(blocks), dtype=torch.int64)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_blocks):
            raise ValueError(f"block ids must be in [0, {self.num_blocks}), got {idx.tolist()}")
        keep[idx.to(keep.device)] = False
        self.set_block_mask(keep)

    def mask_candidates(self, cands) -> None:
        """Deactivate every block of the given candidates."""
        self.mask_blocks([b for c in cands for b in self.candidate_blocks(c)])

    # ------------------------------------------------------------------ compaction
    @torch.no_grad()
    def compact(
        self, keep: torch.Tensor | None = None, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.Tensor:
        """Drop the blocks not in ``keep`` (default: the masked ones) for real.

        The flat parameter, its gradient, ``optimizer``'s per-parameter state (e.g. AdamW moments),
        the accumulated statistics and the AdaLoRA buffers are all gathered with one map, so the
        compacted model computes exactly what the masked one did and training continues as it would
        have. Returns the gather map (new flat index -> old flat index).
        """
        keep = self.block_mask if keep is None else torch.as_tensor(keep, dtype=torch.bool)
        if keep.shape != (self.num_blocks,):
            raise ValueError(f"keep must have shape ({self.num_blocks},), got {tuple(keep.shape)}")
        if optimizer is not None:
            check_carriable(optimizer, self.flat)  # before anything changes
        plan, gather, block_gather = self.backend.compact(*self._plan_inputs(self._widths), keep.cpu())
        old = self.flat
        dev = old.device
        g = gather.to(dev)
        new = nn.Parameter(old.detach()[g].clone(), requires_grad=old.requires_grad)
        if old.grad is not None:
            new.grad = old.grad[g].clone()
        if optimizer is not None:
            swap_param(optimizer, old, new, g)
        self._gather_statistics(block_gather, gather)
        self.orig_block = self.orig_block[block_gather.to(self.orig_block.device)].clone()
        if getattr(old, "_prunepeft_grad_average", False):  # several processes: the new tensor averages too
            distributed.install_grad_average(new)
        self.flat = new
        self.block_mask = torch.ones(plan["block"].shape[0], dtype=torch.bool, device=self.block_mask.device)
        self._set_plan(plan)
        return gather

    # ------------------------------------------------------------------ checkpoints
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Besides ``flat`` and the mask buffers: the layout (widths), the statistics of the round in
        progress and the pruner's state, so a checkpoint taken anywhere (e.g. by a ``Trainer``)
        resumes the search exactly. Extra keys are tensors (the pruner state as UTF-8 JSON bytes)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "layout_widths"] = torch.tensor(self._widths, dtype=torch.int64)
        for name in self.STATISTICS:
            t = getattr(self, name)
            if t is not None:
                destination[prefix + name] = t if keep_vars else t.detach()
        if self.state_provider is not None:
            data = json.dumps(self.state_provider(), default=_json_default).encode()
            destination[prefix + "pruner_state"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        """Load a bank saved at another point of the search: first reduce this bank to the saved
        layout (the same original blocks), then copy parameters, masks and statistics."""
        widths = state_dict.pop(prefix + "layout_widths", None)
        orig = state_dict.get(prefix + "orig_block")
        if widths is not None and orig is not None and widths.tolist() != self._widths:
            keep = torch.isin(self.orig_block.cpu(), orig.cpu())
            if int(keep.sum()) != orig.numel():
                error_msgs.append(f"{prefix}: the checkpoint keeps blocks this supernet does not have")
                return
            self.compact(keep)
            if self._widths != widths.tolist():
                error_msgs.append(
                    f"{prefix}: the checkpoint's layout does not match this supernet's candidates"
                )
                return
        for name in self.STATISTICS:
            t = state_dict.pop(prefix + name, None)
            if t is not None:
                host = name in (
                    "stats",
                    "gate",
                    "act_tokens",
                )  # kept on the host; the others on flat's device
                setattr(self, name, t.detach().clone().to("cpu" if host else self.flat.device))
        raw = state_dict.pop(prefix + "pruner_state", None)
        if raw is not None:
            self.loaded_state = json.loads(bytes(raw.cpu().numpy().tobytes()).decode())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip

    def _apply(self, fn, recurse=True):  # keep cached unit scale on the same device/dtype as flat
        out = super()._apply(fn, recurse)
        if hasattr(self, "_slabs"):
            self._rebuild()
        return out

    def __getstate__(self):  # copies (deepcopy, pickle) carry no autograd graph
        state = dict(super().__getstate__())
        state["_flat_grad"] = None
        state["_pending"] = None
        return state

    def extra_repr(self) -> str:
        return f"candidates={self.num_candidates}, blocks={self.num_blocks}, params={self.num_params()}"


def _json_default(o):
    if isinstance(o, float):
        return None  # nan / inf
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
