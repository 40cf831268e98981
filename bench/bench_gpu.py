"""GPU benchmark of the Triton kernels (issue 4): checks, device ceilings, timings, peak memory.

On a CUDA machine, in a few minutes:

1. **checks** every kernel against the pure-torch reference in bf16 and fp16 (bottleneck forward,
   backward, Σ|h|, per slab and for a q/k/v layout group in one launch) and fp32 (scoring): fresh random inputs, outputs poisoned (the caching allocator
   is filled with NaN first, so any element a kernel forgets to write shows up), relative-error
   thresholds (and the 2x rule: the kernel's error against fp32 at most twice torch's own error in
   the same dtype); the scoring kernel's AdaLoRA state must match bit for bit;
2. **ceilings**: copy bandwidth (a 1 GiB device copy) and the bf16 matmul rate (8192^3);
3. **timings** (CUDA events, median of ``--repeat`` after warm-up):
   (a) scoring of a 32-layer Llama-7B-shaped bank, GB/s against the copy bandwidth;
   (b) forward+backward of one Llama-7B-shaped layer's q, k, v, o, gate, up, down LoRAs (hidden
   4096, intermediate 11008, ranks 8-64) over an NF4 double-quant base, batch 8 x 512: the Triton
   path (q, k, v in one launch and gate, up in one: layout groups; the launches per step are
   recorded) vs peft's per-module LoRA (the surviving ranks) vs the torch reference path, at
   0/50/90% of blocks pruned (masked); plus a mixed-kinds layer (adapters too), Triton vs reference;
   (c) peak memory of each.

Without CUDA it runs what a CPU can check: the same correctness checks at small shapes through
the Triton interpreter in fp32/fp16, and CPU timings of the reference bottleneck path at the
Llama-layer shapes (adapters only, fewer tokens) as a baseline, and says what it skipped.
Every row goes to ``bench/results/gpu.csv`` with the device, versions and commit.

    python bench/bench_gpu.py [--repeat 20] [--cpu-tokens 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
from common import append_rows  # noqa: E402

from prunepeft import BottleneckSite, CandidateSpec, ModuleBank  # noqa: E402
from prunepeft.backends import reference  # noqa: E402
from prunepeft.backends import triton as tb  # noqa: E402
from prunepeft.ops import Piece, bottleneck_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
HIDDEN, INTER = 4096, 11008
LORA_RANKS = {"q": 64, "k": 8, "v": 32, "o": 16, "gate": 8, "up": 32, "down": 64}
SITES = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, HIDDEN), "v": (HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN),
         "gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}  # fmt: skip
BLOCK = 8
ROWS: list[dict[str, object]] = []


@dataclass
class Result:
    section: str
    name: str
    dtype: str = ""
    pruned: str = ""
    value: float | str = ""
    unit: str = ""
    status: str = "ok"
    note: str = ""


def record(r: Result) -> None:
    print(
        f"[{r.status:7s}] {r.section:8s} {r.name:34s} {r.dtype:9s} {r.pruned:4s} {r.value!s:>12} {r.unit:6s} {r.note}"
    )
    ROWS.append(r.__dict__.copy())


def versions() -> dict[str, str]:
    out = {"cuda": torch.version.cuda or "none"}
    for mod in ("triton", "bitsandbytes", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional piece is recorded, not fatal
            out[mod] = "missing"
    return out


# ----------------------------------------------------------------------------- timing


def timed(fn, repeat: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if CUDA:
        torch.cuda.synchronize()
        for _ in range(repeat):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def poison() -> None:
    """Fill free cached device memory with NaN so unwritten outputs show up (CUDA only)."""
    if CUDA:
        free = torch.cuda.mem_get_info()[0]
        n = min(free // 2, 4 << 30) // 4
        torch.empty(n, dtype=torch.float32, device="cuda").fill_(float("nan"))
        # freed into the caching allocator: the next empty() of the kernels reuses it


# ----------------------------------------------------------------------------- checks


def _slab(K, N, dtype, gen, widths):
    """A mixed slab with about half its 4-unit blocks masked; leaves on DEV in ``dtype``."""
    rnd = lambda *s: (torch.randn(*s, generator=gen) * 0.5).to(dtype).to(DEV).requires_grad_()  # noqa: E731
    W = sum(w for _, w, _ in widths)
    d, ut = rnd(W, K), rnd(W, N)
    pieces, scale, lo = [], [], 0
    for act, w, bias in widths:
        pieces.append(Piece(lo, lo + w, act, rnd(w) if bias else None, rnd(N) if bias else None))
        scale += [2.0 if act == "identity" else 1.0] * w
        lo += w
    keep = (torch.rand((W + 3) // 4, generator=gen) < 0.5).repeat_interleave(4)[:W]
    return d, ut, pieces, (torch.tensor(scale) * keep).to(dtype).to(DEV)


def _fwd_bwd(fn, x, d, ut, pieces, scale, gout, habs):
    out = fn(x, d, ut, pieces, scale, habs)
    leaves = [x, d, ut] + [t for p in pieces for t in (p.bd, p.bu) if t is not None]
    return [out.detach(), *torch.autograd.grad(out, leaves, gout)]


def _cast(dtype, x, d, ut, pieces, scale):
    c = lambda t: t.detach().to(dtype).requires_grad_()  # noqa: E731
    ps = [
        Piece(p.lo, p.hi, p.activation, *(None if t is None else c(t) for t in (p.bd, p.bu))) for p in pieces
    ]
    return c(x), c(d), c(ut), ps, scale.to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_bottleneck(dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    M, K, N = (300, 200, 176) if CUDA else (13, 37, 29)
    widths = [("identity", 24, False), ("gelu", 40, True), ("silu", 12, True), ("relu", 20, True)]  # W=96
    d, ut, pieces, scale = _slab(K, N, dtype, gen, widths)
    x = torch.randn(M, K, generator=gen).to(dtype).to(DEV).requires_grad_()
    gout = torch.randn(M, N, generator=gen).to(dtype).to(DEV)
    live = scale != 0
    h_k = torch.zeros(d.shape[0], device=DEV)
    h_e = torch.zeros(d.shape[0], device=DEV)
    h_t = torch.zeros(d.shape[0], device=DEV)
    poison()
    got = _fwd_bwd(tb.bottleneck, x, d, ut, pieces, scale, gout, h_k)
    torch_same = _fwd_bwd(bottleneck_reference, x, d, ut, pieces, scale, gout, h_t)
    exact = _fwd_bwd(bottleneck_reference, *_cast(torch.float32, x, d, ut, pieces, scale), gout.float(), h_e)
    names = ["out", "dx", "dD", "dUt"] + [f"d{k}{i}" for i, p in enumerate(pieces) for k in ("bd", "bu") if getattr(p, k) is not None]  # fmt: skip
    floor = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    worst, bad = 0.0, []
    for n, g, t, e in zip(names, got, torch_same, exact, strict=True):
        err_k, err_t = rel(g.float(), e), rel(t.float(), e)
        worst = max(worst, err_k)
        if not torch.isfinite(g).all() or err_k > max(2 * err_t, floor):
            bad.append(f"{n}: {err_k:.2e} vs torch {err_t:.2e}")
    dead = ~live
    if got[2][dead].abs().sum() != 0 or got[3][dead].abs().sum() != 0:
        bad.append("pruned rows of dD/dUt not exactly 0")
    err_h = rel(h_k[live], h_e[live])
    if err_h > max(2 * rel(h_t[live], h_e[live]), floor):
        bad.append(f"h_abs_sum {err_h:.2e}")
    record(Result("check", "bottleneck fwd+bwd+|h| (rel err)", str(dtype)[6:], "~50%", f"{worst:.2e}", "rel",
                  "ok" if not bad else "FAIL", "; ".join(bad) + f" shape M{M} K{K} N{N} W96"))  # fmt: skip


def _group_fwd_bwd(fn, bank: ModuleBank, x, gouts, dtype, habs):
    """Outputs, dx and the region's gradient of the q/k/v group of ``bank`` computed by ``fn``."""
    gid = bank.input_group("q")
    region, layout, scale = bank.group(gid)
    region = region.detach().to(dtype).requires_grad_()
    xx = x.detach().to(dtype).requires_grad_()
    outs = fn(xx, region, layout, scale.to(dtype), habs)
    grads = torch.autograd.grad(outs, [xx, region], [g.to(dtype) for g in gouts])
    return [o.detach() for o in outs] + list(grads)


def check_group(dtype: torch.dtype, seed: int) -> None:
    """q, k, v of one layer (GQA-like widths: k, v narrower than q; LoRAs of ranks 8-64 and a gelu
    parallel adapter on q; about half the blocks masked) in one launch vs three reference calls."""
    from prunepeft.ops import bottleneck_group_reference

    gen = torch.Generator().manual_seed(seed)
    M, K, outs = (300, 256, {"q": 256, "k": 64, "v": 64}) if CUDA else (13, 37, {"q": 29, "k": 11, "v": 11})
    ranks = {"q": 64, "k": 8, "v": 32}
    specs = []
    for site, o in outs.items():
        common = dict(site=site, role=site, layer=0, block_size=4, in_dim=K, out_dim=o, group="x")
        specs.append(CandidateSpec(f"{site}:lora", "lora", width=ranks[site], scaling=2.0, **common))
        if site == "q":
            specs.append(
                CandidateSpec("q:pa", "parallel_adapter", width=40, activation="gelu", bias=True, **common)
            )
    bank = ModuleBank(specs, dtype=torch.float32, device=DEV)
    with torch.no_grad():
        bank.flat.copy_(torch.randn(bank.flat.shape, generator=gen) * 0.5)
    bank.set_block_mask(torch.rand(bank.num_blocks, generator=gen) < 0.5)
    x = torch.randn(M, K, generator=gen).to(DEV)
    gouts = [torch.randn(M, o, generator=gen).to(DEV) for o in outs.values()]
    W = bank.group(bank.input_group("q"))[1].width
    h_k, h_t, h_e = (torch.zeros(W, device=DEV) for _ in range(3))
    poison()
    got = _group_fwd_bwd(tb.bottleneck_group, bank, x, gouts, dtype, h_k)
    torch_same = _group_fwd_bwd(bottleneck_group_reference, bank, x, gouts, dtype, h_t)
    exact = _group_fwd_bwd(bottleneck_group_reference, bank, x, gouts, torch.float32, h_e)
    floor = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    worst, bad = 0.0, []
    for n, g, t, e in zip(["out_q", "out_k", "out_v", "dx", "dregion"], got, torch_same, exact, strict=True):
        err_k, err_t = rel(g.float(), e), rel(t.float(), e)
        worst = max(worst, err_k)
        if not torch.isfinite(g).all() or err_k > max(2 * err_t, floor):
            bad.append(f"{n}: {err_k:.2e} vs torch {err_t:.2e}")
    live = bank.group(bank.input_group("q"))[2] != 0
    err_h = rel(h_k[live], h_e[live])
    if err_h > max(2 * rel(h_t[live], h_e[live]), floor):
        bad.append(f"h_abs_sum {err_h:.2e}")
    record(Result("check", "q,k,v group fwd+bwd+|h| (rel err)", str(dtype)[6:], "~50%", f"{worst:.2e}", "rel",
                  "ok" if not bad else "FAIL", "; ".join(bad) + f" shape M{M} K{K} outs {list(outs.values())}"))  # fmt: skip


def check_scoring(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    dims = (517, 300, 77) if CUDA else (37, 23, 11)
    p = reference.plan(list(dims), [dims[1], dims[0], dims[2]], [64, 16, 8], [8, 4, 2], [0, 1, 2], [0, 1, 1])
    total, n_owners = p["total"], p["block"].shape[0] + 3
    w, g = torch.randn(total, generator=gen), torch.randn(total, generator=gen)
    w[::5] = 0
    s, u = torch.rand(total, generator=gen), torch.rand(total, generator=gen)
    acc = torch.rand(n_owners, 8, generator=gen, dtype=torch.float64)
    s_r, u_r, acc_r = s.clone(), u.clone(), acc.clone()
    s_d, u_d = s.to(DEV), u.to(DEV)
    poison()
    got = tb.block_stats(w.to(DEV), g.to(DEV), p["seg"], n_owners, 0.2, s_d, u_d, 0.85, 0.9, acc, 0.6)
    want = reference.block_stats(w, g, p["seg"], n_owners, 0.2, s_r, u_r, 0.85, 0.9, acc_r, 0.6)
    err = ((got.cpu() - want).abs() / want.abs().clamp_min(1e-12)).max().item()
    bad = []
    if not torch.isfinite(got).all() or err > 1e-5:
        bad.append(f"stats rel err {err:.2e}")
    if not (torch.equal(s_d.cpu(), s_r) and torch.equal(u_d.cpu(), u_r)):
        bad.append("sens/unc not bitwise equal")
    if rel(acc, acc_r) > 1e-5:
        bad.append("accum")
    record(Result("check", "block_stats + AdaLoRA + EMA (rel err)", "float32", "", f"{err:.2e}", "rel",
                  "ok" if not bad else "FAIL", "; ".join(bad)))  # fmt: skip


# ----------------------------------------------------------------------------- ceilings


def ceilings(repeat: int) -> tuple[float, float]:
    if not CUDA:
        record(Result("ceiling", "copy bandwidth", status="skipped", note="no CUDA"))
        record(Result("ceiling", "bf16 matmul 8192^3", status="skipped", note="no CUDA"))
        return float("nan"), float("nan")
    bufs = [torch.empty(1 << 28, dtype=torch.float32, device="cuda") for _ in range(2)]  # 1 GiB each
    t = timed(lambda: bufs[1].copy_(bufs[0]), repeat)
    bw = 2 * bufs[0].numel() * 4 / t / 1e9
    record(Result("ceiling", "copy bandwidth (r+w)", "float32", "", round(bw, 1), "GB/s"))
    bufs.clear()
    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: x @ y, repeat)
    tf = 2 * n**3 / t / 1e12
    record(Result("ceiling", "bf16 matmul 8192^3", "bfloat16", "", round(tf, 1), "TFLOP/s"))
    return bw, tf


# ----------------------------------------------------------------------------- scoring timing


def time_scoring(repeat: int, copy_bw: float) -> None:
    if not CUDA:
        record(Result("scoring", "triton block_stats, 32-layer bank", status="skipped", note="no CUDA"))
        return
    specs = _layer_specs(mixed=True)
    n_layers = 32
    ind = [s.in_dim for s in specs] * n_layers
    outd = [s.out_dim for s in specs] * n_layers
    wid = [s.width for s in specs] * n_layers
    gid = {g: k for k, g in enumerate(dict.fromkeys(s.group for s in specs))}
    grp = [i // len(specs) * len(gid) + gid[s.group] for i, s in enumerate(specs * n_layers)]
    p = reference.plan(ind, outd, wid, [BLOCK] * len(ind), grp, [s.bias for s in specs] * n_layers)
    total, n_owners = p["total"], p["block"].shape[0] + len(ind)
    w = torch.randn(total, device="cuda")
    g = torch.randn(total, device="cuda")
    s, u = torch.zeros_like(w), torch.zeros_like(w)
    acc = torch.zeros(n_owners, 8, dtype=torch.float64, device="cuda")
    for ada in (False, True):
        args = (s, u) if ada else (None, None)
        t = timed(
            lambda a=args: tb.block_stats(w, g, p["seg"], n_owners, 1e-3, *a, 0.85, 0.85, acc, 0.9), repeat
        )
        gbs = total * (24 if ada else 8) / t / 1e9
        record(Result("scoring", f"block_stats{' + AdaLoRA' if ada else ''}", "float32", "", round(gbs, 1), "GB/s",
                      note=f"{total / 1e6:.1f}M elements, {t * 1e3:.3f} ms, {gbs / copy_bw:.2f}x copy"))  # fmt: skip


# ----------------------------------------------------------------------------- Llama layer


def _layer_specs(mixed: bool) -> list[CandidateSpec]:
    specs = []
    for site, (i, o) in SITES.items():
        group = "x" if site in ("q", "k", "v") else ("h" if site in ("gate", "up") else site)
        common = dict(site=site, role=site, layer=0, block_size=BLOCK, in_dim=i, out_dim=o, group=group)
        r = LORA_RANKS[site]
        specs.append(CandidateSpec(f"{site}:lora", "lora", width=r, scaling=2.0, **common))
        if mixed and site == "up":
            specs.append(
                CandidateSpec(
                    f"{site}:pa", "parallel_adapter", width=64, activation="gelu", bias=True, **common
                )
            )
    if mixed:
        for site in ("o", "down"):
            o = SITES[site][1]
            specs.append(CandidateSpec(f"{site}:sa", "serial_adapter", site=site, role=site, layer=0, block_size=BLOCK,
                                       in_dim=o, out_dim=o, width=32, activation="relu", bias=True, group=f"{site}:out"))  # fmt: skip
    group_rank = {g: k for k, g in enumerate(dict.fromkeys(s.group for s in specs))}
    return sorted(specs, key=lambda s: group_rank[s.group])


class LlamaLayerLinears(torch.nn.Module):
    """The seven linears of a Llama layer with a stand-in for attention (q + k + v)."""

    def __init__(self, make) -> None:
        super().__init__()
        for site, (i, o) in SITES.items():
            setattr(self, site, make(i, o))

    def forward(self, x):
        h = x + self.o(self.q(x) + self.k(x) + self.v(x))
        return h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _nf4(i: int, o: int):
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(
        i, o, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4"
    )
    return lin.to("cuda")


def _mask(bank: ModuleBank, frac: float, seed: int) -> None:
    nb = bank.num_blocks
    keep = torch.ones(nb, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    keep[torch.randperm(nb, generator=gen)[: int(round(frac * nb))]] = False
    bank.set_block_mask(keep)


def _step(model, x, gout):
    def run():
        y = model(x)
        y.backward(gout)

    return run


def count_fwd_launches(fn) -> int:
    """Forward bottleneck kernel launches made by one call of ``fn``."""
    from prunepeft_triton import bottleneck as K

    calls, fwd = [], K.bottleneck_fwd
    K.bottleneck_fwd = lambda *a, **k: calls.append(1) or fwd(*a, **k)
    try:
        fn()
    finally:
        K.bottleneck_fwd = fwd
    return len(calls)


def time_llama_layer(repeat: int, cpu_tokens: int) -> None:
    tokens = 8 * 512 if CUDA else cpu_tokens
    dtype = torch.bfloat16 if CUDA else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, HIDDEN, generator=gen).to(dtype).to(DEV) * 0.1).requires_grad_()
    gout = torch.randn(tokens, HIDDEN, generator=gen).to(dtype).to(DEV)
    if not CUDA:
        # adapters only (the base GEMMs of a 7B layer take minutes on a CPU): reference path
        for mixed in (False, True):
            bank = ModuleBank(_layer_specs(mixed), dtype=dtype, seed=0)
            with torch.no_grad():
                bank.flat.normal_(0, 0.02)
            keys = list(dict.fromkeys((sp.site, sp.tap) for sp in bank.specs))
            inputs = {n: torch.randn(tokens, n, generator=gen).requires_grad_() for n in (HIDDEN, INTER)}
            for frac in (0.0, 0.5, 0.9):
                _mask(bank, frac, 1)

                def run(bank=bank, keys=keys, inputs=inputs):
                    loss = 0.0
                    for site, tap in keys:
                        d, ut, pieces, scale = bank.slab(site, tap)
                        loss = loss + bottleneck_reference(inputs[d.shape[1]], d, ut, pieces, scale).sum()
                    loss.backward()

                t = timed(run, max(3, repeat // 4), warmup=1)
                record(Result("layer", f"reference bottlenecks {'mixed' if mixed else 'lora'} (no base)", "float32",
                              f"{int(frac * 100)}%", round(t * 1e3, 1), "ms",
                              note=f"CPU baseline, {tokens} tokens, fwd+bwd, masked blocks still computed, load {os.getloadavg()[0]:.1f}"))  # fmt: skip
        for what in ("triton", "peft LoRA", "reference"):
            record(Result("layer", f"{what} over NF4 base, 8x512", status="skipped", note="no CUDA"))
        return

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        record(Result("layer", "NF4 base", status="skipped", note="bitsandbytes missing"))
        return
    torch.manual_seed(0)
    base = LlamaLayerLinears(_nf4)
    for mixed in (False, True):
        bank = ModuleBank(_layer_specs(mixed), dtype=dtype, device="cuda", seed=0)
        with torch.no_grad():
            bank.flat.normal_(0, 0.02)
        model = LlamaLayerLinears(lambda i, o: None)
        for site in SITES:
            setattr(model, site, BottleneckSite(getattr(base, site), site, bank))
        for frac in (0.0, 0.5, 0.9):
            _mask(bank, frac, 1)
            for backend in ("triton", "reference"):
                os.environ["PRUNEPEFT_BACKEND"] = backend
                bank.flat.grad = None
                note = ""
                if backend == "triton":  # q, k, v (and gate, up) run as layout groups: count launches
                    n = count_fwd_launches(_step(model, x, gout))
                    note = f"; {n} fwd launches/step (per site: {len({(s.site, s.tap) for s in bank.specs})})"
                torch.cuda.synchronize()
                start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t = timed(_step(model, x, gout), repeat)
                peak = (torch.cuda.max_memory_allocated() - start) / 2**20
                record(Result("layer", f"{backend} {'mixed' if mixed else 'lora'} NF4 8x512", "bfloat16",
                              f"{int(frac * 100)}%", round(t * 1e3, 3), "ms", note=f"peak +{peak:.0f} MiB{note}"))  # fmt: skip
            os.environ.pop("PRUNEPEFT_BACKEND", None)
            if not mixed:
                time_peft(base, bank, x, gout, frac, repeat)


def time_peft(base, bank: ModuleBank, x, gout, frac: float, repeat: int) -> None:
    """peft's per-module LoRA with the ranks that survive the mask (what a compacted bank holds)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        record(Result("layer", "peft LoRA", status="skipped", note="peft missing"))
        return
    widths = dict(zip((s.site for s in bank.specs), bank.effective_widths(), strict=True))
    ranks = {s: max(BLOCK, w) for s, w in widths.items()}
    model = LlamaLayerLinears(lambda i, o: None)
    for site in SITES:
        setattr(model, site, getattr(base, site))
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(SITES), rank_pattern=ranks,
                     alpha_pattern={k: 2 * v for k, v in ranks.items()}, lora_dropout=0.0)  # fmt: skip
    pm = get_peft_model(model, cfg)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(torch.bfloat16)
            torch.nn.init.normal_(p, 0, 0.02)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = timed(_step(pm, x, gout), repeat)
    peak = (torch.cuda.max_memory_allocated() - start) / 2**20
    record(Result("layer", "peft LoRA (surviving ranks) NF4 8x512", "bfloat16", f"{int(frac * 100)}%",
                  round(t * 1e3, 3), "ms", note=f"peak +{peak:.0f} MiB; ranks {ranks}"))  # fmt: skip
    pm.unload()  # give the base linears back unwrapped


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--cpu-tokens", type=int, default=256, help="tokens of the CPU baseline (GPU: 8x512)")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name() if CUDA else 'cpu (Triton interpreter for the checks)'}")
    dtypes = (torch.bfloat16, torch.float16) if CUDA else (torch.float32, torch.float16)
    if not CUDA:
        record(Result("check", "bf16 checks", "bfloat16", status="skipped",
                      note="the interpreter miscomputes bf16 tl.dot; fp32/fp16 checked instead"))  # fmt: skip
    for k, dt in enumerate(dtypes):
        check_bottleneck(dt, seed=k)
        check_group(dt, seed=k)
    check_scoring(seed=7)
    copy_bw, _ = ceilings(args.repeat)
    time_scoring(args.repeat, copy_bw)
    time_llama_layer(args.repeat, args.cpu_tokens)
    extra = versions()
    path = append_rows("gpu", [{**r, **extra} for r in ROWS])
    failed = [r for r in ROWS if r["status"] == "FAIL"]
    print(f"wrote {len(ROWS)} rows to {path}; {len(failed)} check(s) failed")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
