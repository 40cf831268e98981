"""Triton backend: the GPU fast path of the bank's ops (kernels in :mod:`prunepeft_triton`).

Same functions and semantics as :mod:`prunepeft.backends.reference` (the oracle):

- :func:`block_stats` runs the one-pass Triton scoring kernel on the tensors' device. CPU tensors
  go to the interpreter when ``TRITON_INTERPRET=1``, else to the C++ (or reference) CPU pass: the
  bank hands CPU copies to its backend, and on CPU the C++ pass is the fast one.
- :func:`plan`, :func:`compact`, :func:`select_prune` are host metadata ops; they are the C++
  backend's (the reference's when the extension is not built).
- :func:`bottleneck` is :func:`prunepeft.ops.bottleneck_reference` computed by the batched
  block-sparse kernels, one ``torch.autograd.Function`` (inputs through ``save_for_backward``).

Importing this module imports neither Triton nor the kernels; they load on first use.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import native, reference
from .reference import STAT_COLUMNS

__all__ = ["available", "plan", "compact", "block_stats", "select_prune", "bottleneck", "STAT_COLUMNS"]

_ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cpu_backend():
    return native if native.available() else reference


def unavailable_reason(device_type: str = "cuda") -> str | None:
    """Why the Triton kernels cannot run on ``device_type`` tensors (None if they can)."""
    try:
        import prunepeft_triton
    except ImportError as e:  # the package ships with prunepeft; a broken install lands here
        return f"prunepeft_triton cannot be imported ({e})"
    return prunepeft_triton.unavailable_reason(device_type)


def available(device_type: str = "cuda") -> bool:
    """Whether the Triton kernels can run on ``device_type`` tensors (CUDA is not initialised)."""
    return unavailable_reason(device_type) is None


def _require(device_type: str) -> None:
    why = unavailable_reason(device_type)
    if why is not None:
        raise RuntimeError(f"prunepeft triton backend: {why}")


# --------------------------------------------------------------------------- metadata ops (host)


def plan(in_dim, out_dim, width, block_size, group, has_bias) -> dict[str, Any]:
    """Lay out a bank; see :func:`prunepeft.backends.reference.plan`."""
    return _cpu_backend().plan(in_dim, out_dim, width, block_size, group, has_bias)


def compact(in_dim, out_dim, width, block_size, group, has_bias, keep):
    """Drop blocks from a bank; see :func:`prunepeft.backends.reference.compact`."""
    return _cpu_backend().compact(in_dim, out_dim, width, block_size, group, has_bias, keep)


def select_prune(scores, costs, group, group_extra, eligible, current: int, target: int) -> torch.Tensor:
    """Greedy budget-constrained selection; see :func:`prunepeft.backends.reference.select_prune`."""
    return _cpu_backend().select_prune(scores, costs, group, group_extra, eligible, current, target)


# --------------------------------------------------------------------------- scoring


class _Cache:
    """A few derived tables keyed on a source tensor's identity and version (weakly held)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.items: dict[tuple, tuple[weakref.ref, Any]] = {}

    def get(self, src: torch.Tensor, key: tuple, build):
        full = (id(src), src._version, *key)
        hit = self.items.get(full)
        if hit is not None and hit[0]() is src:
            return hit[1]
        if len(self.items) >= self.size:
            self.items.clear()
        value = build()
        self.items[full] = (weakref.ref(src), value)
        return value


_csr_cache = _Cache()
_unit_cache = _Cache()


def _check_block_stats(param, grad, seg, n_owners, threshold, sens, unc, beta1, beta2, accum, accum_beta):
    """The reference's argument checks (same messages) for the device path."""
    fn = "block_stats"
    reference._float_data(param, fn, "param", torch.float32, 1)
    total = param.shape[0]
    for name, t in (("grad", grad), ("sens", sens), ("unc", unc)):
        if t is not None:
            reference._float_data(t, fn, name, torch.float32, 1)
            if t.shape[0] != total:
                raise ValueError(f"{fn}: {name} has {t.shape[0]} elements, expected {total} (len(param))")
            if t.device != param.device:
                raise ValueError(f"{fn}: {name} is on {t.device}, param on {param.device}")
            if name != "grad" and not t.is_contiguous():
                raise ValueError(f"{fn}: {name} must be contiguous (it is updated in place)")
    if (sens is None) != (unc is None):
        raise ValueError(f"{fn}: sens and unc must be given together")
    if n_owners < 0:
        raise ValueError(f"{fn}: n_owners = {n_owners} must be >= 0")
    seg_t = reference._int_array(seg, fn, "seg", ndim=2)
    if seg_t.shape[1] != 3:
        raise ValueError(f"{fn}: seg must have shape (n_segs, 3), got {tuple(seg_t.shape)}")
    if accum is not None:
        reference._float_data(accum, fn, "accum", torch.float64, 2)
        if tuple(accum.shape) != (n_owners, 8):
            raise ValueError(
                f"{fn}: accum must have shape (n_owners, 8) = ({n_owners}, 8), got {tuple(accum.shape)}"
            )
    if math.isnan(threshold):
        raise ValueError(f"{fn}: threshold must not be NaN")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"{fn}: {name} = {b} must be in [0, 1]")
    if math.isnan(accum_beta) or accum_beta > 1.0:
        raise ValueError(f"{fn}: accum_beta = {accum_beta} must be < 0 (running sum) or in [0, 1] (EMA)")
    return seg_t


def _check_seg(seg_t: torch.Tensor, total: int, n_owners: int, sens) -> None:
    """The segment table's checks (cached with the table's owner CSR: a table is checked once)."""
    fn = "block_stats"
    offs, lens, owners = seg_t.unbind(1)
    bad = (offs < 0) | (lens < 0) | (offs > total) | (lens > total - offs)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        o, ln, w = seg_t[i].tolist()
        raise ValueError(f"{fn}: seg[{i}] = ({o}, {ln}, {w}) lies outside param of {total} elements")
    bad = (owners < 0) | (owners >= n_owners)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{fn}: seg[{i}] owner = {int(owners[i])} is outside [0, n_owners = {n_owners})")
    if sens is not None:
        nz = (lens > 0).nonzero().flatten()
        order = nz[torch.argsort(offs[nz], stable=True)]
        ends = offs[order] + lens[order]
        clash = (offs[order][1:] < ends[:-1]).nonzero().flatten()
        if clash.numel():
            a, b = sorted((int(order[clash[0]]), int(order[clash[0] + 1])))
            raise ValueError(
                f"{fn}: seg[{a}] and seg[{b}] overlap; in-place sens/unc updates need disjoint segments"
            )


def block_stats(
    param: torch.Tensor,
    grad: torch.Tensor | None,
    seg,
    n_owners: int,
    threshold: float,
    sens: torch.Tensor | None = None,
    unc: torch.Tensor | None = None,
    beta1: float = 0.85,
    beta2: float = 0.85,
    accum: torch.Tensor | None = None,
    accum_beta: float = -1.0,
    n_threads: int = 0,
) -> torch.Tensor:
    """Per-owner statistics in one Triton pass; see :func:`prunepeft.backends.reference.block_stats`.

    ``param``, ``grad``, ``sens``, ``unc`` share a device; ``accum`` may live on the CPU (it is
    updated on the device and copied back). Columns 0-3 carry float32-product rounding (relative
    error ~1e-7, like the C++ pass); counts, ``sens``/``unc`` and column 6 follow the reference's
    float64 arithmetic. ``n_threads`` is validated and ignored. CPU tensors without
    ``TRITON_INTERPRET=1`` are scored by the C++ (or reference) CPU pass.
    """
    if isinstance(param, torch.Tensor) and param.device.type == "cpu" and not available("cpu"):
        return _cpu_backend().block_stats(
            param, grad, seg, n_owners, threshold, sens, unc, beta1, beta2, accum, accum_beta, n_threads
        )
    n_owners, threshold = int(n_owners), float(threshold)
    beta1, beta2, accum_beta = float(beta1), float(beta2), float(accum_beta)
    if int(n_threads) < 0:
        raise ValueError(f"block_stats: n_threads = {int(n_threads)} must be >= 0 (0 = all hardware threads)")
    seg_t = _check_block_stats(
        param, grad, seg, n_owners, threshold, sens, unc, beta1, beta2, accum, accum_beta
    )
    _require(param.device.type)
    from prunepeft_triton import scoring

    dev = param.device
    total = param.shape[0]
    key = (tuple(seg_t.shape), n_owners, total, sens is not None, str(dev))
    src = seg if isinstance(seg, torch.Tensor) else seg_t

    def build():
        _check_seg(seg_t, total, n_owners, sens)
        return scoring.owner_csr(seg_t, n_owners, dev)

    csr = _csr_cache.get(src, key, build)
    acc_dev = None
    if accum is not None:
        acc_dev = accum if accum.device == dev else accum.to(dev)
    stats = scoring.block_stats(
        param.detach().contiguous(),
        None if grad is None else grad.detach().contiguous(),
        csr, n_owners, threshold, sens, unc, beta1, beta2, acc_dev, accum_beta,
    )  # fmt: skip
    if accum is not None and acc_dev is not accum:
        with torch.no_grad():
            accum.copy_(acc_dev)
    return stats


# --------------------------------------------------------------------------- bottleneck


@dataclass(frozen=True)
class _Units:
    """The active-unit table of a slab (see :mod:`prunepeft_triton.bottleneck`)."""

    table: torch.Tensor  # int64 [4, R]: row, D row offset, Ut row offset, activation code
    scale: torch.Tensor  # [R], unit_scale of the active units
    acts: tuple[bool, bool, bool]  # relu / gelu / silu present among the active units


def _units(d: torch.Tensor, ut: torch.Tensor, pieces, unit_scale: torch.Tensor) -> _Units:
    """Active units (``unit_scale != 0``) with their offsets; cached per mask (one host sync each)."""
    sig = tuple((p.lo, p.hi, p.activation) for p in pieces)
    base = unit_scale._base if unit_scale._base is not None else unit_scale
    key = (unit_scale.storage_offset(), unit_scale.numel(), d.stride(0), ut.stride(0), str(d.device), sig)

    def build() -> _Units:
        codes = torch.zeros(unit_scale.numel(), dtype=torch.int64)
        for p in pieces:
            codes[p.lo : p.hi] = _ACT_CODES[p.activation]
        rows = (unit_scale.detach() != 0).nonzero().flatten().cpu()
        act = codes[rows]
        table = torch.stack([rows, rows * d.stride(0), rows * ut.stride(0), act]).to(d.device)
        present = set(act.tolist())
        return _Units(table, unit_scale.detach()[rows.to(unit_scale.device)].contiguous(),
                      (1 in present, 2 in present, 3 in present))  # fmt: skip

    return _unit_cache.get(base, key, build)


class _BottleneckFn(torch.autograd.Function):
    """``out = (act(x @ D.T + bd) * scale) @ Ut + bu`` over the active units; x is ``[M, K]``."""

    @staticmethod
    def forward(ctx, x, d, ut, bd, bu, table, scale, h_abs_sum, acts):
        from prunepeft_triton import bottleneck as K

        rows = table[0]
        needs = ctx.needs_input_grad
        store_z = any(needs[:5])
        if table.shape[1] == 0:  # everything masked: no launch
            out = x.new_zeros(x.shape[0], ut.shape[1])
            if bu is not None:
                out += bu
            z = None
        else:
            out, z, habs = K.bottleneck_fwd(
                x, d, ut, bd, bu, table, scale, acts, store_z=store_z, want_habs=h_abs_sum is not None
            )
            if habs is not None:
                h_abs_sum.index_add_(0, rows.to(h_abs_sum.device), habs.sum(0).to(h_abs_sum.dtype))
        ctx.acts = acts
        ctx.has_bd, ctx.has_bu = bd is not None, bu is not None
        ctx.save_for_backward(x, d, ut, table, scale, z)
        return out

    @staticmethod
    def backward(ctx, gout):
        from prunepeft_triton import bottleneck as K

        x, d, ut, table, scale, z = ctx.saved_tensors
        need_x, need_d, need_u, need_bd, need_bu = ctx.needs_input_grad[:5]
        gout = gout.contiguous()
        dx = dd = dut = dbd = dbu = None
        if table.shape[1] == 0:
            dx = torch.zeros_like(x) if need_x else None
            dd = torch.zeros_like(d) if need_d else None
            dut = torch.zeros_like(ut) if need_u else None
            dbd = x.new_zeros(d.shape[0]) if need_bd else None
        elif need_x or need_d or need_u or need_bd:
            dx, dd, dut, dz = K.bottleneck_bwd(
                gout, x, d, ut, table, scale, z, ctx.acts, need_dx=need_x, need_dd=need_d, need_dut=need_u
            )
            if need_bd:
                dbd = torch.zeros(d.shape[0], dtype=torch.float32, device=x.device)
                dbd.index_copy_(0, table[0], dz.sum(0))
                dbd = dbd.to(d.dtype)
        if need_bu and ctx.has_bu:
            dbu = gout.sum(0, dtype=torch.float32).to(gout.dtype)
        return dx, dd, dut, dbd, dbu, None, None, None, None


def bottleneck(
    x: torch.Tensor,
    d: torch.Tensor,
    ut: torch.Tensor,
    pieces: Sequence,
    unit_scale: torch.Tensor,
    h_abs_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`prunepeft.ops.bottleneck_reference` on the Triton kernels (same arguments).

    Units with ``unit_scale == 0`` (masked blocks) are skipped entirely: no loads, no FLOPs, their
    gradients are exactly 0, and ``h_abs_sum`` gets nothing added for them (the reference adds
    their unmasked ``|h|``; a masked block is not scored again).
    """
    if d.dtype not in _DTYPES:
        raise ValueError(f"triton bottleneck: dtype {d.dtype} not supported (float32, float16, bfloat16)")
    _require(x.device.type)
    W, K = d.shape
    if ut.shape[0] != W or unit_scale.shape != (W,) or x.shape[-1] != K:
        raise ValueError(
            f"triton bottleneck: shapes x {tuple(x.shape)}, d {tuple(d.shape)}, ut {tuple(ut.shape)}, "
            f"unit_scale {tuple(unit_scale.shape)} do not fit ([..., in], [W, in], [W, out], [W])"
        )
    d, ut = d.contiguous(), ut.contiguous()
    lead = x.shape[:-1]
    x2 = x.to(d.dtype).reshape(-1, K).contiguous()
    units = _units(d, ut, pieces, unit_scale)
    bd = None
    if any(p.bd is not None for p in pieces):
        bd = torch.cat([p.bd if p.bd is not None else d.new_zeros(p.hi - p.lo) for p in pieces])
    bus = [p.bu for p in pieces if p.bu is not None]
    bu = None if not bus else (bus[0] if len(bus) == 1 else torch.stack(bus).sum(0))
    out = _BottleneckFn.apply(x2, d, ut, bd, bu, units.table, units.scale, h_abs_sum, units.acts)
    return out.reshape(*lead, ut.shape[1])
