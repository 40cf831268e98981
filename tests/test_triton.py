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

from conftest import tiny_model, train_steps  # noqa: E402

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
    for name in ("bottleneck", "block_stats"):  # count what the triton backend computes
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
    if backend == "triton":  # 12 sites x (input + output tap where present) per step, 2 scorings
        assert calls.count("bottleneck") >= 3 * 12 and calls.count("block_stats") == 2, calls
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
