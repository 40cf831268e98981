"""GPU benchmark of the Triton kernels (issues 4 and 12): checks, device ceilings, timings, peak memory.

On a CUDA machine, in a few minutes (``bench/gpu_run.sh`` is the one-command form for a lent GPU):

1. **checks** every kernel against the pure-torch reference in bf16 and fp16: the bottleneck forward,
   backward and Σ|h|, per slab and for a q/k/v layout group in one launch; the scoring kernel on a
   bank held in bf16 / fp16 (scored in fp32, as the bank does) and on fp32 data. Fresh random inputs,
   outputs poisoned (the caching allocator is filled with NaN first, so any element a kernel forgets
   to write shows up), relative-error thresholds (the 2x rule: the kernel's error against fp32 at
   most twice torch's own error in the same dtype); the scoring kernel's AdaLoRA state must match
   bit for bit;
2. **ceilings**: copy bandwidth (a 1 GiB device copy) and the bf16 matmul rate (8192^3);
3. **timings** (CUDA events, median of ``--repeat`` after warm-up):
   (a) scoring of a 32-layer Llama-7B-shaped bank, GB/s against the copy bandwidth;
   (b) forward+backward of one Llama-7B-shaped layer's q, k, v, o, gate, up, down LoRAs (hidden
   4096, intermediate 11008, ranks 8-64) over an NF4 double-quant base, batch 8 x 512: the Triton
   path (q, k, v in one launch and gate, up in one: layout groups; the launches per step are
   recorded) vs peft's per-module LoRA (the surviving ranks) vs the torch reference path, at
   0/50/90% of blocks pruned (masked); plus a mixed-kinds layer (adapters too), Triton vs reference.
   The Triton and reference paths of each layer must agree (a gross-error check at the real shapes).
   Without a working bitsandbytes (``bitsandbytes`` missing, or its CUDA library failing) the base
   is a bf16 ``nn.Linear`` (frozen) instead, and the rows say ``bf16 base``;
   (c) peak memory of each (``memory`` rows);
   and a figure of (b) beside the CSV (``<csv stem>_layer.png``).

``--budget-s`` bounds the wall clock (from the start of the process): before each item the script
checks that its estimated time (the last one of its kind, or a first guess) still fits, and writes a
``skipped`` row saying so when it does not. Rows are appended to the CSV as they are made, so a run
killed from outside keeps what it had; SIGTERM writes an ``interrupted`` row first. An item that
raises is written as an ``error`` row and the run goes on. Exit status: 0 when every check passed
and nothing raised (rows skipped for the budget included), 1 when a check failed or an item raised,
3 when interrupted.

The kernels have no ``@triton.autotune``: each launch has fixed block sizes, so a kernel compiles once
per dtype and set of flags (activations present, biases, ...), on its first use; the
``triton first step`` rows show what that costs in the layer.

Without CUDA:

- ``--cpu-smoke`` runs every part it can through the Triton interpreter at tiny shapes (hidden 64,
  32 tokens; fp32 and fp16 checks, bf16 skipped: the interpreter miscomputes bf16 ``tl.dot``) in about
  30 s of CPU time, over an fp32 ``nn.Linear`` base, so that a GPU run's code paths have run end to end;
  its timings measure the interpreter, not the kernels. GPU-only parts (peak memory, the NF4 base)
  are ``skipped`` rows with the reason. Default CSV: ``bench/results/gpu_smoke.csv`` (git-ignored).
- otherwise it runs the same checks and the CPU baseline: the reference bottleneck path at the
  Llama-layer shapes (adapters only, ``--cpu-tokens`` tokens).

Every row goes to ``--csv`` (default ``bench/results/gpu.csv``) with the device, versions and commit
(``$BENCH_COMMIT`` when set, for a copy of the tree without ``.git``).

    python bench/bench_gpu.py [--repeat 20] [--budget-s 450] [--csv PATH] [--cpu-smoke] [--cpu-tokens 256]
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from here (before torch's import)

import argparse  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

SMOKE = "--cpu-smoke" in sys.argv[1:]
CUDA = torch.cuda.is_available() and not SMOKE
if not CUDA:  # must precede the first import of the kernels (on CPU they run only in the interpreter)
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, stamp  # noqa: E402

from prunepeft import BottleneckSite, CandidateSpec, ModuleBank  # noqa: E402
from prunepeft.backends import reference  # noqa: E402
from prunepeft.backends import triton as tb  # noqa: E402
from prunepeft.ops import Piece, bottleneck_group_reference, bottleneck_reference  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
BLOCK = 8
FIELDS = ["section", "name", "dtype", "pruned", "value", "unit", "status", "note",
          "cuda", "triton", "bitsandbytes", "peft", "date", "machine", "torch", "threads", "commit"]  # fmt: skip


@dataclass(frozen=True)
class Shapes:
    """Sizes of one mode: the GPU's real ones, or the interpreter's tiny ones."""

    hidden: int
    inter: int
    tokens: int
    tokens_label: str
    slab: tuple[int, int, int]  # check_bottleneck: M, K, N
    group: tuple[int, int, dict[str, int]]  # check_group: M, K, outputs per site
    scoring_dims: tuple[int, int, int]  # check_scoring
    scoring_layers: int  # time_scoring
    copy_elems: int  # float32 elements per copy buffer
    matmul_n: int
    repeat: int
    warmup: int
    fracs: tuple[float, ...]  # shares of the layer's blocks pruned

    def sites(self) -> dict[str, tuple[int, int]]:
        h, i = self.hidden, self.inter
        return {
            "q": (h, h),
            "k": (h, h),
            "v": (h, h),
            "o": (h, h),
            "gate": (h, i),
            "up": (h, i),
            "down": (i, h),
        }


GPU_SHAPES = Shapes(4096, 11008, 8 * 512, "8x512", (300, 200, 176), (300, 256, {"q": 256, "k": 64, "v": 64}),
                    (517, 300, 77), 32, 1 << 28, 8192, 20, 3, (0.0, 0.5, 0.9))  # fmt: skip
TINY_SHAPES = Shapes(64, 176, 32, "32 tokens", (13, 37, 29), (13, 37, {"q": 29, "k": 11, "v": 11}),
                     (37, 23, 11), 1, 1 << 22, 256, 1, 0, (0.0, 0.9))  # fmt: skip
LORA_RANKS = {"q": 64, "k": 8, "v": 32, "o": 16, "gate": 8, "up": 32, "down": 64}


# ----------------------------------------------------------------------------- rows, log, budget


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S} +{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


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


@dataclass
class Run:
    """What one invocation has written so far, and where."""

    csv_path: Path
    rows: list[dict[str, object]] = field(default_factory=list)
    extra: dict[str, str] | None = None

    def write(self, row: dict[str, object]) -> None:
        if self.extra is None:
            self.extra = {**versions(), **stamp()}
            if os.environ.get("BENCH_COMMIT"):
                self.extra["commit"] = os.environ["BENCH_COMMIT"]
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            if self.csv_path.exists() and self.csv_path.stat().st_size > 0:
                with open(self.csv_path, newline="") as f:
                    header = next(csv.reader(f), [])
                if header != FIELDS:  # never mix two layouts in one file
                    self.csv_path = self.csv_path.with_name(self.csv_path.stem + ".new.csv")
                    log(f"the existing CSV has other columns: writing {self.csv_path} instead")
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow({**row, **self.extra})


RUN: Run | None = None


def record(r: Result) -> None:
    print(
        f"[{datetime.now():%H:%M:%S} +{time.monotonic() - T0:6.1f}s] [{r.status:7s}] {r.section:8s} "
        f"{r.name:40s} {r.dtype:9s} {r.pruned:4s} {r.value!s:>12} {r.unit:7s} {r.note}",
        flush=True,
    )
    row = r.__dict__.copy()
    if RUN is not None:
        RUN.rows.append(row)
        RUN.write(row)


def versions() -> dict[str, str]:
    """Installed versions (package metadata: importing bitsandbytes alone can take many seconds)."""
    import importlib.metadata as md

    out = {"cuda": torch.version.cuda or "none"}
    for mod in ("triton", "bitsandbytes", "peft"):
        try:
            out[mod] = md.version(mod)
        except md.PackageNotFoundError:
            out[mod] = "missing"
    return out


class Interrupted(BaseException):
    """SIGTERM (``timeout`` from outside): stop, keeping the rows already written."""


class Budget:
    """Wall-clock budget from the process start; an item runs only if its estimate still fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last: dict[str, float] = {}
        self.skipped = 0

    def left(self) -> float:
        return math.inf if self.seconds <= 0 else self.seconds - (time.monotonic() - T0)

    def item(self, kind: str, guess: float, section: str, name: str, fn: Callable[[], object], **row) -> bool:
        """Run ``fn`` if ``kind``'s estimate (its last time, else ``guess``) fits; else a skipped row.

        An exception becomes an ``error`` row (the run goes on). Returns whether ``fn`` completed.
        """
        need = self.last.get(kind, guess)
        left = self.left()
        if left < 1.2 * need + 2:
            self.skipped += 1
            record(Result(section, name, status="skipped", **row,
                          note=f"time budget: {max(left, 0):.0f} s left, ~{need:.0f} s needed (--budget-s {self.seconds:g})"))  # fmt: skip
            return False
        log(f"{section}: {name} ...")
        t0 = time.monotonic()
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - one broken item must not lose the others' rows
            traceback.print_exc()
            record(Result(section, name, status="error", **row, note=f"{type(e).__name__}: {e}"[:500]))
            if CUDA:
                try:
                    torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001 - a broken context: the next items will say so
                    pass
            return False
        finally:
            self.last[kind] = time.monotonic() - t0


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


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def poison() -> None:
    """Fill free cached device memory with NaN so unwritten outputs show up (CUDA only)."""
    if CUDA:
        free = torch.cuda.mem_get_info()[0]
        n = min(free // 2, 4 << 30) // 4
        torch.empty(n, dtype=torch.float32, device="cuda").fill_(float("nan"))
        # freed into the caching allocator: the next empty() of the kernels reuses it


def dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- checks

FLOOR = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


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


def check_bottleneck(sh: Shapes, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    M, K, N = sh.slab
    widths = [("identity", 24, False), ("gelu", 40, True), ("silu", 12, True), ("relu", 20, True)]  # W=96
    d, ut, pieces, scale = _slab(K, N, dtype, gen, widths)
    x = torch.randn(M, K, generator=gen).to(dtype).to(DEV).requires_grad_()
    gout = torch.randn(M, N, generator=gen).to(dtype).to(DEV)
    live = scale != 0
    h_k, h_e, h_t = (torch.zeros(d.shape[0], device=DEV) for _ in range(3))
    poison()
    got = _fwd_bwd(tb.bottleneck, x, d, ut, pieces, scale, gout, h_k)
    torch_same = _fwd_bwd(bottleneck_reference, x, d, ut, pieces, scale, gout, h_t)
    exact = _fwd_bwd(bottleneck_reference, *_cast(torch.float32, x, d, ut, pieces, scale), gout.float(), h_e)
    names = ["out", "dx", "dD", "dUt"] + [f"d{k}{i}" for i, p in enumerate(pieces) for k in ("bd", "bu") if getattr(p, k) is not None]  # fmt: skip
    floor = FLOOR[dtype]
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
    record(Result("check", "bottleneck fwd+bwd+|h| (rel err)", dname(dtype), "~50%", f"{worst:.2e}", "rel",
                  "ok" if not bad else "FAIL", "; ".join(bad + [f"shape M{M} K{K} N{N} W96"])))  # fmt: skip


def _group_fwd_bwd(fn, bank: ModuleBank, x, gouts, dtype, habs):
    """Outputs, dx and the region's gradient of the q/k/v group of ``bank`` computed by ``fn``."""
    gid = bank.input_group("q")
    region, layout, scale = bank.group(gid)
    region = region.detach().to(dtype).requires_grad_()
    xx = x.detach().to(dtype).requires_grad_()
    outs = fn(xx, region, layout, scale.to(dtype), habs)
    grads = torch.autograd.grad(outs, [xx, region], [g.to(dtype) for g in gouts])
    return [o.detach() for o in outs] + list(grads)


def check_group(sh: Shapes, dtype: torch.dtype, seed: int) -> None:
    """q, k, v of one layer (GQA-like widths: k, v narrower than q; LoRAs of ranks 8-64 and a gelu
    parallel adapter on q; about half the blocks masked) in one launch vs three reference calls."""
    gen = torch.Generator().manual_seed(seed)
    M, K, outs = sh.group
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
    floor = FLOOR[dtype]
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
    record(Result("check", "q,k,v group fwd+bwd+|h| (rel err)", dname(dtype), "~50%", f"{worst:.2e}", "rel",
                  "ok" if not bad else "FAIL", "; ".join(bad + [f"shape M{M} K{K} outs {list(outs.values())}"])))  # fmt: skip


def check_scoring(sh: Shapes, seed: int) -> None:
    """The scoring kernel on fp32 data (its only input dtype) with AdaLoRA and an EMA accumulator."""
    gen = torch.Generator().manual_seed(seed)
    dims = sh.scoring_dims
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


def check_bank_scoring(sh: Shapes, dtype: torch.dtype, seed: int) -> None:
    """A bank held in ``dtype`` scored through the Triton kernel vs the reference backend (two steps
    of ``accumulate_stats`` with AdaLoRA and an EMA): statistics, accumulated statistics, the gate,
    sens / unc (bitwise)."""
    gen = torch.Generator().manual_seed(seed)
    h = sh.group[1]
    specs = [
        CandidateSpec("q:lora", "lora", site="q", role="q", layer=0, block_size=4, in_dim=h, out_dim=h, width=16, scaling=2.0),
        CandidateSpec("up:pa", "parallel_adapter", site="up", role="up", layer=0, block_size=4, in_dim=h,
                      out_dim=2 * h, width=24, activation="gelu", bias=True),
        CandidateSpec("o:sa", "serial_adapter", site="o", role="o", layer=0, block_size=8, in_dim=h, out_dim=h,
                      width=16, activation="relu", bias=True),
    ]  # fmt: skip
    kernel = ModuleBank(specs, dtype=dtype, device=DEV, backend="triton")
    oracle = ModuleBank(specs, dtype=dtype, backend="reference")
    kernel.track_gate = oracle.track_gate = True
    out = {}
    poison()
    for _ in range(2):
        w = (torch.randn(kernel.flat.shape, generator=gen) * 0.5).to(dtype)
        w[::7] = 0
        g = (torch.randn(kernel.flat.shape, generator=gen) * 1e-2).to(dtype)
        for name, bank in (("kernel", kernel), ("oracle", oracle)):
            with torch.no_grad():
                bank.flat.copy_(w.to(bank.flat.device))
            bank.flat.grad = g.to(bank.flat.device)
            out[name] = bank.accumulate_stats(1e-2, ema=0.9, adalora=(0.85, 0.9)).cpu()
    step_err = ((out["kernel"] - out["oracle"]).abs() / out["oracle"].abs().clamp_min(1e-12)).max().item()
    acc_err = rel(kernel.stats.cpu(), oracle.stats.cpu())
    bad = []
    if not torch.isfinite(out["kernel"]).all() or step_err > 1e-5:
        bad.append(f"stats rel err {step_err:.2e}")
    if acc_err > 1e-6:
        bad.append(f"accumulated stats {acc_err:.2e}")
    if rel(kernel.gate.cpu(), oracle.gate.cpu()) > 1e-9:
        bad.append("gate")
    if not (torch.equal(kernel.sens.cpu(), oracle.sens) and torch.equal(kernel.unc.cpu(), oracle.unc)):
        bad.append("sens/unc not bitwise equal")
    record(Result("check", "bank scoring (fp32 pass) + AdaLoRA + EMA", dname(dtype), "", f"{step_err:.2e}", "rel",
                  "ok" if not bad else "FAIL", "; ".join(bad + [f"{kernel.flat.numel()} elements, 2 steps"])))  # fmt: skip


# ----------------------------------------------------------------------------- ceilings


def ceilings(sh: Shapes, state: dict) -> None:
    n_el = sh.copy_elems
    bufs = [torch.empty(n_el, dtype=torch.float32, device=DEV) for _ in range(2)]
    bufs[0].normal_()
    t = timed(lambda: bufs[1].copy_(bufs[0]), sh.repeat, sh.warmup)
    bw = 2 * n_el * 4 / t / 1e9
    state["copy_bw"] = bw
    where = f"{n_el * 4 >> 20} MiB buffers" + ("" if CUDA else "; CPU host memory (smoke), not a GPU ceiling")
    record(Result("ceiling", "copy bandwidth (r+w)", "float32", "", round(bw, 1), "GB/s", note=where))
    bufs.clear()


def matmul_rate(sh: Shapes) -> None:
    n = sh.matmul_n
    dt = torch.bfloat16 if CUDA else torch.float32
    x = torch.randn(n, n, device=DEV, dtype=dt)
    y = torch.randn(n, n, device=DEV, dtype=dt)
    t = timed(lambda: x @ y, sh.repeat, sh.warmup)
    record(Result("ceiling", f"matmul {n}^3", dname(dt), "", round(2 * n**3 / t / 1e12, 3), "TFLOP/s",
                  note="" if CUDA else "CPU (smoke), not a GPU ceiling"))  # fmt: skip


# ----------------------------------------------------------------------------- scoring timing


def time_scoring(sh: Shapes, state: dict) -> None:
    specs = _layer_specs(sh, mixed=True)
    if not CUDA:  # the interpreter pays per program (one per block): q, k, v only
        specs = [s for s in specs if s.group == "x"]
    n_layers = sh.scoring_layers
    ind = [s.in_dim for s in specs] * n_layers
    outd = [s.out_dim for s in specs] * n_layers
    wid = [s.width for s in specs] * n_layers
    gid = {g: k for k, g in enumerate(dict.fromkeys(s.group for s in specs))}
    grp = [i // len(specs) * len(gid) + gid[s.group] for i, s in enumerate(specs * n_layers)]
    p = reference.plan(ind, outd, wid, [BLOCK] * len(ind), grp, [s.bias for s in specs] * n_layers)
    total, n_owners = p["total"], p["block"].shape[0] + len(ind)
    w = torch.randn(total, device=DEV)
    g = torch.randn(total, device=DEV)
    s, u = torch.zeros_like(w), torch.zeros_like(w)
    acc = torch.zeros(n_owners, 8, dtype=torch.float64, device=DEV)
    copy_bw = state.get("copy_bw", float("nan"))
    for ada in (False, True):
        args = (s, u) if ada else (None, None)
        t = timed(
            lambda a=args: tb.block_stats(w, g, p["seg"], n_owners, 1e-3, *a, 0.85, 0.85, acc, 0.9),
            sh.repeat,
            sh.warmup,
        )
        gbs = total * (24 if ada else 8) / t / 1e9
        what = f"{n_layers}-layer bank" if CUDA else "q, k, v of 1 layer"
        note = f"{what}, {total / 1e6:.2f}M elements, {n_owners} owners, {t * 1e3:.3f} ms"
        if copy_bw == copy_bw:
            note += f", {gbs / copy_bw:.2f}x copy"
        if not CUDA:
            note += "; interpreter (smoke): not a kernel rate"
        record(Result("scoring", f"block_stats{' + AdaLoRA' if ada else ''}", "float32", "", round(gbs, 3), "GB/s",
                      note=note))  # fmt: skip


# ----------------------------------------------------------------------------- Llama layer


def _layer_specs(sh: Shapes, mixed: bool) -> list[CandidateSpec]:
    sites = sh.sites()
    specs = []
    for site, (i, o) in sites.items():
        group = "x" if site in ("q", "k", "v") else ("h" if site in ("gate", "up") else site)
        common = dict(site=site, role=site, layer=0, block_size=BLOCK, in_dim=i, out_dim=o, group=group)
        specs.append(CandidateSpec(f"{site}:lora", "lora", width=LORA_RANKS[site], scaling=2.0, **common))
        if mixed and site == "up":
            specs.append(
                CandidateSpec(
                    f"{site}:pa", "parallel_adapter", width=64, activation="gelu", bias=True, **common
                )
            )
    if mixed:
        for site in ("o", "down"):
            o = sites[site][1]
            specs.append(CandidateSpec(f"{site}:sa", "serial_adapter", site=site, role=site, layer=0, block_size=BLOCK,
                                       in_dim=o, out_dim=o, width=32, activation="relu", bias=True, group=f"{site}:out"))  # fmt: skip
    group_rank = {g: k for k, g in enumerate(dict.fromkeys(s.group for s in specs))}
    return sorted(specs, key=lambda s: group_rank[s.group])


class LlamaLayerLinears(torch.nn.Module):
    """The seven linears of a Llama layer with a stand-in for attention (q + k + v)."""

    def __init__(self, sites: dict[str, tuple[int, int]], make) -> None:
        super().__init__()
        self.site_names = list(sites)
        for site, (i, o) in sites.items():
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


def _dense(dtype: torch.dtype):
    def make(i: int, o: int):
        lin = torch.nn.Linear(i, o, bias=False, device=DEV, dtype=dtype)
        torch.nn.init.normal_(lin.weight, 0, i**-0.5)
        return lin.requires_grad_(False)  # frozen, like a quantised base (and peft's)

    return make


def nf4_unusable() -> str | None:
    """Why an NF4 base cannot be benchmarked here (None: it can): a tiny Linear4bit fwd+bwd."""
    if not CUDA:
        return "no CUDA (bitsandbytes' NF4 kernels are benchmarked on the GPU only)"
    try:
        lin = _nf4(128, 128)
        x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        lin(x).float().sum().backward()
        torch.cuda.synchronize()
        if not torch.isfinite(x.grad).all():
            return "bitsandbytes' NF4 forward/backward gave non-finite values"
        return None
    except Exception as e:  # noqa: BLE001 - ImportError, a missing CUDA library, an arch bnb lacks...
        return f"bitsandbytes unusable ({type(e).__name__}: {str(e)[:200]})"


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


def _peak_start() -> int:
    if not CUDA:
        return 0
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return start


def _peak_mib(start: int) -> float:
    return (torch.cuda.max_memory_allocated() - start) / 2**20 if CUDA else float("nan")


@dataclass
class Layer:
    """One benchmark layer: the shared base, its label, and the shared inputs."""

    sh: Shapes
    base: torch.nn.Module
    base_label: str  # "NF4", "bf16", "fp32"
    base_note: str
    dtype: torch.dtype
    x: torch.Tensor
    gout: torch.Tensor


def build_layer(sh: Shapes) -> Layer:
    torch.manual_seed(0)
    why = nf4_unusable()
    if CUDA and why is None:
        base, label, note, dtype = (
            LlamaLayerLinears(sh.sites(), _nf4),
            "NF4",
            "NF4 double-quant base",
            torch.bfloat16,
        )
    elif CUDA:
        base, label, dtype = LlamaLayerLinears(sh.sites(), _dense(torch.bfloat16)), "bf16", torch.bfloat16
        note = f"bf16 base instead of NF4: {why}"
    else:  # the interpreter miscomputes bf16 tl.dot, and CPU bf16 matmuls are slow: fp32
        base, label, dtype = LlamaLayerLinears(sh.sites(), _dense(torch.float32)), "fp32", torch.float32
        note = "cpu smoke: fp32 base, Triton interpreter; timings measure the interpreter"
    if why is not None:
        record(Result("layer", "NF4 base", status="skipped", note=why))
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(sh.tokens, sh.hidden, generator=gen) * 0.1).to(dtype).to(DEV).requires_grad_()
    gout = torch.randn(sh.tokens, sh.hidden, generator=gen).to(dtype).to(DEV)
    return Layer(sh, base, label, note, dtype, x, gout)


def _adapted(layer: Layer, mixed: bool) -> tuple[torch.nn.Module, ModuleBank]:
    bank = ModuleBank(_layer_specs(layer.sh, mixed), dtype=layer.dtype, device=DEV, seed=0)
    with torch.no_grad():
        bank.flat.normal_(0, 0.02)
    model = LlamaLayerLinears(layer.sh.sites(), lambda i, o: None)
    for site in model.site_names:
        setattr(model, site, BottleneckSite(getattr(layer.base, site), site, bank))
    return model, bank


def _once(model, bank: ModuleBank, layer: Layer, backend: str) -> list[torch.Tensor]:
    """Output, the bank's gradient and dx of one step on ``backend``."""
    os.environ["PRUNEPEFT_BACKEND"] = backend
    try:
        bank.flat.grad, layer.x.grad = None, None
        y = model(layer.x)
        y.backward(layer.gout)
        sync()
        return [y.detach().clone(), bank.flat.grad.detach().clone(), layer.x.grad.detach().clone()]
    finally:
        os.environ.pop("PRUNEPEFT_BACKEND", None)


def layer_case(layer: Layer, mixed: bool, frac: float) -> None:
    """Triton vs reference on one (variant, pruned fraction): agreement, launches, time, peak memory."""
    sh, variant = layer.sh, "mixed" if mixed else "lora"
    model, bank = _adapted(layer, mixed)
    _mask(bank, frac, 1)
    pruned = f"{int(frac * 100)}%"
    dt = dname(layer.dtype)
    label = f"{variant} over {layer.base_label} base, {sh.tokens_label}"
    # agreement at the real shapes (gross errors only: the precision is checked at small shapes)
    t0 = time.monotonic()
    got: list[torch.Tensor] = []
    # q, k, v (and gate, up) run as layout groups: count the forward launches of this step
    launches = count_fwd_launches(lambda: got.extend(_once(model, bank, layer, "triton")))
    first = time.monotonic() - t0
    want = _once(model, bank, layer, "reference")
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[layer.dtype]
    errs = {n: rel(g.float(), w.float()) for n, g, w in zip(("out", "dbank", "dx"), got, want, strict=True)}
    finite = all(torch.isfinite(g).all() for g in got)
    ok = finite and max(errs.values()) <= tol
    record(Result("check", f"layer triton vs reference {variant}", dt, pruned, f"{max(errs.values()):.2e}", "rel",
                  "ok" if ok else "FAIL", f"{'' if finite else 'non-finite; '}"
                  + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f"; tolerance {tol:g}; {label}"))  # fmt: skip
    if frac == 0.0:
        record(Result("layer", f"triton first step (compile + tables) {variant}", dt, pruned, round(first, 2), "s",
                      note=label))  # fmt: skip
    for backend in ("triton", "reference"):
        os.environ["PRUNEPEFT_BACKEND"] = backend
        try:
            bank.flat.grad = None
            note = layer.base_note
            if backend == "triton":
                n_sites = len({(s.site, s.tap) for s in bank.specs})
                note += f"; {launches} fwd launches/step (site taps with candidates: {n_sites})"
            start = _peak_start()
            t = timed(_step(model, layer.x, layer.gout), sh.repeat, sh.warmup)
            peak = _peak_mib(start)
        finally:
            os.environ.pop("PRUNEPEFT_BACKEND", None)
        record(Result("layer", f"{backend} {label}", dt, pruned, round(t * 1e3, 3), "ms", note=note))
        if CUDA:
            record(Result("memory", f"{backend} {label}", dt, pruned, round(peak, 1), "MiB",
                          note="peak allocated during the timed steps, above what was allocated before"))  # fmt: skip
    if not mixed:
        time_peft(layer, bank, frac)
    if CUDA:
        torch.cuda.empty_cache()


def time_peft(layer: Layer, bank: ModuleBank, frac: float) -> None:
    """peft's per-module LoRA with the ranks that survive the mask (what a compacted bank holds)."""
    from peft import LoraConfig, get_peft_model

    sh = layer.sh
    widths = dict(zip((s.site for s in bank.specs), bank.effective_widths(), strict=True))
    ranks = {s: max(BLOCK, w) for s, w in widths.items()}  # peft has no rank 0: a pruned-away site keeps 8
    model = LlamaLayerLinears(sh.sites(), lambda i, o: None)
    for site in model.site_names:
        setattr(model, site, getattr(layer.base, site))
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(sh.sites()), rank_pattern=ranks,
                     alpha_pattern={k: 2 * v for k, v in ranks.items()}, lora_dropout=0.0)  # fmt: skip
    pm = get_peft_model(model, cfg)
    try:
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(layer.dtype)
                torch.nn.init.normal_(p, 0, 0.02)
        start = _peak_start()
        t = timed(_step(pm, layer.x, layer.gout), sh.repeat, sh.warmup)
        peak = _peak_mib(start)
    finally:
        pm.unload()  # give the base linears back unwrapped
    dt, pruned = dname(layer.dtype), f"{int(frac * 100)}%"
    label = f"peft LoRA (surviving ranks) over {layer.base_label} base, {sh.tokens_label}"
    record(
        Result("layer", label, dt, pruned, round(t * 1e3, 3), "ms", note=f"{layer.base_note}; ranks {ranks}")
    )
    if CUDA:
        record(Result("memory", label, dt, pruned, round(peak, 1), "MiB",
                      note="peak allocated during the timed steps, above what was allocated before"))  # fmt: skip


def cpu_baseline(repeat: int, cpu_tokens: int) -> None:
    """The reference bottleneck path at the Llama-layer shapes, adapters only (the base GEMMs of a 7B
    layer take minutes on a CPU), ``cpu_tokens`` tokens."""
    sh = GPU_SHAPES
    gen = torch.Generator().manual_seed(0)
    for mixed in (False, True):
        bank = ModuleBank(_layer_specs(sh, mixed), dtype=torch.float32, seed=0)
        with torch.no_grad():
            bank.flat.normal_(0, 0.02)
        keys = list(dict.fromkeys((sp.site, sp.tap) for sp in bank.specs))
        inputs = {
            n: torch.randn(cpu_tokens, n, generator=gen).requires_grad_() for n in (sh.hidden, sh.inter)
        }
        for frac in sh.fracs:
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
                          note=f"CPU baseline, {cpu_tokens} tokens, fwd+bwd, masked blocks still computed, load {os.getloadavg()[0]:.1f}"))  # fmt: skip


# ----------------------------------------------------------------------------- figure


def figure(rows: list[dict[str, object]], path: Path, title: str) -> None:
    """Layer fwd+bwd time against the share of blocks pruned, one line per path and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["section"] == "layer" and r["unit"] == "ms" and r["status"] == "ok" and r["pruned"]:
            lines.setdefault(str(r["name"]), []).append(
                (float(str(r["pruned"]).rstrip("%")), float(r["value"]))
            )
    if not lines:
        raise RuntimeError("no layer timings to plot")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("blocks pruned (%)")
    ax.set_ylabel("forward + backward (ms, median)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    record(Result("figure", "layer time vs pruned", value=path.name, unit="png", note=str(path)))


# ----------------------------------------------------------------------------- main


def _on_term(signum, frame) -> None:  # noqa: ARG001
    raise Interrupted()


def main(argv: list[str] | None = None) -> int:
    global RUN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--repeat", type=int, default=None, help="timed repeats (default: 20 on a GPU, 1 in smoke)"
    )
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget in seconds (0: none)")
    ap.add_argument(
        "--csv", type=Path, default=None, help="output CSV (appended; default bench/results/gpu.csv)"
    )
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes through the Triton interpreter on CPU"
    )
    ap.add_argument("--cpu-tokens", type=int, default=256, help="tokens of the CPU baseline (GPU: 8x512)")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if smoke != SMOKE:  # the device and the interpreter were chosen at import, from sys.argv
        ap.error("--cpu-smoke must be on the command line (it is read when the module is imported)")
    sh = GPU_SHAPES if CUDA else TINY_SHAPES
    if args.repeat is not None:
        sh = Shapes(**{**sh.__dict__, "repeat": args.repeat})
    csv_path = args.csv or RESULTS / ("gpu_smoke.csv" if smoke else "gpu.csv")
    RUN = Run(csv_path)
    budget = Budget(args.budget_s)
    old_term = signal.signal(signal.SIGTERM, _on_term)
    mode = (
        "gpu"
        if CUDA
        else ("cpu smoke (Triton interpreter, tiny shapes)" if smoke else "cpu (checks + baseline)")
    )
    log(f"device: {torch.cuda.get_device_name() if CUDA else 'cpu'}; mode: {mode}; budget {args.budget_s:g} s; "
        f"csv {csv_path}; torch {torch.__version__}")  # fmt: skip
    state: dict[str, float] = {}
    try:
        # 1. checks
        dtypes = (torch.bfloat16, torch.float16) if CUDA else (torch.float32, torch.float16)
        if not CUDA:
            record(Result("check", "bf16 checks", "bfloat16", status="skipped",
                          note="the interpreter miscomputes bf16 tl.dot; fp32/fp16 checked instead"))  # fmt: skip
        checks = ((40, "bottleneck fwd+bwd+|h|", check_bottleneck), (40, "q,k,v group fwd+bwd+|h|", check_group),
                  (20, "bank scoring", check_bank_scoring))  # fmt: skip
        for k, dt in enumerate(dtypes):
            for guess, name, fn in checks:
                budget.item(
                    "check", guess, "check", name, lambda fn=fn, dt=dt, k=k: fn(sh, dt, k), dtype=dname(dt)
                )
        budget.item("check", 20, "check", "block_stats", lambda: check_scoring(sh, 7), dtype="float32")
        # 2. ceilings, 3a. scoring
        if CUDA or smoke:
            budget.item("ceiling", 10, "ceiling", "copy bandwidth", lambda: ceilings(sh, state))
            budget.item("ceiling", 10, "ceiling", "matmul", lambda: matmul_rate(sh))
            budget.item("scoring", 20, "scoring", "block_stats", lambda: time_scoring(sh, state))
        else:
            for sec, name in (("ceiling", "copy bandwidth"), ("ceiling", "bf16 matmul 8192^3"),
                              ("scoring", "triton block_stats, 32-layer bank")):  # fmt: skip
                record(
                    Result(sec, name, status="skipped", note="no CUDA (--cpu-smoke runs it at tiny shapes)")
                )
        # 3b, 3c. the Llama layer
        if CUDA or smoke:
            holder: list[Layer] = []
            built = budget.item("layer", 20, "layer", "base + inputs", lambda: holder.append(build_layer(sh)))
            if not CUDA:
                record(Result("memory", "peak memory", status="skipped", note="CUDA only (torch.cuda.max_memory_allocated)"))  # fmt: skip
            for mixed in (False, True):
                for frac in sh.fracs:
                    variant, pruned = "mixed" if mixed else "lora", f"{int(frac * 100)}%"
                    if not built:
                        record(Result("layer", f"{variant} cases", pruned=pruned, status="skipped",
                                      note="no layer: its base + inputs item did not complete (row above)"))  # fmt: skip
                        continue
                    budget.item("layer case", 30, "layer", f"{variant} cases", pruned=pruned,
                                fn=lambda m=mixed, f=frac: layer_case(holder[0], m, f))  # fmt: skip
            holder.clear()
            png = csv_path.with_name(csv_path.stem + "_layer.png")
            title = (
                f"{torch.cuda.get_device_name()}: one Llama-7B layer, {sh.tokens_label} tokens"
                if CUDA
                else "CPU smoke: Triton interpreter, tiny shapes (not a measurement)"
            )
            budget.item("figure", 10, "figure", "layer time vs pruned", lambda: figure(RUN.rows, png, title))
        else:
            for what in ("triton", "peft LoRA", "reference"):
                record(Result("layer", f"{what} over NF4 base, 8x512", status="skipped", note="no CUDA"))
            budget.item(
                "baseline",
                120,
                "layer",
                "CPU baseline",
                lambda: cpu_baseline(args.repeat or 20, args.cpu_tokens),
            )
    except Interrupted:
        record(
            Result("run", "interrupted", status="error", note=f"SIGTERM after {time.monotonic() - T0:.0f} s")
        )
        log(f"interrupted: {len(RUN.rows)} rows in {RUN.csv_path}")
        return 3
    finally:
        os.environ.pop("PRUNEPEFT_BACKEND", None)
        signal.signal(signal.SIGTERM, old_term)
    failed = [r for r in RUN.rows if r["status"] in ("FAIL", "error")]
    log(f"wrote {len(RUN.rows)} rows to {RUN.csv_path}; {len(failed)} failed or raised; "
        f"{budget.skipped} skipped for the time budget")  # fmt: skip
    for r in failed:
        log(f"  {r['status']}: {r['section']} {r['name']} {r['dtype']} {r['pruned']}: {r['note']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
