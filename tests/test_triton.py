"""Triton kernels against the pure-torch reference, on CPU through the Triton interpreter.

conftest.py sets TRITON_INTERPRET=1 before anything imports the kernels. fp32 and fp16 only (the
interpreter miscomputes bf16 ``tl.dot``); shapes are small and odd (widths not multiples of 16,
1-token batches). fp16 follows flash-attention's rule: the kernel's error against an fp32
reference must be at most twice the error of the same torch computation done in fp16.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py) or a GPU", allow_module_level=True)

from conftest import group_specs, tiny_model, train_steps  # noqa: E402

import prunepeft  # noqa: E402
from prunepeft import SpaceConfig, attach  # noqa: E402
from prunepeft.backends import reference  # noqa: E402
from prunepeft.backends import triton as tb  # noqa: E402
from prunepeft.ops import Piece, bottleneck, bottleneck_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# one slab mixing every kind: LoRA (identity, scale 2, no bias), parallel adapters with gelu/silu,
# a relu adapter, widths 5, 8, 3, 12 (not multiples of 16) -> W = 28
SLAB = (("identity", 5, False, 2.0), ("gelu", 8, True, 1.0), ("silu", 3, True, 1.0), ("relu", 12, True, 1.0))


def _slab(K, N, dtype, mask, seed=0, slab=SLAB):
    """Leaf tensors for a slab: d [W, K], ut [W, N], per-piece bd / bu, unit_scale with ``mask``."""
    gen = torch.Generator().manual_seed(seed)
    W = sum(w for _, w, _, _ in slab)
    rnd = lambda *s: (torch.randn(*s, generator=gen) * 0.5).to(dtype).to(DEV).requires_grad_()  # noqa: E731
    d, ut = rnd(W, K), rnd(W, N)
    pieces, scale, lo = [], [], 0
    for act, w, bias, s in slab:
        pieces.append(Piece(lo, lo + w, act, rnd(w) if bias else None, rnd(N) if bias else None))
        scale += [s] * w
        lo += w
    scale = torch.tensor(scale)
    if mask == "all":
        scale.zero_()
    elif mask == "random":  # blocks of 2 units, about half of them, first unit kept
        keep = torch.rand(W // 2 + 1, generator=gen) < 0.5
        keep[0] = True
        scale *= keep.repeat_interleave(2)[:W]
    return d, ut, pieces, scale.to(dtype).to(DEV)


def _leaves(d, ut, pieces):
    out = [d, ut]
    for p in pieces:
        out += [t for t in (p.bd, p.bu) if t is not None]
    return out


def _run(fn, x, d, ut, pieces, scale, gout, habs=None):
    out = fn(x, d, ut, pieces, scale, habs)
    grads = torch.autograd.grad(out, [x, *_leaves(d, ut, pieces)], gout)
    return [out.detach(), *grads]


def _as(dtype, x, d, ut, pieces, scale):
    """The same slab cast to ``dtype`` (fresh leaves)."""
    c = lambda t: t.detach().to(dtype).requires_grad_()  # noqa: E731
    ps = [
        Piece(p.lo, p.hi, p.activation, *(None if t is None else c(t) for t in (p.bd, p.bu))) for p in pieces
    ]
    return c(x), c(d), c(ut), ps, scale.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask", ["none", "random", "all"])
@pytest.mark.parametrize("lead,K,N", [((1,), 19, 21), ((3, 7), 40, 23)])
def test_bottleneck_forward_backward(dtype, mask, lead, K, N):
    d, ut, pieces, scale = _slab(K, N, dtype, mask, seed=len(lead) + K)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, K, generator=gen).to(dtype).to(DEV).requires_grad_()
    gout = torch.randn(*lead, N, generator=gen).to(dtype).to(DEV)
    got = _run(tb.bottleneck, x, d, ut, pieces, scale, gout)
    want = _run(bottleneck_reference, x, d, ut, pieces, scale, gout)
    names = ["out", "dx", "dD", "dUt"] + [f"d{n}{i}" for i, p in enumerate(pieces) for n, t in (("bd", p.bd), ("bu", p.bu)) if t is not None]  # fmt: skip
    if dtype == torch.float32:
        for n, g, w in zip(names, got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=n)
    else:  # error vs fp32 <= 2x the error of torch's fp16 computation vs fp32, plus a small floor
        exact = _run(bottleneck_reference, *_as(torch.float32, x, d, ut, pieces, scale), gout.float())
        for n, g, w, e in zip(names, got, want, exact, strict=True):
            err_k = (g.float() - e).abs().max().item()
            err_t = (w.float() - e).abs().max().item()
            assert err_k <= 2 * err_t + 2e-3 * (1 + e.abs().max().item()), (n, err_k, err_t)
    # masked units: no gradient at all, exactly
    dead = (scale == 0).nonzero().flatten()
    assert got[2][dead].abs().sum() == 0 and got[3][dead].abs().sum() == 0
    if mask == "all":
        assert all(t.abs().sum() == 0 for t in got[1:4])  # dx, dD, dUt; out is the sum of the bu


def test_bottleneck_many_units_and_h_abs_sum():
    """More active units than one unit tile (read-modify-write of the output), Σ|h| per unit."""
    slab = (("identity", 40, False, 0.5), ("gelu", 36, True, 1.0))  # W = 76 > BLOCK_R = 64
    d, ut, pieces, scale = _slab(17, 18, torch.float32, "random", seed=3, slab=slab)
    x = torch.randn(2, 9, 17).to(DEV).requires_grad_()
    gout = torch.randn(2, 9, 18).to(DEV)
    h_got = torch.full((76,), 0.25, device=DEV)
    h_want = h_got.clone()
    got = _run(tb.bottleneck, x, d, ut, pieces, scale, gout, h_got)
    want = _run(bottleneck_reference, x, d, ut, pieces, scale, gout, h_want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    live = scale != 0
    torch.testing.assert_close(h_got[live], h_want[live], rtol=1e-5, atol=1e-5)
    assert torch.all(h_got[~live] == 0.25)  # masked units are not computed, so not counted


def test_dispatch(monkeypatch):
    d, ut, pieces, scale = _slab(8, 8, torch.float32, "none")
    x = torch.randn(3, 8, device=DEV)
    calls = []
    monkeypatch.setattr(tb, "bottleneck", lambda *a: calls.append(1) or bottleneck_reference(*a))
    monkeypatch.setenv("PRUNEPEFT_BACKEND", "reference")
    bottleneck(x, d, ut, pieces, scale)
    assert calls == [] or DEV == "cuda"
    monkeypatch.setenv("PRUNEPEFT_BACKEND", "triton")
    bottleneck(x, d, ut, pieces, scale)
    assert calls
    monkeypatch.delenv("PRUNEPEFT_BACKEND")
    if DEV == "cpu":
        n = len(calls)
        bottleneck(x, d, ut, pieces, scale)  # CPU tensors default to the reference
        assert len(calls) == n
        assert prunepeft.get_backend().__name__.rsplit(".", 1)[-1] in ("native", "reference")
    assert prunepeft.get_backend("triton") is tb


def test_import_without_triton():
    """`import prunepeft` and the CPU path work when Triton cannot be imported."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, prunepeft, prunepeft_triton\n"
        "from prunepeft.ops import Piece, bottleneck\n"
        "assert not prunepeft_triton.available('cpu') and not prunepeft_triton.available('cuda')\n"
        "assert 'triton' not in prunepeft.available_backends()\n"
        "y = bottleneck(torch.ones(2, 3), torch.ones(4, 3), torch.ones(4, 5), [Piece(0, 4, 'relu', None, None)],"
        " torch.ones(4))\n"
        "assert y.shape == (2, 5)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PRUNEPEFT_BACKEND")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ----------------------------------------------------------------------------- layout groups

# q: LoRA 8 + gelu parallel adapter 6 (out 21); k: LoRA 4 (out 9); v: LoRA 72 (out 13, two unit
# tiles: read-modify-write of its output); in 19; blocks of 2 units
GROUP = (("q", 21, 8, 6), ("k", 9, 4, 0), ("v", 13, 72, 0))


def _group_bank(dtype, mask, seed=0):
    from prunepeft.bank import ModuleBank

    specs = group_specs(GROUP)
    bank = ModuleBank(specs, dtype=dtype, device=DEV)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bank.flat.copy_((torch.randn(bank.flat.shape, generator=gen) * 0.5).to(dtype))
    keep = torch.ones(bank.num_blocks, dtype=torch.bool)
    if mask == "all":
        keep[:] = False
    elif mask == "random":
        keep = torch.rand(bank.num_blocks, generator=gen) < 0.5
        keep[0] = True
    elif mask == "site":  # every block of k (the middle site: an empty tile between two live ones)
        keep[list(bank.candidate_blocks(2))] = False
    bank.set_block_mask(keep)
    return bank


def _group_run(bank, x, gouts, grouped: bool, dtype=None):
    """Outputs, dx, dflat and Σ|h| of the group: one group call, or one reference call per site."""
    flat = bank.flat if dtype is None else bank.flat.detach().to(dtype).requires_grad_()
    x = x.detach().to(flat.dtype).requires_grad_()
    habs = torch.zeros(bank.total_units, device=DEV)
    gid = bank.input_group("q")
    start, unit0, layout = bank._groups[gid]
    region = flat.narrow(0, start, layout.size)
    scale = bank.unit_scale.to(flat.dtype)
    if grouped:
        outs = tb.bottleneck_group(x, region, layout, scale.narrow(0, unit0, layout.width), habs.narrow(0, unit0, layout.width))  # fmt: skip
    else:
        outs = []
        for site, *_ in GROUP:
            sl = bank._slabs[(site, "input")]
            d = flat.narrow(0, sl.d_off, sl.width * sl.in_dim).view(sl.width, sl.in_dim)
            ut = flat.narrow(0, sl.u_off, sl.width * sl.out_dim).view(sl.width, sl.out_dim)
            pieces = [Piece(lo, hi, a, flat.narrow(0, b, hi - lo) if b >= 0 else None,
                            flat.narrow(0, u, sl.out_dim) if u >= 0 else None) for lo, hi, a, b, u in sl.pieces]  # fmt: skip
            h = habs.narrow(0, sl.unit_off, sl.width)
            outs.append(bottleneck_reference(x, d, ut, pieces, scale.narrow(0, sl.unit_off, sl.width), h))
    gouts = [g.to(flat.dtype) for g in gouts]
    dx, dflat = torch.autograd.grad(outs, [x, flat], gouts)
    return [o.detach() for o in outs] + [dx, dflat], habs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask", ["none", "random", "site", "all"])
def test_group_matches_per_site_reference(dtype, mask):
    """q, k, v of one layer (LoRAs + a parallel adapter on q, out widths 21 / 9 / 13) in one launch
    equal three per-site reference calls: outputs, dx (summed over the sites), the flat gradient."""
    bank = _group_bank(dtype, mask, seed=len(mask))
    gen = torch.Generator().manual_seed(5)
    lead = (1,) if mask == "site" else (3, 5)
    x = torch.randn(*lead, 19, generator=gen).to(DEV)
    gouts = [torch.randn(*lead, out, generator=gen).to(DEV) for _, out, *_ in GROUP]
    got, h_got = _group_run(bank, x, gouts, grouped=True)
    want, h_want = _group_run(bank, x, gouts, grouped=False)
    names = ["out_q", "out_k", "out_v", "dx", "dflat"]
    if dtype == torch.float32:
        for n, g, w in zip(names, got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=n)
    else:  # the 2x rule against an fp32 computation of the same reference
        exact, _ = _group_run(bank, x, gouts, grouped=False, dtype=torch.float32)
        for n, g, w, e in zip(names, got, want, exact, strict=True):
            err_k = (g.float() - e).abs().max().item()
            err_t = (w.float() - e).abs().max().item()
            assert err_k <= 2 * err_t + 2e-3 * (1 + e.abs().max().item()), (n, err_k, err_t)
    live = bank.unit_scale != 0
    torch.testing.assert_close(h_got[live], h_want[live], rtol=1e-3, atol=1e-3)
    assert torch.all(h_got[~live] == 0)
    # masked units: their D / Ut rows get exactly no gradient
    dflat = got[4]
    for c in range(bank.num_candidates):
        t = bank.candidate_tensors(c)
        keep = bank.block_mask[list(bank.candidate_blocks(c))].repeat_interleave(2)
        for name in ("D", "Ut"):
            rows = dflat[t[name].storage_offset() - bank.flat.storage_offset() :][: t[name].numel()]
            assert rows.view(t[name].shape)[~keep].abs().sum() == 0, (c, name)
    if mask == "all":
        assert got[3].abs().sum() == 0


def _count_launches(monkeypatch):
    from prunepeft_triton import bottleneck as K

    calls = []
    fwd = K.bottleneck_fwd
    monkeypatch.setattr(K, "bottleneck_fwd", lambda *a, **k: calls.append("fwd") or fwd(*a, **k))
    for name in ("bottleneck", "bottleneck_group"):
        fn = getattr(tb, name)
        monkeypatch.setattr(tb, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    return calls


def _qkv_sites(bank):
    from prunepeft.modules import BottleneckSite

    torch.manual_seed(0)
    return {site: BottleneckSite(torch.nn.Linear(19, out), site, bank).to(DEV) for site, out, *_ in GROUP}


def test_group_cache_and_fallback(monkeypatch):
    """The first site called on a tensor launches the group; a sibling called with that same tensor
    takes its output, one called with another tensor (or in another grad mode) runs its own slab;
    the cache keeps nothing once the siblings have run; results equal the reference path."""
    monkeypatch.setenv("PRUNEPEFT_BACKEND", "triton")
    calls = _count_launches(monkeypatch)
    bank = _group_bank(torch.float32, "random", seed=2)
    sites = _qkv_sites(bank)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 19, generator=gen).to(DEV).requires_grad_()
    x2 = torch.randn(2, 4, 19, generator=gen).to(DEV).requires_grad_()

    def run(order, inputs):
        bank.flat.grad = None
        outs = {s: sites[s](inputs[s]) for s in order}
        loss = sum((o * (i + 1)).sum() for i, o in enumerate(outs[s] for s, *_ in GROUP))
        loss.backward()
        grads = [x.grad.clone(), x2.grad.clone(), bank.flat.grad.clone()]
        return [outs[s].detach() for s, *_ in GROUP] + grads

    cases = [  # (call order, inputs, expected launches: fwd kernels, group calls)
        ("qkv", dict(q=x, k=x, v=x), 1, 1),
        ("vkq", dict(q=x, k=x, v=x), 1, 1),  # any site may come first
        ("qkv", dict(q=x, k=x2, v=x), 2, 1),  # k on another tensor: its own launch, v still cached
        ("kqv", dict(q=x2, k=x, v=x), 2, 1),  # k launched the group on x, q on x2 runs alone
    ]
    for order, inputs, n_fwd, n_group in cases:
        x.grad = x2.grad = torch.zeros_like(x)
        calls.clear()
        got = run(order, inputs)
        assert calls.count("fwd") == n_fwd and calls.count("bottleneck_group") == n_group, (order, calls)
        assert bank._pending is None  # nothing kept alive
        monkeypatch.setenv("PRUNEPEFT_BACKEND", "reference")
        x.grad = x2.grad = torch.zeros_like(x)
        want = run(order, inputs)
        monkeypatch.setenv("PRUNEPEFT_BACKEND", "triton")
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # grad mode is part of the key: q under no_grad, k and v with grad -> they run alone
    calls.clear()
    with torch.no_grad():
        sites["q"](x)
    sites["k"](x)
    sites["v"](x)
    assert calls == ["bottleneck_group", "fwd", "bottleneck", "fwd", "bottleneck", "fwd"], calls
    assert bank._pending is None
    # a mask change drops pending outputs
    sites["q"](x)
    assert bank._pending is not None
    bank.mask_blocks([1])
    assert bank._pending is None


SPACE_QKV = SpaceConfig(
    lora_targets=("q", "k", "v", "o"), parallel_adapter_targets=("q",), serial_adapter_targets=("ffn",),
    lora_rank=8, adapter_width=8, block_size=4, trainable_modules=(),
)  # fmt: skip


def _bert_qkv_steps(backend, monkeypatch, steps=2):
    monkeypatch.setenv("PRUNEPEFT_BACKEND", backend)
    calls = _count_launches(monkeypatch)
    model, batch = tiny_model("bert")
    handle = attach(model, SPACE_QKV)
    handle.mask_blocks([1, 4, 9, 10])  # layer 0: a block of q's LoRA, k's LoRA, o's LoRA, the FFN adapter
    handle.bank.collect_activations = True
    opt = handle.optimizer(lr=1e-2)
    losses = train_steps(model, opt, batch, steps)
    return losses, list(calls), handle.bank


def test_tiny_bert_one_launch_per_group(monkeypatch):
    """BERT with LoRA on q, k, v, o, a parallel adapter on q and a serial adapter after the FFN:
    per layer and step one forward launch for q, k, v (not three), one for o, one for the FFN
    adapter; losses, parameters and activation means equal the reference path's."""
    ref_losses, ref_calls, ref_bank = _bert_qkv_steps("reference", monkeypatch)
    losses, calls, bank = _bert_qkv_steps("triton", monkeypatch)
    assert not ref_calls
    steps, layers = 2, 2
    assert calls.count("bottleneck_group") == layers * steps, calls
    assert calls.count("bottleneck") == 2 * layers * steps, calls  # o (input tap), FFN output (serial)
    assert calls.count("fwd") == 3 * layers * steps, calls  # per-site would be 5 per layer
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(bank.flat.detach(), ref_bank.flat.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bank.act_tokens, ref_bank.act_tokens)
    # masked blocks report 0 on both paths (the kernels never compute them); the rest agree
    means, ref_means = bank.activation_means(), ref_bank.activation_means()
    assert torch.all(means[~bank.block_mask.cpu()] == 0) and torch.all(ref_means[~bank.block_mask.cpu()] == 0)
    torch.testing.assert_close(means, ref_means, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- scoring


def _bank_plan():
    # in/out dims not multiples of 16, biased and unbiased, a width-0 candidate (owner without segments)
    return reference.plan(
        [23, 23, 17, 9], [19, 19, 17, 9], [8, 12, 4, 0], [4, 4, 2, 3], [0, 0, 1, 2], [0, 1, 1, 1]
    )


@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("adalora,accum_beta", [(False, -1.0), (True, 0.7)])
def test_block_stats_matches_reference(with_grad, adalora, accum_beta):
    p = _bank_plan()
    total, n_owners = p["total"], p["block"].shape[0] + 4
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(total, generator=gen)
    w[::7] = 0.0
    g = torch.randn(total, generator=gen) if with_grad else None
    st = [torch.rand(total, generator=gen) for _ in range(2)] if adalora else [None, None]
    st_ref = [None if t is None else t.clone() for t in st]
    acc = torch.rand(n_owners, 8, generator=gen, dtype=torch.float64)
    acc_ref = acc.clone()
    dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    sens, unc = dev(st[0]), dev(st[1])
    got = tb.block_stats(dev(w), dev(g), p["seg"], n_owners, 0.3, sens, unc, 0.8, 0.9, acc, accum_beta)
    want = reference.block_stats(w, g, p["seg"], n_owners, 0.3, *st_ref, 0.8, 0.9, acc_ref, accum_beta)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(acc, acc_ref, rtol=1e-5, atol=1e-9)
    assert torch.equal(got[:, 4:6].cpu(), want[:, 4:6]) and torch.equal(got[:, 7].cpu(), want[:, 7])
    if adalora:  # the fused update follows the reference's float64 arithmetic bit for bit
        assert torch.equal(sens.cpu(), st_ref[0]) and torch.equal(unc.cpu(), st_ref[1])


def test_block_stats_rejects_bad_input():
    p = _bank_plan()
    w = torch.zeros(p["total"], device=DEV)
    with pytest.raises(ValueError, match="owner"):
        tb.block_stats(w, None, p["seg"], 2, 0.1)
    with pytest.raises(ValueError, match="float32"):
        tb.block_stats(w.double(), None, p["seg"], p["block"].shape[0] + 4, 0.1)


# ----------------------------------------------------------------------------- end to end

SPACE = SpaceConfig(
    lora_targets=("all",), lora_rank=8, serial_adapter_targets=("attn", "ffn"), parallel_adapter_targets=("up",),
    adapter_width=8, adapter_activation="gelu", block_size=4, trainable_modules=(),
)  # fmt: skip


def _search_steps(backend, monkeypatch):
    monkeypatch.setenv("PRUNEPEFT_BACKEND", backend)
    calls = []
    for name in ("bottleneck", "bottleneck_group", "block_stats"):  # count what the triton backend computes
        fn = getattr(tb, name)
        monkeypatch.setattr(tb, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    model, batch = tiny_model("bert")
    handle = attach(model, SPACE)
    handle.mask_blocks([0, 3, 5, 6])  # a few blocks pruned, so the sparse path is exercised
    opt = handle.optimizer(lr=1e-2)
    losses = train_steps(model, opt, batch, 2)
    handle.bank.accumulate_stats(1e-3, adalora=(0.85, 0.85))
    handle.compact(opt)  # new plan and unit scale: the kernels' cached unit tables must follow
    handle.mask_blocks([1, 2])
    handle.bank.collect_activations = True
    losses += train_steps(model, opt, batch, 1)
    handle.bank.collect_activations = False
    stats = handle.bank.accumulate_stats(1e-3, adalora=(0.85, 0.85))
    if backend == "triton":  # per layer and step: q+k+v as one group, o, up, 2 serial; 2 scorings
        assert calls.count("bottleneck_group") == 3 * 2 and calls.count("block_stats") == 2, calls
        assert calls.count("bottleneck") >= 3 * 2 * 4, calls
    else:
        assert not calls
    live = handle.bank.unit_scale != 0
    return losses, stats, handle.bank.act_sum[live].clone(), handle.bank.flat.detach().clone()


def test_tiny_bert_training_matches_reference(monkeypatch):
    ref = _search_steps("reference", monkeypatch)
    got = _search_steps("triton", monkeypatch)
    assert got[0] == pytest.approx(ref[0], rel=1e-4, abs=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-5)  # Σ|h| of the unmasked units
    torch.testing.assert_close(got[3], ref[3], rtol=1e-4, atol=1e-5)


def test_kernels_compile_for_the_gpu():
    """The interpreter accepts code the GPU compiler rejects: compile every kernel for sm_90 (no GPU
    needed; Triton's bundled ptxas) in fp32, fp16 and bf16."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run(
        [sys.executable, "-m", "prunepeft_triton.compile_check", "fp32", "fp16", "bf16", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok  sm_90") == 14
