"""``BottleneckSite``: a linear layer plus every candidate PEFT module attached to it (ARCHITECTURE.md §2).

A site wraps one ``nn.Linear``, ``bitsandbytes.nn.Linear4bit`` or GPT-2 ``Conv1D`` (anything that maps
``[..., in] -> [..., out]``) and evaluates the candidates stored for it in a :class:`ModuleBank`:

- input-tap candidates (``lora``, ``parallel_adapter``) read the site's input ``x``;
- output-tap candidates (``serial_adapter``) read ``y1 = base(x) + sum(input-tap outputs)``,
  the adapted linear's output, and add their output to it.

The base computation stays the wrapped module's own (bitsandbytes' NF4 kernels for a 4-bit base);
the candidates run in the bank's dtype and are cast back to the base output's dtype.

Sites whose input-tap candidates share a layout group (q, k and v of a layer read one tensor) run
together: the first of them called on a tensor ``x`` computes every site's input-tap output at once
and leaves its siblings' outputs in the bank, keyed by the identity of ``x``; a sibling called with
that same tensor (and grad mode) takes its output, one called with another tensor runs its own
slab. Correctness never depends on the call order. On the Triton path
(:func:`prunepeft.ops.use_triton`) the group is one launch; on the reference path it is one GEMM for
the stacked down-projections of all the group's units (:func:`prunepeft.ops.bottleneck_stacked`,
``[sum of widths, in]``) and each site's up-projection on its slice, in forwards with grad enabled
(training, where the step time is); under ``torch.no_grad()`` (evaluation, inference) it runs site
by site, so inference keeps the per-module numerics of an exported peft LoRA to the last bits (one
stacked GEMM rounds differently from three, ~1e-7 relative).

In training forwards on the reference path every site adds its candidates' output to its linear's
output inside the up-projection GEMM (``addmm``, the ``acc`` of :func:`prunepeft.ops.bottleneck_reference`):
no full-size tensor of the bottleneck alone and no separate add per site. A group's siblings are
stashed as their pending up-projections for that reason (each takes its own linear's output).
"""

from __future__ import annotations

import torch
from torch import nn

from .bank import ModuleBank
from .ops import bottleneck, bottleneck_group, bottleneck_stacked, use_triton


class BottleneckSite(nn.Module):
    """Wraps ``base`` and adds the bank's candidates registered under ``site_name``."""

    def __init__(self, base: nn.Module, site_name: str, bank: ModuleBank) -> None:
        super().__init__()
        self.base = base
        self.site_name = site_name
        # not registered as a submodule: the bank is owned by the model / handle, shared by all sites
        self.__dict__["bank"] = bank

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        bank: ModuleBank = self.__dict__["bank"]
        # statistics come from training forwards only: an evaluation leaves them untouched
        collect = self.training and torch.is_grad_enabled()
        grouped = None  # this site's input-tap output, computed with its layout group
        gid = bank.input_group(self.site_name)
        if gid is not None:
            pending, grouped = bank.take_group_output(self.site_name, x)
            # the reference path groups training forwards only (see the module docstring)
            if not pending and (torch.is_grad_enabled() or use_triton(x, bank.flat)):
                grouped = self._group_forward(bank, gid, x, collect)
        for tap in ("input", "output"):
            if tap == "input" and grouped is not None:
                y = grouped(y) if callable(grouped) else y + grouped.to(y.dtype)
                continue
            slab = bank.slab(self.site_name, tap)
            if slab is None:
                continue
            d, ut, pieces, scale = slab
            inp = x if tap == "input" else y
            act = (
                bank.activation_buffer(self.site_name, tap, inp.numel() // inp.shape[-1]) if collect else None
            )
            y = bottleneck(inp.to(d.dtype), d, ut, pieces, scale, act, acc=y)
        return y

    def _group_forward(self, bank: ModuleBank, gid: int, x: torch.Tensor, collect: bool):
        """All input-tap outputs of group ``gid`` on ``x`` (one launch, or one down-projection GEMM);
        the siblings' are stashed. On the reference path each output is pending: a function of the
        site's linear output ``y`` that returns ``y`` plus the site's bottleneck."""
        act = bank.group_activation_buffer(gid, x.numel() // x.shape[-1]) if collect else None
        if use_triton(x, bank.flat):
            region, layout, scale = bank.group(gid)
            outs = bottleneck_group(x.to(region.dtype), region, layout, scale, act)
        else:
            d, sites, layout, scale = bank.group_slabs(gid)
            outs = bottleneck_stacked(x.to(d.dtype), d, sites, scale, act, lazy=True)
        mine = None
        rest = {}
        for s, out in zip(layout.sites, outs, strict=True):
            if s.site == self.site_name:
                mine = out
            else:
                rest[s.site] = out
        bank.stash_group_outputs(gid, x, rest)
        return mine

    def __getattr__(self, name: str):
        # behave like the wrapped layer for code that reads e.g. `.weight`, `.in_features`, `.nf`
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:  # during construction / unpickling
                raise
            return getattr(base, name)

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}"
