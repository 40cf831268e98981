"""Triton backend: the GPU fast path of the bank's ops (kernels in :mod:`prunepeft_triton`).

Same functions and semantics as :mod:`prunepeft.backends.reference` (the oracle):

- :func:`block_stats` runs the one-pass Triton scoring kernel on the tensors' device. CPU tensors
  go to the interpreter when ``TRITON_INTERPRET=1``, else to the C++ (or reference) CPU pass: the
  bank hands CPU copies to its backend, and on CPU the C++ pass is the fast one.
- :func:`plan`, :func:`compact`, :func:`select_prune` are host metadata ops; they are the C++
  backend's (the reference's when the extension is not built).
- :func:`bottleneck` is :func:`prunepeft.ops.bottleneck_reference` computed by the batched
  block-sparse kernels, one ``torch.autograd.Function`` (inputs through ``save_for_backward``);
  :func:`bottleneck_group` is :func:`prunepeft.ops.bottleneck_group_reference` (every site of a
  layout group, e.g. q, k, v of one layer, in one launch) through the same Function.

Importing this module imports neither Triton nor the kernels; they load on first use.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ..layout import STAT_COLUMNS
from . import native, reference

__all__ = [
    "available", "plan", "compact", "block_stats", "select_prune", "bottleneck", "bottleneck_group", "STAT_COLUMNS",
]  # fmt: skip

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
    reference.check_segments(seg_t, total, n_owners, disjoint=sens is not None)


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


def _unit_rows(lo: int, hi: int, live: torch.Tensor) -> torch.Tensor:
    """Indices ``j`` in ``[lo, hi)`` with ``live[j]`` (CPU int64)."""
    return lo + live[lo:hi].nonzero().flatten()


def _units(d: torch.Tensor, ut: torch.Tensor, pieces, unit_scale: torch.Tensor):
    """The kernels' layout of one slab (active units ``unit_scale != 0``); cached per mask."""
    from prunepeft_triton import bottleneck as K

    sig = tuple((p.lo, p.hi, p.activation, p.bd is not None, p.bu is not None) for p in pieces)
    base = unit_scale._base if unit_scale._base is not None else unit_scale
    key = (unit_scale.storage_offset(), unit_scale.numel(), d.stride(0), ut.stride(0), str(d.device), sig)

    def build():
        live = (unit_scale.detach() != 0).cpu()
        has_bd = any(p.bd is not None for p in pieces)
        cols = []
        for p in pieces:
            rows = _unit_rows(p.lo, p.hi, live)
            bd = rows if has_bd else torch.full_like(rows, -1)  # bd: the pieces' biases concatenated
            act = torch.full_like(rows, _ACT_CODES[p.activation])
            cols.append(torch.stack([rows, rows * d.stride(0), rows * ut.stride(0), bd, act]))
        units = torch.cat(cols, 1) if cols else torch.zeros(5, 0, dtype=torch.int64)
        scale = unit_scale.detach()[units[0].to(unit_scale.device)]
        has_bu = any(p.bu is not None for p in pieces)
        return K.make_layout(units, scale, [units.shape[1]], [ut.shape[1]], [0 if has_bu else -1], d.device)

    return _unit_cache.get(base, key, build)


def _group_units(layout, unit_scale: torch.Tensor, device):
    """The kernels' layout of a layout group (see :class:`prunepeft.ops.GroupLayout`); cached per mask."""
    from prunepeft_triton import bottleneck as K

    base = unit_scale._base if unit_scale._base is not None else unit_scale
    key = (unit_scale.storage_offset(), unit_scale.numel(), str(device), layout)

    def build():
        live = (unit_scale.detach() != 0).cpu()
        K_in = layout.in_dim
        cols, counts, outs, bu_offs = [], [], [], []
        for s in layout.sites:
            n = 0
            bus = [p[4] for p in s.pieces if p[4] >= 0]
            if len(bus) > 1:
                raise ValueError(
                    f"triton bottleneck_group: site {s.site} has {len(bus)} output biases (max 1)"
                )
            for lo, hi, act, bd_off, _ in s.pieces:
                j = _unit_rows(s.lo + lo, s.lo + hi, live)  # units of the group
                local = j - s.lo
                bd = bd_off + (j - s.lo - lo) if bd_off >= 0 else torch.full_like(j, -1)
                code = torch.full_like(j, _ACT_CODES[act])
                cols.append(torch.stack([j, j * K_in, s.u_off + local * s.out_dim, bd, code]))
                n += j.numel()
            counts.append(n)
            outs.append(s.out_dim)
            bu_offs.append(bus[0] if bus else -1)
        units = torch.cat(cols, 1) if cols else torch.zeros(5, 0, dtype=torch.int64)
        scale = unit_scale.detach()[units[0].to(unit_scale.device)]
        return K.make_layout(units, scale, counts, outs, bu_offs, device)

    return _unit_cache.get(base, key, build)


class _BottleneckFn(torch.autograd.Function):
    """``out_s = (act(x @ D.T + bd) * scale) @ Ut_s + bu_s`` over the active units, per site ``s``.

    ``x`` is ``[M, K]``; ``d``, ``ut``, ``bd``, ``bu`` are the base tensors the layout's offsets
    index (the same tensor for a layout group's region: then its gradient is one buffer). ``meta``:
    ``(block_r, n_out, max_out, rmw, acts, splits, bu_map)`` with ``splits`` the ``(column, width)``
    of each output and ``bu_map`` the ``(column, width, offset into bu)`` of each output bias.
    Returns one ``[M, width]`` output per site.
    """

    @staticmethod
    def forward(ctx, x, d, ut, bd, bu, units, scale, tiles, h_abs_sum, meta):
        from prunepeft_triton import bottleneck as K

        lay = K.Layout(units, scale, tiles, *meta[:5])
        splits, bu_map = meta[5], meta[6]
        needs = ctx.needs_input_grad
        store_z = any(needs[:4])
        z = None
        if lay.n_units == 0:  # everything masked: no launch, the outputs are the biases
            out = x.new_zeros(x.shape[0], lay.n_out)
            for col, n, off in bu_map:
                out[:, col : col + n] += bu[off : off + n]
        else:
            out, z, habs = K.bottleneck_fwd(
                x, d, ut, bd, bu, lay, store_z=store_z, want_habs=h_abs_sum is not None
            )
            if habs is not None:
                h_abs_sum.index_add_(0, units[0].to(h_abs_sum.device), habs.sum(0).to(h_abs_sum.dtype))
        ctx.meta = meta
        params = (d, ut, bd, bu)
        # aliases: which earlier parameter input each one is (a group passes its region four times)
        ctx.owner = [next(j for j in range(4) if params[j] is p) if p is not None else -1 for p in params]
        ctx.save_for_backward(x, d, ut, bd, bu, units, scale, tiles, z)
        return tuple(out.narrow(1, col, n) for col, n in splits)

    @staticmethod
    def backward(ctx, *gouts):
        from prunepeft_triton import bottleneck as K

        x, d, ut, bd, bu, units, scale, tiles, z = ctx.saved_tensors
        meta = ctx.meta
        lay = K.Layout(units, scale, tiles, *meta[:5])
        bu_map = meta[6]
        needs = ctx.needs_input_grad
        gout = gouts[0] if len(gouts) == 1 else torch.cat(gouts, 1)
        gout = gout.contiguous()
        params = (d, ut, bd, bu)
        bufs: dict[int, torch.Tensor] = {}
        for i, p in enumerate(params):
            o = ctx.owner[i]
            if p is not None and needs[1 + i] and o not in bufs:
                bufs[o] = torch.zeros_like(params[o])
        buf = lambda i: bufs.get(ctx.owner[i]) if params[i] is not None else None  # noqa: E731
        dx = None
        if lay.n_units == 0:
            dx = torch.zeros_like(x) if needs[0] else None
        elif needs[0] or buf(0) is not None or buf(1) is not None or buf(2) is not None:
            dx, dz = K.bottleneck_bwd(gout, x, d, ut, lay, z, need_dx=needs[0], dd=buf(0), dut=buf(1))
            dbd = buf(2)
            if dbd is not None:
                has = units[3] >= 0
                dbd.index_put_((units[3][has],), dz.sum(0)[has].to(dbd.dtype), accumulate=True)
        dbu = buf(3)
        if dbu is not None and bu_map:
            gsum = gout.sum(0, dtype=torch.float32)
            for col, n, off in bu_map:
                dbu[off : off + n] += gsum[col : col + n].to(dbu.dtype)
        grads = [bufs.get(i) for i in range(4)]  # an alias gets None: its owner carries the gradient
        return dx, *grads, None, None, None, None, None


def _meta(lay, splits, bu_map) -> tuple:
    return (lay.block_r, lay.n_out, lay.max_out, lay.rmw, lay.acts, tuple(splits), tuple(bu_map))


def _check_dtype(t: torch.Tensor, fn: str) -> None:
    if t.dtype not in _DTYPES:
        raise ValueError(f"triton {fn}: dtype {t.dtype} not supported (float32, float16, bfloat16)")


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
    their unmasked ``|h|``; :meth:`prunepeft.bank.ModuleBank.activation_means` ignores masked
    blocks on both paths).
    """
    _check_dtype(d, "bottleneck")
    _require(x.device.type)
    W, K = d.shape
    if ut.shape[0] != W or unit_scale.shape != (W,) or x.shape[-1] != K:
        raise ValueError(
            f"triton bottleneck: shapes x {tuple(x.shape)}, d {tuple(d.shape)}, ut {tuple(ut.shape)}, "
            f"unit_scale {tuple(unit_scale.shape)} do not fit ([..., in], [W, in], [W, out], [W])"
        )
    d, ut = d.contiguous(), ut.contiguous()
    N = ut.shape[1]
    lead = x.shape[:-1]
    x2 = x.to(d.dtype).reshape(-1, K).contiguous()
    lay = _units(d, ut, pieces, unit_scale)
    bd = None
    if any(p.bd is not None for p in pieces):
        bd = torch.cat([p.bd if p.bd is not None else d.new_zeros(p.hi - p.lo) for p in pieces])
    bus = [p.bu for p in pieces if p.bu is not None]
    bu = None if not bus else (bus[0] if len(bus) == 1 else torch.stack(bus).sum(0))
    meta = _meta(lay, [(0, N)], [(0, N, 0)] if bu is not None else [])
    (out,) = _BottleneckFn.apply(x2, d, ut, bd, bu, lay.units, lay.scale, lay.tiles, h_abs_sum, meta)
    return out.reshape(*lead, N)


def bottleneck_group(
    x: torch.Tensor,
    region: torch.Tensor,
    layout,
    unit_scale: torch.Tensor,
    h_abs_sum: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """:func:`prunepeft.ops.bottleneck_group_reference` on the Triton kernels: every site of a
    layout group in one forward launch (and one set of backward launches); same arguments.

    ``dx`` is the sum over the sites; the region's gradient is one buffer (D, Ut, bias rows of the
    active units; pruned rows stay exactly 0). Masked units as in :func:`bottleneck`.
    """
    _check_dtype(region, "bottleneck_group")
    _require(x.device.type)
    K = layout.in_dim
    if region.dim() != 1 or region.numel() != layout.size or unit_scale.shape != (layout.width,):
        raise ValueError(
            f"triton bottleneck_group: region {tuple(region.shape)} / unit_scale {tuple(unit_scale.shape)} "
            f"do not fit the layout ([{layout.size}] / [{layout.width}])"
        )
    if x.shape[-1] != K:
        raise ValueError(f"triton bottleneck_group: x has {x.shape[-1]} features, the group reads {K}")
    lead = x.shape[:-1]
    x2 = x.to(region.dtype).reshape(-1, K).contiguous()
    lay = _group_units(layout, unit_scale, region.device)
    splits, bu_map, col = [], [], 0
    for s in layout.sites:
        splits.append((col, s.out_dim))
        bu_map += [(col, s.out_dim, p[4]) for p in s.pieces if p[4] >= 0]
        col += s.out_dim
    has_bd = any(p[3] >= 0 for s in layout.sites for p in s.pieces)
    meta = _meta(lay, splits, bu_map)
    outs = _BottleneckFn.apply(
        x2, region, region, region if has_bd else None, region if bu_map else None,
        lay.units, lay.scale, lay.tiles, h_abs_sum, meta,
    )  # fmt: skip
    return [o.reshape(*lead, s.out_dim) for o, s in zip(outs, layout.sites, strict=True)]
