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

Where the wrapped layer is a frozen plain ``nn.Linear`` without hooks (and no autocast, one dtype),
a training forward on the reference path computes the linear itself, together with its input-tap
candidates' down-projection (the group's, for the site that computes the group), in one autograd node
(:func:`prunepeft.ops.linear_tap`): backward writes the input's gradient once instead of summing two
full-size ones, and the up-projection is added into the linear's output in place. Any other base (4-bit,
GPT-2 ``Conv1D``, a hooked or trainable linear) keeps its own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .bank import ModuleBank
from .ops import bottleneck, bottleneck_group, bottleneck_stacked, bottleneck_tapped, linear_tap, use_triton


class BottleneckSite(nn.Module):
    """Wraps ``base`` and adds the bank's candidates registered under ``site_name``."""

    def __init__(self, base: nn.Module, site_name: str, bank: ModuleBank) -> None:
        super().__init__()
        self.base = base
        self.site_name = site_name
        # not registered as a submodule: the bank is owned by the model / handle, shared by all sites
        self.__dict__["bank"] = bank

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        bank: ModuleBank = self.__dict__["bank"]
        # statistics come from training forwards only: an evaluation leaves them untouched
        collect = self.training and torch.is_grad_enabled()
        tapped = None if args or kwargs else self._tapped_base(x, bank)
        y = None  # the linear's output plus the input-tap candidates', when computed together (tapped)
        grouped = None  # this site's input-tap output, computed with its layout group
        gid = bank.input_group(self.site_name)
        if gid is not None:
            pending, grouped = bank.take_group_output(self.site_name, x)
            # the reference path groups training forwards only (see the module docstring)
            if not pending and (torch.is_grad_enabled() or use_triton(x, bank.flat)):
                grouped, y = self._group_forward(bank, gid, x, collect, tapped)
        elif tapped is not None:
            y = self._tapped_forward(bank, x, tapped, collect)
        input_done = y is not None
        if y is None:
            y = self.base(x, *args, **kwargs)
        for tap in ("input", "output"):
            if tap == "input" and input_done:
                continue
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

    def _group_forward(self, bank: ModuleBank, gid: int, x: torch.Tensor, collect: bool, tapped=None):
        """All input-tap outputs of group ``gid`` on ``x`` (one launch, or one down-projection GEMM);
        the siblings' are stashed. On the reference path each output is pending: a function of the
        site's linear output ``y`` that returns ``y`` plus the site's bottleneck.

        Returns ``(output, None)``, or with ``tapped`` (see :meth:`_tapped_base`) ``(None, y)``: the
        linear's output with this site's candidates added, the linear and the group's down-projection
        computed by one node (:func:`~prunepeft.ops.linear_tap`)."""
        act = bank.group_activation_buffer(gid, x.numel() // x.shape[-1]) if collect else None
        y = h = None
        if use_triton(x, bank.flat):
            region, layout, scale = bank.group(gid)
            outs = bottleneck_group(x.to(region.dtype), region, layout, scale, act)
        else:
            d, sites, layout, scale = bank.group_slabs(gid)
            if tapped is not None:
                y, h = linear_tap(x, *tapped, d)
            outs = bottleneck_stacked(x.to(d.dtype), d, sites, scale, act, lazy=True, h=h)
        mine = None
        rest = {}
        for s, out in zip(layout.sites, outs, strict=True):
            if s.site == self.site_name:
                mine = out
            else:
                rest[s.site] = out
        bank.stash_group_outputs(gid, x, rest)
        if y is None:
            return mine, None
        y = y if mine is None else mine(y, inplace=True)
        return None, y.view(*x.shape[:-1], y.shape[-1])

    def _tapped_base(self, x: torch.Tensor, bank: ModuleBank):
        """``(weight, bias)`` of the wrapped linear when this forward computes it together with the
        input-tap candidates' down-projection (:func:`~prunepeft.ops.linear_tap`: one input gradient
        instead of two summed, the up-projection added in place); else None. Only training forwards on
        the reference path, a plain ``nn.Linear`` that is frozen and has no hooks (its forward is not
        called then), no autocast, one dtype throughout."""
        base = self.base
        if type(base) is not nn.Linear or not torch.is_grad_enabled() or use_triton(x, bank.flat):
            return None
        w, b = base.weight, base.bias
        if w.requires_grad or (b is not None and b.requires_grad) or torch.is_autocast_enabled(x.device.type):
            return None
        if not (x.dtype == w.dtype == bank.flat.dtype) or x.device != w.device:
            return None
        hooks = (base._forward_hooks, base._forward_pre_hooks, nn.modules.module._global_forward_hooks,
                 nn.modules.module._global_forward_pre_hooks)  # fmt: skip
        return None if any(hooks) else (w, b)

    def _tapped_forward(
        self, bank: ModuleBank, x: torch.Tensor, tapped, collect: bool
    ) -> torch.Tensor | None:
        """The linear's output plus this site's input-tap candidates, computed together (see
        :meth:`_tapped_base`); None when no live candidate reads the input."""
        slab = bank.slab(self.site_name, "input")
        if slab is None:
            return None
        d, ut, pieces, scale = slab
        act = bank.activation_buffer(self.site_name, "input", x.numel() // x.shape[-1]) if collect else None
        return bottleneck_tapped(x, *tapped, d, ut, pieces, scale, act)

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
