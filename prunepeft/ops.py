"""The bottleneck op: ``out = (act(x @ D.T + bd) * unit_scale) @ Ut + bu``, pure torch.

Every candidate kind is this op (DESIGN §2): LoRA is the identity activation with
``unit_scale = alpha / r`` and no biases; adapters use relu/gelu/silu with biases. The unit scale
also carries the block mask (0 for a masked unit), so masking costs one multiply.

:func:`bottleneck_reference` is the pure-torch implementation: the CPU path and the oracle the
fused kernels are tested against (autograd is torch's own). :func:`bottleneck` dispatches: the
Triton kernels (:mod:`prunepeft.backends.triton`) for CUDA tensors when Triton is installed, the
reference otherwise; ``PRUNEPEFT_BACKEND=triton`` forces the kernels (on CPU tensors that means the
Triton interpreter, ``TRITON_INTERPRET=1``), ``PRUNEPEFT_BACKEND=reference|native`` forces the
reference (the C++ extension has no bottleneck op).
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


def _use_triton(x: torch.Tensor, d: torch.Tensor) -> bool:
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
    skip masked units (``unit_scale == 0``) entirely, so ``h_abs_sum`` gets nothing added for them.
    """
    if _use_triton(x, d):
        from .backends import triton as triton_backend

        return triton_backend.bottleneck(x, d, ut, pieces, unit_scale, h_abs_sum)
    return bottleneck_reference(x, d, ut, pieces, unit_scale, h_abs_sum)


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
            the activation criterion. No gradient flows through it.

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
