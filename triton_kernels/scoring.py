"""One-pass block scoring over the bank's segment table (Triton).

Design trade-off
----------------
One program per *owner* (a width-block, or a candidate's ``bu``), looping over that owner's
segments (the CSR ``owner -> segments`` order is built once on the host from ``plan["seg"]``,
stable, so a block's D, Ut, bd rows are visited in layout order) and over ``BLOCK`` elements at a
time. Every owner's sums are therefore computed by one program in a fixed order: the result is
deterministic and independent of the launch grid, with no atomics and no second reduction pass.
The price is load imbalance between owners (a block owns ``bs * (in + out + 1)`` elements, a
``bu`` owns ``out``), which is small next to the thousands of owners of a real bank (Llama-7B,
32 layers x q,k,v,o + MLP: ~10^4 owners, so the grid fills any GPU many times over).
Rejected: one program per fixed-size chunk with atomics into the owner rows (nondeterministic
float order, so a pruning decision could change between runs) and chunk partials + a second
segmented reduction (one more launch and a partial buffer, for no gain at this owner count).

Columns 0-3 use float32 products summed per tile in float32 (a ``BLOCK``-wide tree) and the tile
sums are added in float64, like the C++ kernel's float32 lanes flushed to double (relative error
~1e-7 here; the tests allow 1e-5). Counts are exact. The AdaLoRA update runs in float64 with FP
fusion disabled, so ``sens``/``unc`` match the reference bit for bit (the reference rounds the
float64 result to float32 exactly like this). Reads 8 B/element (+16 B read and 8 B written with
AdaLoRA); the GPU number against the device's copy bandwidth comes from ``bench/bench_gpu.py``
(not yet measured: no GPU was available when this was written).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised only without triton
    raise ImportError("prunepeft_triton.scoring needs Triton (`pip install triton`)") from e

from ._util import interpreting

__all__ = ["owner_csr", "block_stats"]


@triton.jit
def _block_stats_kernel(
    # bank (flat, one element per parameter)
    w_ptr,
    g_ptr,
    sens_ptr,
    unc_ptr,
    # owner -> segments, CSR: segments seg_ptr[o] .. seg_ptr[o+1] of (seg_off, seg_len)
    seg_ptr_ptr,
    seg_off_ptr,
    seg_len_ptr,
    # float64 scalars: threshold, beta1, beta2, accum_beta
    scal_ptr,
    # outputs: stats [n_owners, 8] float64 (written), accum [n_owners, 8] float64 (updated)
    stats_ptr,
    accum_ptr,
    HAS_GRAD: tl.constexpr,
    HAS_ADALORA: tl.constexpr,
    HAS_ACCUM: tl.constexpr,
    ACCUM_EMA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64)
    s_lo = tl.load(seg_ptr_ptr + o)
    s_hi = tl.load(seg_ptr_ptr + o + 1)
    thr = tl.load(scal_ptr)
    beta1 = tl.load(scal_ptr + 1)
    beta2 = tl.load(scal_ptr + 2)

    zero = tl.sum(tl.zeros([BLOCK], dtype=tl.float64), axis=0)
    a0 = zero
    a1 = zero
    a2 = zero
    a3 = zero
    a4 = zero
    a5 = zero
    a6 = zero
    a7 = zero
    lane = tl.arange(0, BLOCK)
    for s in range(s_lo, s_hi):
        off = tl.load(seg_off_ptr + s)
        ln = tl.load(seg_len_ptr + s)
        a7 += ln.to(tl.float64)
        for t in range(0, ln, BLOCK):
            idx = t + lane
            m = idx < ln
            ptr_off = off + idx
            w = tl.load(w_ptr + ptr_off, mask=m, other=0.0)
            if HAS_GRAD:
                g = tl.load(g_ptr + ptr_off, mask=m, other=0.0)
            else:
                g = tl.zeros([BLOCK], dtype=tl.float32)
            wg = w * g
            a0 += tl.sum(w * w, axis=0).to(tl.float64)
            a1 += tl.sum(tl.abs(g), axis=0).to(tl.float64)
            a2 += tl.sum(tl.abs(wg), axis=0).to(tl.float64)
            a3 += tl.sum(wg * wg, axis=0).to(tl.float64)
            a4 += tl.sum(((w == 0.0) & m).to(tl.float32), axis=0).to(tl.float64)
            w64 = w.to(tl.float64)
            a5 += tl.sum(((tl.abs(w64) < thr) & m).to(tl.float32), axis=0).to(tl.float64)
            if HAS_ADALORA:
                imp = tl.abs(w64 * g.to(tl.float64))
                s_old = tl.load(sens_ptr + ptr_off, mask=m, other=0.0).to(tl.float64)
                u_old = tl.load(unc_ptr + ptr_off, mask=m, other=0.0).to(tl.float64)
                s_new = (beta1 * s_old + (1.0 - beta1) * imp).to(tl.float32)
                s_new64 = s_new.to(tl.float64)
                u_new = (beta2 * u_old + (1.0 - beta2) * tl.abs(imp - s_new64)).to(tl.float32)
                tl.store(sens_ptr + ptr_off, s_new, mask=m)
                tl.store(unc_ptr + ptr_off, u_new, mask=m)
                a6 += tl.sum(tl.where(m, s_new64 * u_new.to(tl.float64), 0.0), axis=0)

    col = tl.arange(0, 8)
    row = tl.where(col == 0, a0, tl.where(col == 1, a1, tl.where(col == 2, a2, tl.where(col == 3, a3, zero))))
    row = tl.where(col == 4, a4, tl.where(col == 5, a5, tl.where(col == 6, a6, tl.where(col == 7, a7, row))))
    tl.store(stats_ptr + o * 8 + col, row)
    if HAS_ACCUM:
        acc = tl.load(accum_ptr + o * 8 + col)
        if ACCUM_EMA:
            ab = tl.load(scal_ptr + 3)
            acc = ab * acc + (1.0 - ab) * row
        else:
            acc = acc + row
        tl.store(accum_ptr + o * 8 + col, acc)


def owner_csr(seg: torch.Tensor, n_owners: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(seg_ptr [n_owners+1], seg_off [ns], seg_len [ns])`` int64 on ``device``: the segment table
    regrouped by owner (stable, so each owner's segments stay in layout order)."""
    seg = seg.to(device="cpu", dtype=torch.int64)
    owners = seg[:, 2]
    order = torch.argsort(owners, stable=True)
    counts = torch.bincount(owners, minlength=n_owners)
    ptr = torch.zeros(n_owners + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=ptr[1:])
    return (
        ptr.to(device),
        seg[order, 0].contiguous().to(device),
        seg[order, 1].contiguous().to(device),
    )


def block_stats(
    param: torch.Tensor,
    grad: torch.Tensor | None,
    csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    n_owners: int,
    threshold: float,
    sens: torch.Tensor | None,
    unc: torch.Tensor | None,
    beta1: float,
    beta2: float,
    accum: torch.Tensor | None,
    accum_beta: float,
    block: int | None = None,
) -> torch.Tensor:
    """Launch the scoring kernel (arguments validated by the caller, all on ``param.device``).

    Returns float64 ``[n_owners, 8]``; updates ``sens``/``unc``/``accum`` in place.
    """
    dev = param.device
    stats = torch.empty(n_owners, 8, dtype=torch.float64, device=dev)
    if n_owners == 0:
        return stats
    scal = torch.tensor([threshold, beta1, beta2, accum_beta], dtype=torch.float64, device=dev)
    seg_ptr, seg_off, seg_len = csr
    if block is None:
        block = 4096 if interpreting() else 1024
    g = grad if grad is not None else param
    s = sens if sens is not None else param
    u = unc if unc is not None else param
    a = accum if accum is not None else stats
    _block_stats_kernel[(n_owners,)](
        param, g, s, u, seg_ptr, seg_off, seg_len, scal, stats, a,
        HAS_GRAD=grad is not None, HAS_ADALORA=sens is not None, HAS_ACCUM=accum is not None,
        ACCUM_EMA=accum_beta >= 0, BLOCK=block, num_warps=4,
        **({} if interpreting() else {"enable_fp_fusion": False}),
    )  # fmt: skip
    return stats
