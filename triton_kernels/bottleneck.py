"""Batched, block-sparse bottleneck forward and backward (Triton).

Computes, for all candidates of one slab (they share the input ``x``)::

    z = x @ D[active].T + bd[active]      h = act(z)      out = (h * scale[active]) @ Ut[active] + bu

Design trade-off
----------------
*Sparsity by unit table, not by mask.* The host builds, once per mask (cached), a table of the
*active* units: for unit ``j``, the element offsets of its D row and Ut row from the base pointers,
its bias index, activation code and scale. The kernels iterate over that table in ``BLOCK_R``-unit
tiles and gather rows through it, so a pruned block costs no loads and no FLOPs, whatever its size
(block sizes of 4 work as well as 64), and candidates of different kinds, activations, widths and
biases share one tile (the activation is chosen per unit with ``tl.where``; only the activations
present are compiled in). Offsets, not pointers, index the rows (the interpreter cannot follow
pointer tables), so the same kernels serve any set of rows of one base tensor: today one
(site, tap) slab, later a whole layout group whose D rows are one stacked region of the bank.
Cost: gathered rows instead of one strided 2-D block (rows are contiguous along ``K``/``N``, so
loads stay coalesced) and one host sync per new mask to build the table.

*Forward in one launch.* A program owns ``BLOCK_M`` tokens: it computes its ``[BLOCK_M, BLOCK_R]``
tile of ``z`` (loop over ``K``), applies bias, activation, the ``|h|`` partial sum and the scale as
an epilogue, then multiplies by the ``Ut`` rows and writes the output tiles (loop over ``N``). ``h``
never goes to memory; ``z`` (pre-activation, float32, ``R`` values per token, tiny next to ``x``) is
stored for the backward when gradients are needed. With more active units than ``BLOCK_R`` the
output is read-modified-written in float32 per unit tile. ``N_SPLIT > 1`` adds programs along
``N`` (each recomputing its ``z`` tile) when there are too few token tiles to fill the GPU; the
trade (down-projection FLOPs x N_SPLIT vs. occupancy) is for the GPU benchmark to settle
(no GPU was available when this was written: the launch parameters are untuned).

*Backward in three launches.* (1) per token tile: ``dz = (dout @ Ut[active].T) * scale * act'(z)``
(stored, float32) and ``dx = dz @ D[active]``; (2) ``dD[active] = dz.T @ x`` and (3)
``dUt[active] = (act(z) * scale).T @ dout``, each a grid over (unit tiles, column tiles) looping
over tokens, written through the same row-offset table, so the rows of pruned units are never
touched and stay exactly 0. ``dbd`` and ``dbu`` are column sums done by torch.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised only without triton
    raise ImportError("prunepeft_triton.bottleneck needs Triton (`pip install triton`)") from e

from ._util import clamp_block, interpreting

__all__ = ["ACT_CODES", "bottleneck_fwd", "bottleneck_bwd"]

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
def _bottleneck_fwd_kernel(
    # activations: x [M, K], out [M, N], z [M, R] (float32), |h| partials [n_m_tiles, R] (float32)
    x_ptr,
    out_ptr,
    z_ptr,
    habs_ptr,
    stride_xm,
    stride_om,
    stride_zm,
    # parameters: base pointers, and per active unit j < R: element offset of its D row and Ut row,
    # its bias index (into bd), activation code and scale
    d_ptr,
    ut_ptr,
    bd_ptr,
    bu_ptr,
    row_ptr,
    doff_ptr,
    uoff_ptr,
    act_ptr,
    scale_ptr,
    # sizes
    M,
    K,
    N,
    R,
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
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        d_off = tl.load(doff_ptr + rr, mask=r_ok, other=0)
        u_off = tl.load(uoff_ptr + rr, mask=r_ok, other=0)
        # down-projection over the active units of this tile
        z = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            xt = tl.load(
                x_ptr + rm64[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
            )
            dt = tl.load(d_ptr + d_off[None, :] + kk[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
            z = tl.dot(xt, dt, acc=z, input_precision=DOT_PREC)
        # epilogue: bias, activation, |h| statistics, scale
        if HAS_BD:
            row = tl.load(row_ptr + rr, mask=r_ok, other=0)
            z += tl.load(bd_ptr + row, mask=r_ok, other=0.0).to(tl.float32)[None, :]
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
        # up-projection into the output tiles
        for n0 in range(pid_n * BLOCK_N, N, N_SPLIT * BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            n_ok = nn < N
            o_ptrs = out_ptr + rm64[:, None] * stride_om + nn[None, :]
            o_mask = m_ok[:, None] & n_ok[None, :]
            if r0 == 0:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                if HAS_BU:
                    acc += tl.load(bu_ptr + nn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            else:
                acc = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
            ut = tl.load(ut_ptr + u_off[:, None] + nn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(hs, ut, acc=acc, input_precision=DOT_PREC)
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _bottleneck_bwd_dx_kernel(
    # activations: dout [M, N], z [M, R] (float32), dz [M, R] (float32, written), dx [M, K] (written)
    g_ptr,
    z_ptr,
    dz_ptr,
    dx_ptr,
    stride_gm,
    stride_zm,
    stride_dxm,
    # parameters and the active-unit table (see the forward kernel)
    d_ptr,
    ut_ptr,
    doff_ptr,
    uoff_ptr,
    act_ptr,
    scale_ptr,
    M,
    K,
    N,
    R,
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
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        d_off = tl.load(doff_ptr + rr, mask=r_ok, other=0)
        u_off = tl.load(uoff_ptr + rr, mask=r_ok, other=0)
        dh = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            n_ok = nn < N
            g = tl.load(
                g_ptr + rm64[:, None] * stride_gm + nn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0
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
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            x_ptrs = dx_ptr + rm64[:, None] * stride_dxm + kk[None, :]
            x_mask = m_ok[:, None] & k_ok[None, :]
            if r0 == 0:
                acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            else:
                acc = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)
            dt = tl.load(d_ptr + d_off[:, None] + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(dzc, dt, acc=acc, input_precision=DOT_PREC)
            tl.store(x_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=x_mask)


@triton.jit
def _bottleneck_wgrad_kernel(
    # a [M, R] float32 (dz, or z when FROM_Z), b [M, C] (x or dout); out rows at out_ptr + off[j]
    a_ptr,
    b_ptr,
    out_ptr,
    stride_am,
    stride_bm,
    off_ptr,
    act_ptr,
    scale_ptr,
    M,
    C,
    R,
    FROM_Z: tl.constexpr,
    HAS_RELU: tl.constexpr,
    HAS_GELU: tl.constexpr,
    HAS_SILU: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C
    if FROM_Z:
        a_code = tl.load(act_ptr + rr, mask=r_ok, other=0)[:, None]
        sc = tl.load(scale_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        mm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = mm < M
        at = tl.load(
            a_ptr + mm[None, :] * stride_am + rr[:, None], mask=r_ok[:, None] & m_ok[None, :], other=0.0
        )
        if FROM_Z:  # h * scale; act(0) = 0 for every activation, so masked entries stay 0
            at = _act(at, a_code, HAS_RELU, HAS_GELU, HAS_SILU) * sc
        bt = tl.load(
            b_ptr + mm[:, None] * stride_bm + cc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0
        )
        acc = tl.dot(at.to(b_ptr.dtype.element_ty), bt, acc=acc, input_precision=DOT_PREC)
    off = tl.load(off_ptr + rr, mask=r_ok, other=0)
    tl.store(
        out_ptr + off[:, None] + cc[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=r_ok[:, None] & c_ok[None, :],
    )


# ----------------------------------------------------------------------------- launchers


def _dot_prec(dtype: torch.dtype) -> str:
    # float32 banks must match torch's float32 matmul (no TF32 by default); 16-bit inputs ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(M: int, K: int, N: int, R: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_N). The interpreter pays per program and per loop step,
    not per element, so it gets the largest blocks; GPU values are untuned first guesses."""
    if interpreting():
        return (
            clamp_block(M, 16, 64),
            clamp_block(K, 16, 128),
            clamp_block(R, 16, 64),
            clamp_block(N, 16, 128),
        )
    return clamp_block(M, 16, 64), 64, clamp_block(R, 16, 64), 64


def _flags(acts: tuple[bool, bool, bool]) -> dict[str, bool]:
    return {"HAS_RELU": acts[0], "HAS_GELU": acts[1], "HAS_SILU": acts[2]}


def bottleneck_fwd(
    x: torch.Tensor,
    d: torch.Tensor,
    ut: torch.Tensor,
    bd: torch.Tensor | None,
    bu: torch.Tensor | None,
    units: torch.Tensor,
    scale: torch.Tensor,
    acts: tuple[bool, bool, bool],
    store_z: bool,
    want_habs: bool,
    n_split: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Forward for ``x [M, K]`` (contiguous rows) over the active units in ``units``.

    ``units``: int64 ``[4, R]`` (row in the slab, D row offset, Ut row offset, activation code),
    ``scale``: ``[R]``; ``acts``: whether relu / gelu / silu occur. ``R`` must be >= 1.
    Returns ``(out [M, N] in x's dtype, z [M, R] float32 or None, |h| partials [tiles, R] or None)``.
    """
    M, K = x.shape
    N = ut.shape[1]
    R = units.shape[1]
    BM, BK, BR, BN = _blocks(M, K, N, R)
    n_m = triton.cdiv(M, BM)
    dev = x.device
    out = torch.empty(M, N, dtype=x.dtype if R <= BR else torch.float32, device=dev)
    z = torch.empty(M, R, dtype=torch.float32, device=dev) if store_z else None
    habs = torch.empty(n_m, R, dtype=torch.float32, device=dev) if want_habs else None
    n_split = max(1, min(n_split, triton.cdiv(N, BN)))
    _bottleneck_fwd_kernel[(n_m, n_split)](
        x, out, z if z is not None else out, habs if habs is not None else out,
        x.stride(0), out.stride(0), R,
        d, ut, bd if bd is not None else d, bu if bu is not None else d,
        units[0], units[1], units[2], units[3], scale,
        M, K, N, R,
        HAS_BD=bd is not None, HAS_BU=bu is not None, STORE_Z=store_z, HAS_HABS=want_habs,
        N_SPLIT=n_split, DOT_PREC=_dot_prec(x.dtype),
        BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=BR, BLOCK_N=BN, **_flags(acts),
    )  # fmt: skip
    return out.to(x.dtype), z, habs


def bottleneck_bwd(
    gout: torch.Tensor,
    x: torch.Tensor,
    d: torch.Tensor,
    ut: torch.Tensor,
    units: torch.Tensor,
    scale: torch.Tensor,
    z: torch.Tensor,
    acts: tuple[bool, bool, bool],
    need_dx: bool = True,
    need_dd: bool = True,
    need_dut: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Backward of :func:`bottleneck_fwd`: ``(dx, dD, dUt, dz)``; rows of inactive units of dD/dUt
    are 0 (never written); ``dz`` ``[M, R]`` float32 is returned for the bias gradient."""
    M, K = x.shape
    N = ut.shape[1]
    R = units.shape[1]
    BM, BK, BR, BN = _blocks(M, K, N, R)
    dev = x.device
    prec = _dot_prec(x.dtype)
    flags = _flags(acts)
    dz = torch.empty(M, R, dtype=torch.float32, device=dev)
    dx = torch.empty(M, K, dtype=x.dtype if R <= BR else torch.float32, device=dev)
    _bottleneck_bwd_dx_kernel[(triton.cdiv(M, BM),)](
        gout, z, dz, dx, gout.stride(0), R, dx.stride(0),
        d, ut, units[1], units[2], units[3], scale,
        M, K, N, R, DOT_PREC=prec, BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=BR, BLOCK_N=BN, **flags,
    )  # fmt: skip
    dd = dut = None
    if need_dd:
        dd = torch.zeros_like(d)
        _bottleneck_wgrad_kernel[(triton.cdiv(R, BR), triton.cdiv(K, BK))](
            dz, x, dd, R, x.stride(0), units[1], units[3], scale, M, K, R,
            FROM_Z=False, DOT_PREC=prec, BLOCK_M=BM, BLOCK_R=BR, BLOCK_C=BK, **flags,
        )  # fmt: skip
    if need_dut:
        dut = torch.zeros_like(ut)
        _bottleneck_wgrad_kernel[(triton.cdiv(R, BR), triton.cdiv(N, BN))](
            z, gout, dut, R, gout.stride(0), units[2], units[3], scale, M, N, R,
            FROM_Z=True, DOT_PREC=prec, BLOCK_M=BM, BLOCK_R=BR, BLOCK_C=BN, **flags,
        )  # fmt: skip
    return (dx.to(x.dtype) if need_dx else None), dd, dut, dz
