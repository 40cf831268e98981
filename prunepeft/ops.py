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
one launch with one output per site; its reference computes the down-projections of all the
group's units with one GEMM (the ``D`` rows of a group are stacked) and each site's up-projection
on its slice.

:class:`FlatGrad` is the autograd side of the bank (ARCHITECTURE.md §3): the sites read their
slabs as views of the flat parameter, made by :meth:`FlatGrad.views`, whose gradients are written into
one zero-initialised full-size buffer per backward pass and handed to autograd once, as the flat
parameter's gradient (instead of one full-size zero tensor per ``narrow`` view, summed).

:func:`linear_tap` / :func:`bottleneck_tapped` compute a frozen linear and the down-projection of
the candidates that read its input as one autograd node (the input's gradient written once), the
up-projection added into the linear's output in place (:mod:`prunepeft.modules`).
"""

from __future__ import annotations

import functools
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


# --------------------------------------------------------------------------- gradients of flat views

Span = tuple[int, int, tuple[int, ...]]
"""``(offset, elements, shape)``: the view ``flat.narrow(0, offset, elements).view(shape)``."""


def _graph_task() -> int:
    """Id of the backward pass (graph task) running on this thread; -1 outside one."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn() if fn is not None else 0


class _Sink:
    """The full-size gradient buffers of one :class:`FlatGrad`, one per running backward pass.

    Held by the autograd nodes' contexts; it holds no tensor of the graph (no reference cycle
    through the C++ nodes)."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.shape, self.dtype, self.device = flat.shape, flat.dtype, flat.device
        self.bufs: dict[int, torch.Tensor] = {}

    def buffer(self) -> torch.Tensor:
        task = _graph_task()
        buf = self.bufs.get(task)
        if buf is None:
            buf = self.bufs[task] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            FlatGrad.allocations += 1
        return buf

    def take(self) -> torch.Tensor | None:
        # popped, so autograd holds the only reference: AccumulateGrad adopts it as ``.grad``
        return self.bufs.pop(_graph_task(), None)


class _FlatRoot(torch.autograd.Function):
    """``flat -> token`` (an empty tensor): the one edge into ``flat``'s AccumulateGrad. Its
    backward runs after every :class:`_FlatViews` node of the pass (they all take the token) and
    returns the pass's buffer as ``flat``'s gradient."""

    @staticmethod
    def forward(ctx, flat, sink):
        ctx.sink = sink
        return flat.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        return ctx.sink.take(), None


class _FlatViews(torch.autograd.Function):
    """``token -> views of flat``; backward adds each view's gradient into its range of the pass's
    buffer (views whose output got no gradient are skipped)."""

    @staticmethod
    def forward(ctx, token, data, sink, spans):
        ctx.sink, ctx.spans = sink, spans
        ctx.set_materialize_grads(False)
        return tuple(data.narrow(0, off, n).view(shape) for off, n, shape in spans)

    @staticmethod
    def backward(ctx, *grads):
        if any(g is not None for g in grads):
            buf = ctx.sink.buffer()
            for (off, n, shape), g in zip(ctx.spans, grads, strict=True):
                if g is not None:
                    buf.narrow(0, off, n).view(shape).add_(g)
        return torch.empty(0, dtype=ctx.sink.dtype, device=ctx.sink.device), None, None, None


class FlatGrad:
    """Views of one flat parameter whose gradients reach it as one buffer per backward pass.

    Autograd's ``narrow`` backward makes a zero tensor of the whole parameter for every view and
    adds them all into its gradient: with a hundred views per forward that is a hundred full-size
    allocations and additions per step. Here every :meth:`views` call is one node that takes the
    ``token`` of a root node (:class:`_FlatRoot`) on the parameter; in a backward pass the first
    views node to run allocates one zero-initialised full-size buffer (per graph task, so a nested
    backward, e.g. reentrant checkpointing, gets its own), every views node adds its views'
    gradients into their ranges, and the root, which autograd runs after all of them, returns the
    buffer as the parameter's gradient. AccumulateGrad therefore sees one gradient per pass: it
    adopts the buffer as ``.grad`` (no copy) or adds it to the ``.grad`` already there (gradient
    accumulation), and hooks on the parameter (``register_post_accumulate_grad_hook``) fire once.

    Valid while the parameter is unchanged (:meth:`matches`: identity, shape, dtype, device and
    version, so a new one after every optimizer step); forwards in between (micro-batches of one
    step) share it. Only for forwards with grad enabled; higher-order gradients are not supported.
    """

    allocations = 0
    """Full-size gradient buffers allocated so far, by all instances (the tests count them)."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat
        self.version = flat._version
        self.sink = _Sink(flat)
        with torch.enable_grad():
            self.token = _FlatRoot.apply(flat, self.sink)

    def matches(self, flat: torch.Tensor) -> bool:
        """Whether this still serves ``flat`` (same tensor, unchanged since)."""
        return (
            flat is self.flat
            and flat._version == self.version
            and flat.shape == self.sink.shape
            and flat.dtype == self.sink.dtype
            and flat.device == self.sink.device
        )

    def views(self, spans: Sequence[Span]) -> tuple[torch.Tensor, ...]:
        """``flat.narrow(0, off, n).view(shape)`` for each span, as outputs of one node."""
        return _FlatViews.apply(self.token, self.flat.detach(), self.sink, tuple(spans))


class _LinearTap(torch.autograd.Function):
    """``(x @ w.T + b, x @ d.T)`` as 2-D ``[tokens, out]`` and ``[tokens, width]``: a frozen linear and
    the down-projection of the candidates that read its input, one autograd node. Its backward writes
    the input's gradient once, ``gy @ w`` and then ``+= gh @ d`` in place, where autograd would make
    two full-size gradients of ``x`` and add them; neither output is a view or saved, so the caller may
    add the up-projection into ``y`` in place (:func:`_up`'s ``inplace``)."""

    @staticmethod
    def forward(ctx, x, w, b, d):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, w, d)
        ctx.x_shape = x.shape
        y = torch.addmm(b, x2, w.t()) if b is not None else x2 @ w.t()
        return y, x2 @ d.t()

    @staticmethod
    def backward(ctx, gy, gh):
        x2, w, d = ctx.saved_tensors
        gx = gd = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ w).addmm_(gh, d).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            gd = gh.t() @ x2
        return gx, None, None, gd


def linear_tap(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ weight.T + bias, x @ d.T)`` flattened to 2-D, in one autograd node (:class:`_LinearTap`).

    For a frozen ``weight`` / ``bias`` (neither gets a gradient) in training forwards on the reference
    path: the site's linear and its input-tap candidates' down-projection, whose input gradients
    backward sums in place. Reshape ``y`` to ``[..., out]`` after adding the up-projection.
    """
    return _LinearTap.apply(x, weight, bias, d)


def bottleneck_tapped(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    d: torch.Tensor,
    ut: torch.Tensor,
    pieces: Sequence[Piece],
    unit_scale: torch.Tensor,
    h_abs_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias + bottleneck(x)`` (:func:`bottleneck_reference` with ``acc`` the frozen
    linear's output), the linear and the down-projection in one node (:func:`linear_tap`), the
    up-projection added into the linear's output in place. ``[..., out]``."""
    y, h = linear_tap(x, weight, bias, d)
    return _up(h, ut, pieces, unit_scale, h_abs_sum, y, inplace=True).view(*x.shape[:-1], y.shape[-1])


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
    acc: torch.Tensor | None = None,
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

        out = triton_backend.bottleneck(x, d, ut, pieces, unit_scale, h_abs_sum)
        return out if acc is None else acc + out.to(acc.dtype)
    return bottleneck_reference(x, d, ut, pieces, unit_scale, h_abs_sum, acc)


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
    """Per site ``s`` of ``layout``: :func:`bottleneck_reference` of its candidates on ``x``, with
    the down-projections of all sites computed by one GEMM (:func:`bottleneck_stacked`).

    Args:
        x: ``[..., in_dim]``.
        region: the group's 1-D region of the bank (``layout.size`` elements).
        layout: where each site's parameters lie in ``region``.
        unit_scale: ``[layout.width]``, the group's units in ``D`` row order.
        h_abs_sum: optional float32 ``[layout.width]`` buffer (see :func:`bottleneck_reference`).

    Returns:
        One ``[..., out_dim]`` tensor per site, in ``layout.sites`` order.
    """
    d = region.narrow(0, 0, layout.width * layout.in_dim).view(layout.width, layout.in_dim)
    sites = [layout.site_args(region, k)[1:] for k in range(len(layout.sites))]
    return bottleneck_stacked(x, d, sites, unit_scale, h_abs_sum)


def bottleneck_stacked(
    x: torch.Tensor,
    d: torch.Tensor,
    sites: Sequence[tuple[torch.Tensor, Sequence[Piece]]],
    unit_scale: torch.Tensor,
    h_abs_sum: torch.Tensor | None = None,
    lazy: bool = False,
    h: torch.Tensor | None = None,
) -> list:
    """The bottlenecks of several sites that read ``x``, whose ``D`` rows are stacked in ``d``.

    One GEMM computes ``x @ d.T`` for every unit; it is split by site (``torch.split``: one
    backward node, one concatenation), and each site's activation and up-projection runs on its
    slice exactly as in :func:`bottleneck_reference`. With ``lazy`` each site's up-projection is
    left to its caller: the result holds, per site, a function of ``acc`` that returns ``acc`` plus
    the site's bottleneck (its activation statistics are added when it is called), so every site
    adds its output to its own linear's output in one fused GEMM (``_up``'s ``acc``).

    Args:
        x: ``[..., in]``.
        d: ``[sum of the sites' widths, in]``, the sites' ``D`` rows in ``sites`` order.
        sites: per site, its ``Ut`` ``[width, out]`` and pieces (units relative to the site).
        unit_scale: ``[sum of widths]``.
        h_abs_sum: optional float32 ``[sum of widths]`` buffer (see :func:`bottleneck_reference`).
        h: ``x @ d.T`` when the caller computed it already (:func:`linear_tap`).

    Returns:
        One ``[..., out]`` tensor per site.
    """
    widths = [ut.shape[0] for ut, _ in sites]
    h = x @ d.t() if h is None else h
    hs = h.split(widths, dim=-1) if len(sites) > 1 else (h,)
    scales = unit_scale.split(widths)
    habs = h_abs_sum.split(widths) if h_abs_sum is not None else (None,) * len(sites)
    args = [
        (hk, ut, pieces, sk, ak) for hk, (ut, pieces), sk, ak in zip(hs, sites, scales, habs, strict=True)
    ]
    if lazy:
        return [functools.partial(_up, *a) for a in args]
    return [_up(*a) for a in args]


def bottleneck_reference(
    x: torch.Tensor,
    d: torch.Tensor,
    ut: torch.Tensor,
    pieces: Sequence[Piece],
    unit_scale: torch.Tensor,
    h_abs_sum: torch.Tensor | None = None,
    acc: torch.Tensor | None = None,
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
        acc: optional ``[..., out]`` tensor the result is added to (the wrapped linear's output):
            ``acc + bottleneck``. With autograd recording and ``acc`` in the bank's dtype, the
            up-projection and the sum are one ``addmm`` (no full-size output of the bottleneck
            alone, no separate add); otherwise the plain sum (so inference keeps a peft LoRA's
            numerics: ``y + (h * scale) @ Ut``).

    Returns:
        ``[..., out]``.
    """
    return _up(x @ d.t(), ut, pieces, unit_scale, h_abs_sum, acc)


def _piece_inputs(h: torch.Tensor, pieces: Sequence[Piece]) -> Sequence[torch.Tensor]:
    """Each piece's units of ``h`` (one ``split`` when the pieces tile ``h``'s last dim in order)."""
    sizes = [p.hi - p.lo for p in pieces]
    tiled = pieces[0].lo == 0 and all(p.lo == q.hi for q, p in zip(pieces, pieces[1:], strict=False))
    if tiled and pieces[-1].hi == h.shape[-1]:
        return (h,) if len(pieces) == 1 else h.split(sizes, dim=-1)
    return [h[..., p.lo : p.hi] for p in pieces]


def _up(
    h: torch.Tensor,
    ut: torch.Tensor,
    pieces: Sequence[Piece],
    unit_scale: torch.Tensor,
    h_abs_sum: torch.Tensor | None,
    acc: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """:func:`bottleneck_reference` after the down-projection ``h = x @ d.T``. ``inplace``: ``acc`` is
    a 2-D tensor nothing else reads or saved (:func:`linear_tap`'s ``y``), and the up-projection is
    added into it (no copy of ``acc`` into a fresh output)."""
    simple = all(p.activation == "identity" and p.bd is None for p in pieces)
    if not simple:
        parts = []
        for p, hp in zip(pieces, _piece_inputs(h, pieces), strict=True):
            if p.bd is not None:
                hp = hp + p.bd
            parts.append(activate(hp, p.activation))
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if h_abs_sum is not None:
        with torch.no_grad():
            h_abs_sum += h.detach().abs().reshape(-1, h.shape[-1]).sum(0).to(h_abs_sum.dtype)
    hs = h * unit_scale
    fused = acc is not None and acc.dtype == hs.dtype and torch.is_grad_enabled()
    if fused and inplace:
        out = acc.addmm_(hs.reshape(-1, hs.shape[-1]), ut)
    elif fused:  # acc + hs @ ut in one GEMM; its backward passes the gradient to acc as it is
        out = torch.addmm(acc.reshape(-1, acc.shape[-1]), hs.reshape(-1, hs.shape[-1]), ut).view(acc.shape)
    else:
        out = hs @ ut
    for p in pieces:
        if p.bu is not None:
            out = out + p.bu
    return out if fused or acc is None else acc + out.to(acc.dtype)
