"""Batched, block-sparse bottleneck forward and backward (Triton).

Computes, for the candidates of one or several sites that share the input ``x``::

    z = x @ D[active].T + bd[active]      h = act(z)      out_s = (h_s * scale_s) @ Ut_s + bu_s

where ``s`` runs over the sites (a layout group: e.g. the q, k and v linears of one layer), each
with its own output width; the outputs are column ranges of one ``[M, sum(out)]`` buffer.

Design trade-off
----------------
*Sparsity by unit table, not by mask.* The host builds, once per mask (cached), a table of the
*active* units: for unit ``j``, the element offsets of its D row, Ut row and bias from the base
pointers, its activation code and scale. The kernels iterate over that table in unit *tiles* of at
most ``BLOCK_R`` units and gather rows through it, so a pruned block costs no loads and no FLOPs,
whatever its size (block sizes of 4 work as well as 64), and candidates of different kinds,
activations, widths and biases share one tile (the activation is chosen per unit with
``tl.where``; only the activations present are compiled in). Offsets, not pointers, index the
rows (the interpreter cannot follow pointer tables), so the same kernels serve any set of rows of
one base tensor: one (site, tap) slab, or a whole layout group, whose D, Ut and bias rows all lie
in one region of the bank. Cost: gathered rows instead of one strided 2-D block (rows are
contiguous along ``K``/``N``, so loads stay coalesced) and one host sync per new mask to build
the table.

*Heterogeneous outputs by tile table.* A second table lists the unit tiles: first and end unit,
the first output column and the width of the tile's site, and whether it is the site's first tile.
A tile never spans two sites (a site's active units are cut into ``BLOCK_R`` tiles, the last one
partial), so the up-projection of a tile writes one column range, and sites of different output
widths (q 4096, k/v 1024 under GQA, ...) share one launch. A site whose units are all masked keeps
one empty tile that writes its ``bu`` (or zeros). Cost: a partial tile per site (a rank-8 LoRA
uses 8 of 16 lanes of its tile); the alternative, padding the unit table, costs the same.

*Forward in one launch.* A program owns ``BLOCK_M`` tokens: for each tile it computes its
``[BLOCK_M, BLOCK_R]`` tile of ``z`` (loop over ``K``), applies bias, activation, the ``|h|``
partial sum and the scale as an epilogue, then multiplies by the ``Ut`` rows and writes the
output tiles of the tile's site (loop over its columns). ``h`` never goes to memory; ``z``
(pre-activation, float32, ``R`` values per token, tiny next to ``x``) is stored for the backward
when gradients are needed. A site with more active units than ``BLOCK_R`` has its output
read-modified-written in float32. ``N_SPLIT > 1`` adds programs along the columns (each
recomputing its ``z`` tiles) when there are too few token tiles to fill the GPU; the trade
(down-projection FLOPs x N_SPLIT vs. occupancy) is for the GPU benchmark to settle (no GPU was
available when this was written: the launch parameters are untuned).

*Backward in three launches.* (1) per token tile: ``dz = (dout_s @ Ut_s[active].T) * scale *
act'(z)`` per tile (stored, float32) and ``dx = sum over tiles of dz @ D[active]`` -- for a group,
the sum over all its sites, since they read the same ``x``; (2) ``dD[active] = dz.T @ x`` and (3)
``dUt[active] = (act(z) * scale).T @ dout_s``, each a grid over (unit tiles, column tiles) looping
over tokens, written through the same row-offset table (both may write into one buffer: the rows
are disjoint), so the rows of pruned units are never touched and stay exactly 0. ``dbd`` and
``dbu`` are column sums done by torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised only without triton
    raise ImportError("prunepeft_triton.bottleneck needs Triton (`pip install triton`)") from e

from ._util import clamp_block, interpreting

__all__ = ["ACT_CODES", "Layout", "make_layout", "bottleneck_fwd", "bottleneck_bwd"]

#: Activation name -> code in the unit table.
ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3}


@triton.jit
def _act(z, a, HAS_RELU: tl.constexpr, HAS_GELU: tl.constexpr, HAS_SILU: tl.constexpr):
    """act(z) with the activation chosen per unit by code ``a`` (broadcast against ``z``)."""
    h = z
    if HAS_RELU:
        h = tl.where(a == 1, tl.maximum(z, 0.0), h)
    if HAS_GELU:
        h = tl.where(a == 2, 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476)), h)
    if HAS_SILU:
        h = tl.where(a == 3, z * tl.sigmoid(z), h)
    return h


@triton.jit
def _act_grad(z, a, HAS_RELU: tl.constexpr, HAS_GELU: tl.constexpr, HAS_SILU: tl.constexpr):
    """d act(z) / dz, per unit code ``a`` (relu'(0) = 0 like torch)."""
    dg = z * 0.0 + 1.0
    if HAS_RELU:
        dg = tl.where(a == 1, (z > 0.0).to(tl.float32), dg)
    if HAS_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        dg = tl.where(a == 2, cdf + z * pdf, dg)
    if HAS_SILU:
        sg = tl.sigmoid(z)
        dg = tl.where(a == 3, sg * (1.0 + z * (1.0 - sg)), dg)
    return dg


@triton.jit
def _tile(tiles_ptr, t, T):
    """Tile ``t`` of the tile table ``[6, T]``: first unit, end unit, first output column, output
    columns, whether it is its site's first tile, offset of its site's ``bu`` (-1: none)."""
    r0 = tl.load(tiles_ptr + t).to(tl.int32)
    r1 = tl.load(tiles_ptr + T + t).to(tl.int32)
    col = tl.load(tiles_ptr + 2 * T + t).to(tl.int32)
    ncol = tl.load(tiles_ptr + 3 * T + t).to(tl.int32)
    first = tl.load(tiles_ptr + 4 * T + t).to(tl.int32)
    bu_off = tl.load(tiles_ptr + 5 * T + t)
    return r0, r1, col, ncol, first, bu_off


@triton.jit
def _bottleneck_fwd_kernel(
    # activations: x [M, K], out [M, n_out], z [M, R] (float32), |h| partials [n_m_tiles, R] (float32)
    x_ptr,
    out_ptr,
    z_ptr,
    habs_ptr,
    stride_xm,
    stride_om,
    stride_zm,
    # parameters: base pointers, and per active unit j < R: element offset of its D row, Ut row and
    # bias (into bd; -1: none), activation code and scale; each tile names its site's bu offset
    d_ptr,
    ut_ptr,
    bd_ptr,
    bu_ptr,
    doff_ptr,
    uoff_ptr,
    bdoff_ptr,
    act_ptr,
    scale_ptr,
    # unit tiles [6, T] (see _tile)
    tiles_ptr,
    # sizes
    M,
    K,
    R,
    T,
    # what to do
    HAS_BD: tl.constexpr,
    HAS_BU: tl.constexpr,
    STORE_Z: tl.constexpr,
    HAS_HABS: tl.constexpr,
    HAS_RELU: tl.constexpr,
    HAS_GELU: tl.constexpr,
    HAS_SILU: tl.constexpr,
    N_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rm64 = rm.to(tl.int64)
    for t in range(0, T):
        r0, r1, col, ncol, first, bu_off = _tile(tiles_ptr, t, T)
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < r1
        d_off = tl.load(doff_ptr + rr, mask=r_ok, other=0)
        u_off = tl.load(uoff_ptr + rr, mask=r_ok, other=0)
        # down-projection over the active units of this tile (none: an empty tile writes bu only)
        z = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        k_end = tl.where(r1 > r0, K, 0)
        for k0 in range(0, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            xt = tl.load(
                x_ptr + rm64[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
            )
            dt = tl.load(d_ptr + d_off[None, :] + kk[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
            z = tl.dot(xt, dt, acc=z, input_precision=DOT_PREC)
        # epilogue: bias, activation, |h| statistics, scale
        if HAS_BD:
            bdo = tl.load(bdoff_ptr + rr, mask=r_ok, other=-1)
            z += tl.load(bd_ptr + bdo, mask=bdo >= 0, other=0.0).to(tl.float32)[None, :]
        a = tl.load(act_ptr + rr, mask=r_ok, other=0)[None, :]
        h = _act(z, a, HAS_RELU, HAS_GELU, HAS_SILU)
        if pid_n == 0:
            if STORE_Z:
                tl.store(
                    z_ptr + rm64[:, None] * stride_zm + rr[None, :], z, mask=m_ok[:, None] & r_ok[None, :]
                )
            if HAS_HABS:
                part = tl.sum(tl.where(m_ok[:, None], tl.abs(h), 0.0), axis=0)
                tl.store(habs_ptr + pid_m.to(tl.int64) * R + rr, part, mask=r_ok)
        sc = tl.load(scale_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
        hs = (h * sc[None, :]).to(ut_ptr.dtype.element_ty)
        # up-projection into the output columns of the tile's site
        for n0 in range(pid_n * BLOCK_N, ncol, N_SPLIT * BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            n_ok = nn < ncol
            o_ptrs = out_ptr + rm64[:, None] * stride_om + (col + nn)[None, :]
            o_mask = m_ok[:, None] & n_ok[None, :]
            # the site's first tile starts from bu (or 0); later tiles read-modify-write (scalar
            # conditions are broadcast to vectors before they enter a mask: the interpreter needs it)
            first_n = (nn * 0 + first) != 0
            acc = tl.load(o_ptrs, mask=o_mask & ~first_n[None, :], other=0.0).to(tl.float32)
            if HAS_BU:
                bu_ok = n_ok & first_n & ((nn * 0 + bu_off) >= 0)
                acc += tl.load(bu_ptr + bu_off + nn, mask=bu_ok, other=0.0).to(tl.float32)[None, :]
            ut = tl.load(ut_ptr + u_off[:, None] + nn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(hs, ut, acc=acc, input_precision=DOT_PREC)
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _bottleneck_bwd_dx_kernel(
    # activations: dout [M, n_out], z [M, R] (float32), dz [M, R] (float32, written), dx [M, K] (written)
    g_ptr,
    z_ptr,
    dz_ptr,
    dx_ptr,
    stride_gm,
    stride_zm,
    stride_dxm,
    # parameters, the active-unit table and the unit tiles (see the forward kernel)
    d_ptr,
    ut_ptr,
    doff_ptr,
    uoff_ptr,
    act_ptr,
    scale_ptr,
    tiles_ptr,
    M,
    K,
    R,
    T,
    HAS_RELU: tl.constexpr,
    HAS_GELU: tl.constexpr,
    HAS_SILU: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rm64 = rm.to(tl.int64)
    for t in range(0, T):
        r0, r1, col, ncol, _first, _bu = _tile(tiles_ptr, t, T)
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < r1
        d_off = tl.load(doff_ptr + rr, mask=r_ok, other=0)
        u_off = tl.load(uoff_ptr + rr, mask=r_ok, other=0)
        dh = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        n_end = tl.where(r1 > r0, ncol, 0)
        for n0 in range(0, n_end, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            n_ok = nn < ncol
            g = tl.load(
                g_ptr + rm64[:, None] * stride_gm + (col + nn)[None, :],
                mask=m_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            utt = tl.load(
                ut_ptr + u_off[None, :] + nn[:, None], mask=r_ok[None, :] & n_ok[:, None], other=0.0
            )
            dh = tl.dot(g, utt, acc=dh, input_precision=DOT_PREC)
        zr_mask = m_ok[:, None] & r_ok[None, :]
        z = tl.load(z_ptr + rm64[:, None] * stride_zm + rr[None, :], mask=zr_mask, other=0.0)
        a = tl.load(act_ptr + rr, mask=r_ok, other=0)[None, :]
        sc = tl.load(scale_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
        dz = dh * sc[None, :] * _act_grad(z, a, HAS_RELU, HAS_GELU, HAS_SILU)
        dz = tl.where(zr_mask, dz, 0.0)
        tl.store(dz_ptr + rm64[:, None] * stride_zm + rr[None, :], dz, mask=zr_mask)
        dzc = dz.to(d_ptr.dtype.element_ty)
        # dx = sum over tiles (over all sites of a group: they read the same x); tile 0 initialises
        k_end = tl.where((r1 > r0) | (t == 0), K, 0)
        for k0 in range(0, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            x_ptrs = dx_ptr + rm64[:, None] * stride_dxm + kk[None, :]
            x_mask = m_ok[:, None] & k_ok[None, :]
            acc = tl.load(x_ptrs, mask=x_mask & ((kk * 0 + t) > 0)[None, :], other=0.0).to(tl.float32)
            dt = tl.load(d_ptr + d_off[:, None] + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(dzc, dt, acc=acc, input_precision=DOT_PREC)
            tl.store(x_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=x_mask)


@triton.jit
def _bottleneck_wgrad_kernel(
    # a [M, R] float32 (dz, or z when FROM_Z), b [M, *] (x, or dout with the tile's site columns
    # when FROM_Z); out rows at out_ptr + off[j]
    a_ptr,
    b_ptr,
    out_ptr,
    stride_am,
    stride_bm,
    off_ptr,
    act_ptr,
    scale_ptr,
    tiles_ptr,
    M,
    C,
    T,
    FROM_Z: tl.constexpr,
    HAS_RELU: tl.constexpr,
    HAS_GELU: tl.constexpr,
    HAS_SILU: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    r0, r1, col, ncol, _first, _bu = _tile(tiles_ptr, pid_t, T)
    if not FROM_Z:  # dD: columns of x, the same for every tile
        col = 0
        ncol = C
    rr = r0 + tl.arange(0, BLOCK_R)
    r_ok = rr < r1
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < ncol
    if FROM_Z:
        a_code = tl.load(act_ptr + rr, mask=r_ok, other=0)[:, None]
        sc = tl.load(scale_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    m_end = tl.where((r1 > r0) & (pid_c * BLOCK_C < ncol), M, 0)  # empty tile / past its columns
    for m0 in range(0, m_end, BLOCK_M):
        mm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = mm < M
        at = tl.load(
            a_ptr + mm[None, :] * stride_am + rr[:, None], mask=r_ok[:, None] & m_ok[None, :], other=0.0
        )
        if FROM_Z:  # h * scale; act(0) = 0 for every activation, so masked entries stay 0
            at = _act(at, a_code, HAS_RELU, HAS_GELU, HAS_SILU) * sc
        bt = tl.load(
            b_ptr + mm[:, None] * stride_bm + (col + cc)[None, :],
            mask=m_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(at.to(b_ptr.dtype.element_ty), bt, acc=acc, input_precision=DOT_PREC)
    off = tl.load(off_ptr + rr, mask=r_ok, other=0)
    tl.store(
        out_ptr + off[:, None] + cc[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=r_ok[:, None] & c_ok[None, :],
    )


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class Layout:
    """What a launch computes: the active units, their tiles and the output columns.

    ``units``: int64 ``[5, R]`` per active unit: its row (unit index in the caller's numbering, for
    the ``|h|`` statistics), D row offset, Ut row offset, bias offset (-1: none), activation code;
    ``scale`` ``[R]``; ``tiles``: int64 ``[6, T]`` (first unit, end unit, first output column,
    output columns, first tile of its site, its site's ``bu`` offset), built for ``block_r``;
    ``n_out``: total output columns; ``max_out``: the widest site; ``rmw``: some site has more than
    one tile (its output is accumulated in float32); ``acts``: whether relu / gelu / silu occur.
    """

    units: torch.Tensor
    scale: torch.Tensor
    tiles: torch.Tensor
    block_r: int
    n_out: int
    max_out: int
    rmw: bool
    acts: tuple[bool, bool, bool]

    @property
    def n_units(self) -> int:
        return int(self.units.shape[1])


def make_layout(
    units: torch.Tensor,
    scale: torch.Tensor,
    counts: Sequence[int],
    outs: Sequence[int],
    bu_offs: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> Layout:
    """A :class:`Layout` for sites with ``counts[s]`` active units (consecutive in the CPU table
    ``units``, site by site), ``outs[s]`` output columns (consecutive in the output, site by site)
    and their ``bu`` at element ``bu_offs[s]`` of the ``bu`` base tensor (-1: none)."""
    bu_offs = [-1] * len(counts) if bu_offs is None else bu_offs
    block_r = clamp_block(max(counts, default=1), 16, 64)
    rows: list[tuple[int, ...]] = []
    r = col = 0
    for cnt, n, bo in zip(counts, outs, bu_offs, strict=True):
        starts = range(r, r + cnt, block_r) if cnt else [r]
        for i, r0 in enumerate(starts):
            rows.append((r0, min(r0 + block_r, r + cnt), col, n, int(i == 0), bo))
        r += cnt
        col += n
    if r != units.shape[1]:
        raise ValueError(f"make_layout: counts sum to {r}, the unit table has {units.shape[1]} units")
    tiles = torch.tensor(rows, dtype=torch.int64).reshape(-1, 6).t().contiguous()
    present = set(units[4].tolist())
    return Layout(
        units=units.to(device).contiguous(),
        scale=scale.contiguous(),
        tiles=tiles.to(device),
        block_r=block_r,
        n_out=col,
        max_out=max(outs, default=0),
        rmw=any(c > block_r for c in counts),
        acts=(1 in present, 2 in present, 3 in present),
    )


def _dot_prec(dtype: torch.dtype) -> str:
    # float32 banks must match torch's float32 matmul (no TF32 by default); 16-bit inputs ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(M: int, K: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N). The interpreter pays per program and per loop step, not per
    element, so it gets the largest blocks; GPU values are untuned first guesses."""
    if interpreting():
        return clamp_block(M, 16, 64), clamp_block(K, 16, 128), clamp_block(N, 16, 128)
    return clamp_block(M, 16, 64), 64, 64


def _flags(acts: tuple[bool, bool, bool]) -> dict[str, bool]:
    return {"HAS_RELU": acts[0], "HAS_GELU": acts[1], "HAS_SILU": acts[2]}


def bottleneck_fwd(
    x: torch.Tensor,
    d: torch.Tensor,
    ut: torch.Tensor,
    bd: torch.Tensor | None,
    bu: torch.Tensor | None,
    lay: Layout,
    store_z: bool,
    want_habs: bool,
    n_split: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Forward for ``x [M, K]`` (contiguous rows) over the active units of ``lay`` (``R >= 1``).

    ``d`` / ``ut`` / ``bd`` / ``bu``: base tensors the tables' offsets index (may all be one
    tensor); ``bd`` / ``bu`` None when no unit / site has one. Returns ``(out [M, n_out] in x's dtype, z [M, R] float32 or
    None, |h| partials [tiles, R] or None)``.
    """
    M, K = x.shape
    R, T = lay.n_units, lay.tiles.shape[1]
    BM, BK, BN = _blocks(M, K, lay.max_out)
    n_m = triton.cdiv(M, BM)
    dev = x.device
    out = torch.empty(M, lay.n_out, dtype=torch.float32 if lay.rmw else x.dtype, device=dev)
    z = torch.empty(M, R, dtype=torch.float32, device=dev) if store_z else None
    habs = torch.empty(n_m, R, dtype=torch.float32, device=dev) if want_habs else None
    n_split = max(1, min(n_split, triton.cdiv(lay.max_out, BN)))
    u = lay.units
    _bottleneck_fwd_kernel[(n_m, n_split)](
        x, out, z if z is not None else out, habs if habs is not None else out,
        x.stride(0), out.stride(0), R,
        d, ut, bd if bd is not None else d, bu if bu is not None else d,
        u[1], u[2], u[3], u[4], lay.scale, lay.tiles,
        M, K, R, T,
        HAS_BD=bd is not None, HAS_BU=bu is not None, STORE_Z=store_z, HAS_HABS=want_habs,
        N_SPLIT=n_split, DOT_PREC=_dot_prec(x.dtype),
        BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=lay.block_r, BLOCK_N=BN, **_flags(lay.acts),
    )  # fmt: skip
    return out.to(x.dtype), z, habs


def bottleneck_bwd(
    gout: torch.Tensor,
    x: torch.Tensor,
    d: torch.Tensor,
    ut: torch.Tensor,
    lay: Layout,
    z: torch.Tensor,
    need_dx: bool = True,
    dd: torch.Tensor | None = None,
    dut: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Backward of :func:`bottleneck_fwd` for ``gout [M, n_out]``: returns ``(dx, dz)``.

    The rows of the active units' D / Ut gradients are written into ``dd`` / ``dut`` (zeroed
    buffers shaped like ``d`` / ``ut``, may be one tensor; None: not computed); the rows of inactive
    units are never touched. ``dz`` ``[M, R]`` float32 is returned for the bias gradient.
    """
    M, K = x.shape
    R, T = lay.n_units, lay.tiles.shape[1]
    BM, BK, BN = _blocks(M, K, lay.max_out)
    BR = lay.block_r
    dev = x.device
    prec = _dot_prec(x.dtype)
    flags = _flags(lay.acts)
    u = lay.units
    dz = torch.empty(M, R, dtype=torch.float32, device=dev)
    dx = torch.empty(M, K, dtype=x.dtype if T == 1 else torch.float32, device=dev)
    _bottleneck_bwd_dx_kernel[(triton.cdiv(M, BM),)](
        gout, z, dz, dx, gout.stride(0), R, dx.stride(0),
        d, ut, u[1], u[2], u[4], lay.scale, lay.tiles,
        M, K, R, T, DOT_PREC=prec, BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=BR, BLOCK_N=BN, **flags,
    )  # fmt: skip
    if dd is not None:
        _bottleneck_wgrad_kernel[(T, triton.cdiv(K, BK))](
            dz, x, dd, R, x.stride(0), u[1], u[4], lay.scale, lay.tiles, M, K, T,
            FROM_Z=False, DOT_PREC=prec, BLOCK_M=BM, BLOCK_R=BR, BLOCK_C=BK, **flags,
        )  # fmt: skip
    if dut is not None:
        _bottleneck_wgrad_kernel[(T, triton.cdiv(lay.max_out, BN))](
            z, gout, dut, R, gout.stride(0), u[2], u[4], lay.scale, lay.tiles, M, lay.max_out, T,
            FROM_Z=True, DOT_PREC=prec, BLOCK_M=BM, BLOCK_R=BR, BLOCK_C=BN, **flags,
        )  # fmt: skip
    return (dx.to(x.dtype) if need_dx else None), dz
