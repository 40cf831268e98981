"""Pure-torch reference of the packed module bank ops (ARCHITECTURE.md §3).

This module is both the CPU fallback and the test oracle of the native core
(``prunepeft._C``, wrapped by :mod:`prunepeft.backends.native`): every function
here has the same name, signature, validation and semantics as its native
counterpart. Metadata ops (``plan``, ``compact``, ``select_prune``) are plain
Python loops; ``block_stats`` is vectorised with segment ids and ``index_add_``
and accumulates in float64.

Layout (see :func:`plan`): all parameters live in one flat float32 array.
Candidates sharing an input (same ``group``) are laid out together: first the
stacked ``D`` ([width, in_dim] each, so the group's D region is one
[sum of widths, in_dim] matrix), then each ``Ut`` ([width, out_dim]), then each
``bd`` ([width], if ``has_bias``), then each ``bu`` ([out_dim], if ``has_bias``
and width > 0). A candidate's width is cut into blocks of ``block_size`` units;
a block owns its D rows, Ut rows and bd entries (three segments).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..layout import STAT_COLUMNS, CandRow, Stat

__all__ = ["plan", "compact", "block_stats", "select_prune", "STAT_COLUMNS"]

ArrayLike = torch.Tensor | np.ndarray | Sequence[int] | Sequence[bool] | Sequence[float]


# --------------------------------------------------------------------------- helpers


def _as_tensor(x: Any, fn: str, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.ascontiguousarray(x))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{fn}: {name} must be array-like") from e


def _int_array(x: Any, fn: str, name: str, ndim: int = 1) -> torch.Tensor:
    """Any integer / bool array of rank ``ndim`` as a CPU int64 tensor."""
    t = _as_tensor(x, fn, name)
    if t.numel() == 0 and t.dim() == ndim:  # e.g. np.asarray([]) is float64
        return t.to(device="cpu", dtype=torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"{fn}: {name} must be an integer array, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.int64)


def _mask(x: Any, fn: str, name: str) -> torch.Tensor:
    return _int_array(x, fn, name) != 0


def _int_list(x: Any, fn: str, name: str) -> list[int]:
    return _int_array(x, fn, name).tolist()


def _float_data(x: Any, fn: str, name: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    """A float tensor used as is (exact dtype and rank; no silent cast)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor")
    if x.dtype != dtype:
        raise ValueError(f"{fn}: {name} must have dtype {dtype}, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def _validate_spec(fn: str, in_dim, out_dim, width, block_size, group, has_bias):
    ind = _int_list(in_dim, fn, "in_dim")
    outd = _int_list(out_dim, fn, "out_dim")
    wid = _int_list(width, fn, "width")
    bsz = _int_list(block_size, fn, "block_size")
    grp = _int_list(group, fn, "group")
    bias = _mask(has_bias, fn, "has_bias").tolist()
    n = len(ind)
    if n < 1:
        raise ValueError(f"{fn}: need at least one candidate (in_dim is empty)")
    for name, v in (
        ("out_dim", outd),
        ("width", wid),
        ("block_size", bsz),
        ("group", grp),
        ("has_bias", bias),
    ):
        if len(v) != n:
            raise ValueError(f"{fn}: {name} has {len(v)} entries, expected {n} (len(in_dim))")
    for i in range(n):
        if ind[i] < 1:
            raise ValueError(f"{fn}: in_dim[{i}] = {ind[i]} must be >= 1")
        if outd[i] < 1:
            raise ValueError(f"{fn}: out_dim[{i}] = {outd[i]} must be >= 1")
        if wid[i] < 0:
            raise ValueError(f"{fn}: width[{i}] = {wid[i]} must be >= 0")
        if bsz[i] < 1:
            raise ValueError(f"{fn}: block_size[{i}] = {bsz[i]} must be >= 1")
        if wid[i] % bsz[i] != 0:
            raise ValueError(f"{fn}: width[{i}] = {wid[i]} is not a multiple of block_size[{i}] = {bsz[i]}")
        if grp[i] < 0:
            raise ValueError(f"{fn}: group[{i}] = {grp[i]} must be >= 0")
    return ind, outd, wid, bsz, grp, bias


def _plan_lists(fn: str, ind, outd, wid, bsz, grp, bias) -> dict[str, Any]:
    n = len(ind)
    members: dict[int, list[int]] = {}
    for i in range(n):
        mem = members.setdefault(grp[i], [])
        if mem and ind[i] != ind[mem[0]]:
            j = mem[0]
            raise ValueError(
                f"{fn}: in_dim[{i}] = {ind[i]} differs from in_dim[{j}] = {ind[j]} "
                f"of candidate {j} in the same group {grp[i]}"
            )
        mem.append(i)

    cand = [dict.fromkeys(CandRow._fields, -1) for _ in range(n)]
    cursor = 0
    next_block = 0
    for g, mem in members.items():
        for i in mem:
            c = cand[i]
            c.update(d_off=cursor, width=wid[i], n_blocks=wid[i] // bsz[i], first_block=next_block, group=g)
            cursor += wid[i] * ind[i]
            next_block += c["n_blocks"]
        for i in mem:
            cand[i]["u_off"] = cursor
            cursor += wid[i] * outd[i]
        for i in mem:
            if bias[i]:
                cand[i]["bd_off"] = cursor
                cursor += wid[i]
        for i in mem:
            if bias[i] and wid[i]:
                cand[i]["bu_off"] = cursor
                cursor += outd[i]
    if cursor >= 2**63:
        raise ValueError(f"{fn}: bank size overflows int64")
    nb = next_block

    blocks = []
    segs = []
    for mem in members.values():
        for i in mem:
            blocks.extend([i, j * bsz[i], bsz[i]] for j in range(cand[i]["n_blocks"]))
        for i in mem:
            c, ln = cand[i], bsz[i] * ind[i]
            segs.extend([c["d_off"] + j * ln, ln, c["first_block"] + j] for j in range(c["n_blocks"]))
        for i in mem:
            c, ln = cand[i], bsz[i] * outd[i]
            segs.extend([c["u_off"] + j * ln, ln, c["first_block"] + j] for j in range(c["n_blocks"]))
        for i in mem:
            c = cand[i]
            if bias[i]:
                segs.extend(
                    [c["bd_off"] + j * bsz[i], bsz[i], c["first_block"] + j] for j in range(c["n_blocks"])
                )
        for i in mem:
            if cand[i]["bu_off"] >= 0:
                segs.append([cand[i]["bu_off"], outd[i], nb + i])

    def table(rows: list[list[int]], cols: int) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), cols)

    return {
        "cand": table([list(c.values()) for c in cand], len(CandRow._fields)),
        "block": table(blocks, 3),
        "seg": table(segs, 3),
        "total": cursor,
    }


# --------------------------------------------------------------------------- ops


def plan(
    in_dim: ArrayLike,
    out_dim: ArrayLike,
    width: ArrayLike,
    block_size: ArrayLike,
    group: ArrayLike,
    has_bias: ArrayLike,
) -> dict[str, Any]:
    """Lay out a bank of bottleneck candidates in one flat array.

    Args:
        in_dim, out_dim, width, block_size, group: integer arrays [n], one entry
            per candidate. ``width`` must be a multiple of ``block_size`` (0 =
            pruned away, no parameters); candidates of one ``group`` share
            ``in_dim``.
        has_bias: bool array [n]; a biased candidate has ``bd`` [width] and
            ``bu`` [out_dim].

    Returns:
        ``{"cand": [n, 8], "block": [nb, 3], "seg": [ns, 3], "total": int}``
        (int64 tensors; the columns are named in :mod:`prunepeft.layout`):

        * cand: d_off, u_off, bd_off (-1 without bias), bu_off (-1 without bias
          or with width 0), width, n_blocks, first_block, group.
        * block: cand, unit_start (within the candidate), block_size.
        * seg: offset, length, owner (block id for D / Ut / bd rows of a block,
          ``nb + cand`` for a candidate's bu), in layout order, tiling
          ``[0, total)``.

    Raises:
        ValueError: naming the bad field and candidate index.
    """
    spec = _validate_spec("plan", in_dim, out_dim, width, block_size, group, has_bias)
    return _plan_lists("plan", *spec)


def compact(
    in_dim: ArrayLike,
    out_dim: ArrayLike,
    width: ArrayLike,
    block_size: ArrayLike,
    group: ArrayLike,
    has_bias: ArrayLike,
    keep: ArrayLike,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Drop blocks from a bank.

    Args:
        in_dim, out_dim, width, block_size, group, has_bias: the current bank
            (as for :func:`plan`).
        keep: bool [nb] over the current plan's blocks.

    Returns:
        ``(new_plan, gather, block_gather)``: ``new_plan`` is :func:`plan` with
        the new widths (kept blocks x block_size; a candidate without kept
        blocks gets width 0 and loses its bu), ``gather`` int64 [new_total]
        with ``new_flat = old_flat[gather]`` (parameters, gradients, optimizer
        moments, any per-element state), ``block_gather`` int64 [new_nb] the
        old block id of each new block. Kept blocks keep their order.
    """
    fn = "compact"
    ind, outd, wid, bsz, grp, bias = _validate_spec(fn, in_dim, out_dim, width, block_size, group, has_bias)
    old = _plan_lists(fn, ind, outd, wid, bsz, grp, bias)
    nb = old["block"].shape[0]
    kp = _mask(keep, fn, "keep").tolist()
    if len(kp) != nb:
        raise ValueError(f"{fn}: keep has {len(kp)} entries, expected {nb} (n_blocks of the current plan)")
    oc = [CandRow(*r) for r in old["cand"].tolist()]
    n = len(ind)
    kept_blocks = [[j for j in range(oc[i].n_blocks) if kp[oc[i].first_block + j]] for i in range(n)]
    new_wid = [len(kept_blocks[i]) * bsz[i] for i in range(n)]
    new = _plan_lists(fn, ind, outd, new_wid, bsz, grp, bias)
    nc = [CandRow(*r) for r in new["cand"].tolist()]

    gather = torch.empty(new["total"], dtype=torch.int64)
    block_gather = torch.empty(new["block"].shape[0], dtype=torch.int64)

    def copy_range(dst: int, src: int, length: int) -> None:
        gather[dst : dst + length] = torch.arange(src, src + length, dtype=torch.int64)

    for i in range(n):
        bs, di, do = bsz[i], ind[i], outd[i]
        new_c, old_c = nc[i], oc[i]
        for k, j in enumerate(kept_blocks[i]):
            block_gather[new_c.first_block + k] = old_c.first_block + j
            copy_range(new_c.d_off + k * bs * di, old_c.d_off + j * bs * di, bs * di)
            copy_range(new_c.u_off + k * bs * do, old_c.u_off + j * bs * do, bs * do)
            if bias[i]:
                copy_range(new_c.bd_off + k * bs, old_c.bd_off + j * bs, bs)
        if new_c.bu_off >= 0:
            copy_range(new_c.bu_off, old_c.bu_off, do)
    return new, gather, block_gather


def check_segments(
    seg_t: torch.Tensor, total: int, n_owners: int, disjoint: bool, fn: str = "block_stats"
) -> None:
    """Validate a segment table against a flat array of ``total`` elements and ``n_owners`` owners.

    ``disjoint``: also require non-overlapping segments (in-place per-element updates need it).
    Raises ``ValueError`` naming the first bad row.
    """
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
    if disjoint:
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
    seg: ArrayLike,
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
    """Per-owner statistics of a bank in one pass over parameters and gradients.

    Args:
        param: float32 [total], the flat bank.
        grad: float32 [total], or None (= zeros).
        seg: int64 [ns, 3] (offset, length, owner), e.g. ``plan(...)["seg"]``.
        n_owners: number of owners (rows of the result), e.g. nb + n.
        threshold: column 5 counts ``|w| < threshold``.
        sens, unc: float32 [total] AdaLoRA state, given together, updated in
            place on the segments' elements (segments must then be disjoint):
            ``I = |w g|``, ``sens = beta1 sens + (1 - beta1) I``,
            ``unc = beta2 unc + (1 - beta2) |I - sens_new|`` (evaluated in
            float64, stored as float32).
        beta1, beta2: EMA factors in [0, 1].
        accum: float64 [n_owners, 8], updated in place when given:
            ``accum += stats`` if ``accum_beta < 0``, else
            ``accum = accum_beta accum + (1 - accum_beta) stats``.
        accum_beta: see ``accum``; must be < 0 or in [0, 1].
        n_threads: threads of the native backend (0 = all); ignored here
            (validated only).

    Returns:
        float64 [n_owners, 8]: per owner, over its segments' elements,
        0 sum w^2, 1 sum |g|, 2 sum |w g|, 3 sum (w g)^2, 4 count(w == 0),
        5 count(|w| < threshold), 6 sum sens_new * unc_new (0 without sens),
        7 element count (see :data:`STAT_COLUMNS`).
    """
    fn = "block_stats"
    param = _float_data(param, fn, "param", torch.float32, 1)
    total = param.shape[0]
    device = param.device
    if grad is not None:
        grad = _float_data(grad, fn, "grad", torch.float32, 1)
        if grad.shape[0] != total:
            raise ValueError(f"{fn}: grad has {grad.shape[0]} elements, expected {total} (len(param))")
    n_owners = int(n_owners)
    if n_owners < 0:
        raise ValueError(f"{fn}: n_owners = {n_owners} must be >= 0")
    seg_t = _int_array(seg, fn, "seg", ndim=2)
    if seg_t.shape[1] != 3:
        raise ValueError(f"{fn}: seg must have shape (n_segs, 3), got {tuple(seg_t.shape)}")
    if (sens is None) != (unc is None):
        raise ValueError(f"{fn}: sens and unc must be given together")
    for name, st in (("sens", sens), ("unc", unc)):
        if st is not None:
            _float_data(st, fn, name, torch.float32, 1)
            if st.shape[0] != total:
                raise ValueError(f"{fn}: {name} has {st.shape[0]} elements, expected {total} (len(param))")
    if accum is not None:
        _float_data(accum, fn, "accum", torch.float64, 2)
        if tuple(accum.shape) != (n_owners, 8):
            raise ValueError(
                f"{fn}: accum must have shape (n_owners, 8) = ({n_owners}, 8), got {tuple(accum.shape)}"
            )
    threshold, beta1, beta2, accum_beta = float(threshold), float(beta1), float(beta2), float(accum_beta)
    if math.isnan(threshold):
        raise ValueError(f"{fn}: threshold must not be NaN")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"{fn}: {name} = {b} must be in [0, 1]")
    if math.isnan(accum_beta) or accum_beta > 1.0:
        raise ValueError(f"{fn}: accum_beta = {accum_beta} must be < 0 (running sum) or in [0, 1] (EMA)")
    if int(n_threads) < 0:
        raise ValueError(f"{fn}: n_threads = {int(n_threads)} must be >= 0 (0 = all hardware threads)")

    check_segments(seg_t, total, n_owners, disjoint=sens is not None, fn=fn)
    offs, lens, owners = seg_t.unbind(1)

    # Element index and owner of every covered element.
    n_elem = int(lens.sum())
    seg_id = torch.repeat_interleave(torch.arange(seg_t.shape[0]), lens)
    start_in_cat = torch.cumsum(lens, 0) - lens
    idx = (torch.arange(n_elem, dtype=torch.int64) + (offs - start_in_cat)[seg_id]).to(device)
    own = owners[seg_id].to(device)

    w = param.detach()[idx].double()
    g = grad.detach()[idx].double() if grad is not None else torch.zeros_like(w)
    wg = w * g
    if sens is not None:
        imp = wg.abs()
        s_new = (beta1 * sens.detach()[idx].double() + (1 - beta1) * imp).float()
        u_new = (beta2 * unc.detach()[idx].double() + (1 - beta2) * (imp - s_new.double()).abs()).float()
        with torch.no_grad():
            sens.index_copy_(0, idx, s_new)
            unc.index_copy_(0, idx, u_new)
        su = s_new.double() * u_new.double()
    else:
        su = None

    out = torch.zeros(len(Stat), n_owners, dtype=torch.float64, device=device)
    cols = {Stat.SUM_W2: w * w, Stat.SUM_ABS_G: g.abs(), Stat.SUM_ABS_WG: wg.abs(), Stat.SUM_WG2: wg * wg,
            Stat.N_ZERO: (w == 0).double(), Stat.N_BELOW: (w.abs() < threshold).double(), Stat.SUM_SENS_UNC: su}  # fmt: skip
    for k, col in cols.items():
        if col is not None:
            out[k].index_add_(0, own, col)
    out[Stat.COUNT].index_add_(0, owners.to(device), lens.to(device=device, dtype=torch.float64))
    stats = out.t().contiguous()

    if accum is not None:
        with torch.no_grad():
            if accum_beta < 0:
                accum.add_(stats.to(accum.device))
            else:
                accum.copy_(accum_beta * accum + (1 - accum_beta) * stats.to(accum.device))
    return stats


def select_prune(
    scores: ArrayLike,
    costs: ArrayLike,
    group: ArrayLike,
    group_extra: ArrayLike,
    eligible: ArrayLike,
    current: int,
    target: int,
) -> torch.Tensor:
    """Greedy budget-constrained selection of what to prune.

    Visits the eligible items by (score, index) ascending and prunes each:
    ``current -= costs[i]``, and ``current -= group_extra[g]`` once every
    member of item i's group g (eligible or not) has been pruned. Stops as soon
    as ``current <= target``; if everything eligible is pruned and current is
    still above target, all of it is returned (the caller decides).

    Args:
        scores: float [m], low = prune first; must be finite where eligible.
        costs: int [m] >= 0.
        group: int [m] in ``[0, len(group_extra))``.
        group_extra: int [G] >= 0, freed when the whole group is pruned (e.g. a
            candidate's bu when all its blocks go).
        eligible: bool [m].
        current, target: the budget now and the budget to reach.

    Returns:
        int64 tensor of the pruned indices in prune order (empty if
        ``current <= target`` already).
    """
    fn = "select_prune"
    sc_t = _as_tensor(scores, fn, "scores")
    if sc_t.dtype.is_complex or sc_t.dtype == torch.bool:
        raise ValueError(f"{fn}: scores must be a real array, got dtype {sc_t.dtype}")
    if sc_t.dim() != 1:
        raise ValueError(f"{fn}: scores must be 1-D, got shape {tuple(sc_t.shape)}")
    sc = sc_t.to(device="cpu", dtype=torch.float64).tolist()
    co = _int_list(costs, fn, "costs")
    gr = _int_list(group, fn, "group")
    ex = _int_list(group_extra, fn, "group_extra")
    el = _mask(eligible, fn, "eligible").tolist()
    m, n_groups = len(sc), len(ex)
    for name, v in (("costs", co), ("group", gr), ("eligible", el)):
        if len(v) != m:
            raise ValueError(f"{fn}: {name} has {len(v)} entries, expected {m} (len(scores))")
    for i in range(m):
        if co[i] < 0:
            raise ValueError(f"{fn}: costs[{i}] = {co[i]} must be >= 0")
        if not 0 <= gr[i] < n_groups:
            raise ValueError(f"{fn}: group[{i}] = {gr[i]} is outside [0, len(group_extra) = {n_groups})")
        if el[i] and not math.isfinite(sc[i]):
            raise ValueError(f"{fn}: scores[{i}] = {sc[i]} is not finite (the item is eligible)")
    for g in range(n_groups):
        if ex[g] < 0:
            raise ValueError(f"{fn}: group_extra[{g}] = {ex[g]} must be >= 0")

    current, target = int(current), int(target)
    picked: list[int] = []
    if current <= target:
        return torch.tensor(picked, dtype=torch.int64)
    remaining = [0] * n_groups
    for g in gr:
        remaining[g] += 1

    def subtract(amount: int) -> int:
        if current - amount < -(2**63):
            raise ValueError(f"{fn}: current minus the pruned costs overflows int64")
        return current - amount

    for i in sorted((i for i in range(m) if el[i]), key=lambda i: (sc[i], i)):
        picked.append(i)
        current = subtract(co[i])
        remaining[gr[i]] -= 1
        if remaining[gr[i]] == 0:
            current = subtract(ex[gr[i]])
        if current <= target:
            break
    return torch.tensor(picked, dtype=torch.int64)
