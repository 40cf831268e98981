"""The bottleneck op: ``out = (act(x @ D.T + bd) * unit_scale) @ Ut + bu``, pure torch.

Every candidate kind is this op (ARCHITECTURE.md §2): LoRA is the identity activation with
``unit_scale = alpha / r`` and no biases; adapters use relu/gelu/silu with biases. The unit scale
also carries the block mask (0 for a masked unit), so masking costs one multiply.

:func:`bottleneck_reference` is the pure-torch implementation: the CPU path and the oracle the
fused kernels are tested against (autograd is torch's own). :func:`bottleneck` dispatches: the
Triton kernels (:mod:`prunepeft.backends.triton`) for CUDA tensors when Triton is installed, the
reference otherwise; ``PRUNEPEFT_BACKEND=triton`` forces the kernels (on CPU tensors that means the
Triton interpreter, ``TRITON_INTERPRET=1``), ``PRUNEPEFT_BACKEND=reference|native`` forces the
reference (the C++ extension has no bottleneck op).

:func:`bottleneck_group` is the same op for every site of a layout group (the sites that read one
input tensor, e.g. q, k and v of a layer; :class:`GroupLayout`): the kernels compute them all in
one launch with one output per site; its reference is one :func:`bottleneck_reference` per site.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "gelu", "silu")


def activate(h: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the named activation (one of :data:`ACTIVATIONS`)."""
    if name == "identity":
        return h
    if name == "relu":
        return F.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "silu":
        return F.silu(h)
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class Piece:
    """One candidate's slice of a site's stacked down-projection output.

    ``lo:hi`` are its units inside the stacked ``[W, in]`` slab; ``bd`` / ``bu`` its biases (or None).
    """

    lo: int
    hi: int
    activation: str
    bd: torch.Tensor | None
    bu: torch.Tensor | None


@dataclass(frozen=True)
class GroupSite:
    """One site's input-tap candidates inside a layout group's region (see :class:`GroupLayout`).

    ``lo``: its first unit (D row) in the group; ``width``: its units; ``u_off``: element offset in
    the region of its ``Ut`` (``[width, out_dim]``, rows in unit order); ``pieces``: per candidate
    ``(lo, hi, activation, bd_off, bu_off)``, units relative to the site, bias offsets in the region
    (-1: none).
    """

    site: str
    lo: int
    width: int
    out_dim: int
    u_off: int
    pieces: tuple[tuple[int, int, str, int, int], ...]


@dataclass(frozen=True)
class GroupLayout:
    """The input-tap candidates of several sites that read the same input, in one 1-D region of the
    bank: the ``D`` rows of all ``width`` units stacked (``[width, in_dim]``, at offset 0), then each
    site's ``Ut`` and the biases at the offsets its :class:`GroupSite` gives. ``size``: elements.
    """

    in_dim: int
    width: int
    size: int
    sites: tuple[GroupSite, ...]

    def site_args(self, region: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, list[Piece]]:
        """Views of site ``k``'s ``D`` ``[w, in]``, ``Ut`` ``[w, out]`` and pieces in ``region``."""
        s = self.sites[k]
        d = region.narrow(0, s.lo * self.in_dim, s.width * self.in_dim).view(s.width, self.in_dim)
        ut = region.narrow(0, s.u_off, s.width * s.out_dim).view(s.width, s.out_dim)
        pieces = [
            Piece(
                lo,
                hi,
                act,
                region.narrow(0, bd, hi - lo) if bd >= 0 else None,
                region.narrow(0, bu, s.out_dim) if bu >= 0 else None,
            )
            for lo, hi, act, bd, bu in s.pieces
        ]
        return d, ut, pieces


def use_triton(x: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether :func:`bottleneck` on input ``x`` and parameters like ``d`` runs the Triton kernels."""
    forced = os.environ.get("PRUNEPEFT_BACKEND", "").lower()
    if forced == "triton":
        return True
    if forced or x.device.type != "cuda" or d.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    from .backends import triton as triton_backend

    return triton_backend.available("cuda")


def bottleneck(
    x: torch.Tensor,
    d: torch.Tensor,
    ut: torch.Tensor,
    pieces: Sequence[Piece],
    unit_scale: torch.Tensor,
    h_abs_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the bottlenecks of several candidates that share input ``x`` (dispatching).

    Same arguments and result as :func:`bottleneck_reference`, computed by the Triton kernels for
    CUDA tensors (or whenever ``PRUNEPEFT_BACKEND=triton``), by the reference otherwise. The kernels
    skip masked units (``unit_scale == 0``) entirely, so ``h_abs_sum`` gets nothing added for them
    where the reference adds their ``|h|``; the bank's
    :meth:`~prunepeft.bank.ModuleBank.activation_means` therefore reports nothing (0) for masked
    blocks on either path.
    """
    if use_triton(x, d):
        from .backends import triton as triton_backend

        return triton_backend.bottleneck(x, d, ut, pieces, unit_scale, h_abs_sum)
    return bottleneck_reference(x, d, ut, pieces, unit_scale, h_abs_sum)


def bottleneck_group(
    x: torch.Tensor,
    region: torch.Tensor,
    layout: GroupLayout,
    unit_scale: torch.Tensor,
    h_abs_sum: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Every site of a layout group on the shared input ``x`` (dispatching like :func:`bottleneck`).

    The Triton kernels compute all sites in one launch (:func:`prunepeft.backends.triton.bottleneck_group`);
    the reference is :func:`bottleneck_group_reference`, one :func:`bottleneck_reference` per site.
    """
    if use_triton(x, region):
        from .backends import triton as triton_backend

        return triton_backend.bottleneck_group(x, region, layout, unit_scale, h_abs_sum)
    return bottleneck_group_reference(x, region, layout, unit_scale, h_abs_sum)


def bottleneck_group_reference(
    x: torch.Tensor,
    region: torch.Tensor,
    layout: GroupLayout,
    unit_scale: torch.Tensor,
    h_abs_sum: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per site ``s`` of ``layout``: :func:`bottleneck_reference` of its candidates on ``x``.

    Args:
        x: ``[..., in_dim]``.
        region: the group's 1-D region of the bank (``layout.size`` elements).
        layout: where each site's parameters lie in ``region``.
        unit_scale: ``[layout.width]``, the group's units in ``D`` row order.
        h_abs_sum: optional float32 ``[layout.width]`` buffer (see :func:`bottleneck_reference`).

    Returns:
        One ``[..., out_dim]`` tensor per site, in ``layout.sites`` order.
    """
    outs = []
    for k, s in enumerate(layout.sites):
        d, ut, pieces = layout.site_args(region, k)
        habs = None if h_abs_sum is None else h_abs_sum.narrow(0, s.lo, s.width)
        outs.append(bottleneck_reference(x, d, ut, pieces, unit_scale.narrow(0, s.lo, s.width), habs))
    return outs


def bottleneck_reference(
    x: torch.Tensor,
    d: torch.Tensor,
    ut: torch.Tensor,
    pieces: Sequence[Piece],
    unit_scale: torch.Tensor,
    h_abs_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the bottlenecks of several candidates that share input ``x``.

    Args:
        x: ``[..., in]``.
        d: stacked down-projections ``[W, in]`` of all candidates (in ``pieces`` order).
        ut: stacked transposed up-projections ``[W, out]``.
        pieces: per candidate, its unit range, activation and biases.
        unit_scale: ``[W]`` per-unit scale (LoRA scaling times block mask).
        h_abs_sum: optional float32 ``[W]`` buffer; if given, ``sum over tokens of |h|`` per unit
            (``h`` after bias and activation, before scale and mask) is added to it in place, for
            the activation criterion. No gradient flows through it. Only unmasked units' sums are
            part of the contract: the kernels add nothing for masked units, and the bank's
            activation means ignore masked blocks.

    Returns:
        ``[..., out]``.
    """
    h = x @ d.t()
    simple = all(p.activation == "identity" and p.bd is None for p in pieces)
    if not simple:
        parts = []
        for p in pieces:
            hp = h[..., p.lo : p.hi]
            if p.bd is not None:
                hp = hp + p.bd
            parts.append(activate(hp, p.activation))
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if h_abs_sum is not None:
        with torch.no_grad():
            h_abs_sum += h.detach().abs().reshape(-1, h.shape[-1]).sum(0).to(h_abs_sum.dtype)
    out = (h * unit_scale) @ ut
    for p in pieces:
        if p.bu is not None:
            out = out + p.bu
    return out
