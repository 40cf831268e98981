"""Kernel microbenchmarks (pytest-benchmark): every bank op x every backend on this machine.

The bank is the full supernet of all-MiniLM-L6-v2 (``common.minilm_supernet_config``: LoRA r=32 on
q, k, v and the three ``dense`` linears, serial adapters of width 64 after attention and the FFN,
block size 4; 1.9 M parameters, 480 blocks), built from the SearchSpace of the real model, with
random parameters and gradients. Ops, per backend (reference = pure torch, the oracle; native = the
C++ extension; triton only on CUDA, skipped otherwise):

- ``plan``: lay out the bank (every candidate at full width).
- ``block_stats``: every criterion's statistics in one pass, without / with the AdaLoRA
  sensitivity-uncertainty update; GB/s counts params + grads read (8 B/element) plus sens/unc
  read + written (16 B/element) with AdaLoRA.
- ``compact``: drop a random half of the blocks: the plan (``backend.compact``) plus the gather of
  the flat parameter, its gradient and AdamW's two moments (4 tensors); GB/s counts, per kept
  element and tensor, 4 B read + 4 B written + 8 B of index read.
- ``select_prune``: greedy budget-constrained selection over all blocks, down to a third of the
  parameters; items/s.
- ``bottleneck`` (the reference op, the CPU path the sites run): forward + backward of one site slab
  at 16 x 128 tokens, with 0 / 50 / 90 % of its blocks masked (the reference computes masked units
  and multiplies by 0, so its time should not drop; the Triton kernels skip them). GFLOP/s counts
  the dense work: forward ``2 T W (in + out)``, backward twice that.

``extra_info`` of each benchmark holds the derived rate and ``ratio_to_reference`` (reference time /
this backend's time: > 1 is faster). Not part of the default test run (``testpaths = tests``)::

    python -m pytest bench/bench_kernels.py --benchmark-only [--benchmark-json bench/results/kernels.json]

Each run also appends one row per benchmark to ``bench/results/kernels.csv`` (machine, versions, commit,
torch threads). ``BENCH_THREADS=1`` sets torch's thread count first: on a shared, oversubscribed machine
two spinning OpenMP threads make the torch timings (reference ops, bottleneck) swing by 10x.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_rows, load_minilm, median_time, minilm_supernet_config, versions  # noqa: E402

from prunepeft.backends import BACKENDS, available_backends, get_backend  # noqa: E402
from prunepeft.ops import bottleneck_reference  # noqa: E402

TOKENS = (16, 128)
MASKED = (0.0, 0.5, 0.9)

_REF_MEDIANS: dict[str, float] = {}
_ROWS: list[dict[str, object]] = []


def _backend_or_skip(name: str):
    if name not in available_backends():
        reason = {
            "triton": "Triton backend needs CUDA (the interpreter is not a benchmark)",
            "native": "the C++ extension prunepeft._C is not built (pip install -e .)",
        }.get(name, f"{name} is not available")
        pytest.skip(reason)
    return get_backend(name)


if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


@pytest.fixture(scope="module")
def bank():
    """The MiniLM supernet bank, random params and grads (CPU, or CUDA when Triton is benchmarked)."""
    from prunepeft import attach

    model, _ = load_minilm()
    handle = attach(model, minilm_supernet_config())
    b = handle.bank
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        b.flat.copy_(torch.randn(b.flat.shape, generator=g) * 0.02)
    b.flat.grad = torch.randn(b.flat.shape, generator=g) * 1e-3
    return b


@pytest.fixture(scope="module", autouse=True)
def _write_csv():
    yield
    if _ROWS:
        print("\nwrote", append_rows("kernels", _ROWS))


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "triton" else "cpu")


def _median(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return None
    return stats.stats.median


def _record(benchmark, op: str, backend: str, variant: str, ref_fn, *, nbytes=None, flops=None, items=None):
    """Put the derived rate and the ratio to the reference into extra_info and the CSV rows."""
    t = _median(benchmark)
    if t is None:
        return
    key = f"{op}/{variant}"
    if backend == "reference":
        _REF_MEDIANS[key] = t
    elif key not in _REF_MEDIANS:  # reference not run in this session (-k): time it here
        _REF_MEDIANS[key] = median_time(ref_fn, repeat=5, warmup=1)
    info = {"op": op, "backend": backend, "variant": variant, "seconds": t,
            "gb_per_s": "" if nbytes is None else nbytes / t / 1e9,
            "gflop_per_s": "" if flops is None else flops / t / 1e9,
            "items_per_s": "" if items is None else items / t}  # fmt: skip
    info["ratio_to_reference"] = _REF_MEDIANS[key] / t
    benchmark.extra_info.update(info)
    _ROWS.append({**info, "versions": versions()})


def _plan_inputs(bank):
    return bank._plan_inputs(bank.widths())


# ---------------------------------------------------------------------------- plan
@pytest.mark.parametrize("backend", BACKENDS)
def test_plan(benchmark, bank, backend):
    be = _backend_or_skip(backend)
    args = _plan_inputs(bank)
    benchmark(be.plan, *args)
    ref = get_backend("reference")
    _record(benchmark, "plan", backend, f"{bank.num_candidates} candidates", lambda: ref.plan(*args),
            items=bank.num_candidates)  # fmt: skip


# ---------------------------------------------------------------------------- block_stats
@pytest.mark.parametrize("adalora", [False, True], ids=["plain", "adalora"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_stats(benchmark, bank, backend, adalora):
    be = _backend_or_skip(backend)
    dev = _device(backend)
    param, grad = bank.flat.detach().to(dev), bank.flat.grad.to(dev)
    seg, owners = bank.plan["seg"], bank.num_blocks + bank.num_candidates
    n = param.numel()

    def call(be=be, param=param, grad=grad):
        return be.block_stats(
            param, grad, seg, owners, 1e-3, *state[param.device.type], 0.85, 0.85, None, -1.0
        )

    # AdaLoRA's sens/unc are updated in place every call (allocated once, outside the timed call)
    state = {t.device.type: (torch.zeros_like(t), torch.zeros_like(t)) if adalora else (None, None)
             for t in (param, bank.flat.detach())}  # fmt: skip

    benchmark(call)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ref = get_backend("reference")
    cpu_p, cpu_g = bank.flat.detach(), bank.flat.grad
    _record(benchmark, "block_stats", backend, "adalora" if adalora else "plain",
            lambda: call(ref, cpu_p, cpu_g), nbytes=n * (8 + (16 if adalora else 0)))  # fmt: skip


# ---------------------------------------------------------------------------- compact
@pytest.mark.parametrize("backend", BACKENDS)
def test_compact(benchmark, bank, backend):
    be = _backend_or_skip(backend)
    dev = _device(backend)
    keep = torch.rand(bank.num_blocks, generator=torch.Generator().manual_seed(1)) < 0.5
    args = _plan_inputs(bank)
    tensors = [bank.flat.detach().to(dev), bank.flat.grad.to(dev)]
    tensors += [torch.randn_like(tensors[0]), torch.rand_like(tensors[0])]  # AdamW exp_avg, exp_avg_sq

    def call(be=be, tensors=tensors):
        _, gather, _ = be.compact(*args, keep)
        g = gather.to(tensors[0].device)
        return [t[g] for t in tensors]

    out = benchmark(call)
    kept = out[0].numel()
    ref = get_backend("reference")
    cpu = [t.cpu() for t in tensors]
    _record(benchmark, "compact", backend, f"keep {int(keep.sum())}/{bank.num_blocks} blocks + 4 tensors",
            lambda: call(ref, cpu), nbytes=4 * kept * (4 + 4 + 8))  # fmt: skip


# ---------------------------------------------------------------------------- select_prune
@pytest.mark.parametrize("backend", BACKENDS)
def test_select_prune(benchmark, bank, backend):
    be = _backend_or_skip(backend)
    nb = bank.num_blocks
    cand_of = bank.plan["block"][:, 0]
    scores = torch.rand(nb, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    costs = torch.tensor([bank.block_cost(int(c)) for c in cand_of], dtype=torch.int64)
    extra = torch.tensor([bank.candidate_extra(c) for c in range(bank.num_candidates)], dtype=torch.int64)
    eligible = torch.ones(nb, dtype=torch.bool)
    current = bank.num_params()
    args = (scores, costs, cand_of.clone(), extra, eligible, current, current // 3)
    benchmark(be.select_prune, *args)
    ref = get_backend("reference")
    _record(benchmark, "select_prune", backend, f"{nb} blocks -> 1/3 of the params",
            lambda: ref.select_prune(*args), items=nb)  # fmt: skip


# ---------------------------------------------------------------------------- bottleneck
def _slab_inputs(bank, site_suffix: str, tap: str, masked: float, device: torch.device):
    """A detached copy of one site slab (leaf tensors that require grad) with ``masked`` of its blocks off."""
    key = next(k for k in bank._slabs if k[0].endswith(site_suffix) and k[1] == tap)
    d, ut, pieces, scale = bank.slab(*key)
    d = d.detach().clone().to(device).requires_grad_(True)
    ut = ut.detach().clone().to(device).requires_grad_(True)
    from prunepeft.ops import Piece

    pieces = [
        Piece(p.lo, p.hi, p.activation,
              None if p.bd is None else p.bd.detach().clone().to(device).requires_grad_(True),
              None if p.bu is None else p.bu.detach().clone().to(device).requires_grad_(True))
        for p in pieces
    ]  # fmt: skip
    scale = scale.detach().clone().to(device)
    bs = bank.specs[0].block_size
    n_blocks = d.shape[0] // bs
    off = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(3))[
        : int(round(masked * n_blocks))
    ]
    for b in off.tolist():
        scale[b * bs : (b + 1) * bs] = 0
    x = torch.randn(*TOKENS, d.shape[1], generator=torch.Generator().manual_seed(4)).to(device)
    x.requires_grad_(True)
    return x, d, ut, pieces, scale


SLABS = {
    "lora_ffn_down": ("layer.0.output.dense", "input"),  # LoRA r=32, 1536 -> 384
    "adapter_ffn": ("layer.0.output.dense", "output"),  # serial adapter w=64 (relu, biases), 384 -> 384
}


@pytest.mark.parametrize("masked", MASKED, ids=[f"masked{int(m * 100)}" for m in MASKED])
@pytest.mark.parametrize("slab", list(SLABS))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bottleneck_fwd_bwd(benchmark, bank, backend, slab, masked):
    _backend_or_skip(backend)
    dev = _device(backend)
    x, d, ut, pieces, scale = _slab_inputs(bank, *SLABS[slab], masked, dev)
    if backend == "triton":
        from prunepeft.backends import triton as tb

        op = tb.bottleneck
    else:
        op = bottleneck_reference

    def call(op=op, x=x, d=d, ut=ut, pieces=pieces, scale=scale):
        out = op(x, d, ut, pieces, scale)
        out.sum().backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    benchmark(call)
    T = TOKENS[0] * TOKENS[1]
    W, K = d.shape
    flops = 3 * 2 * T * W * (K + ut.shape[1])
    cx, cd, cut, cp, cs = _slab_inputs(bank, *SLABS[slab], masked, torch.device("cpu"))
    _record(benchmark, "bottleneck_fwd_bwd", backend, f"{slab} W={W} {K}->{ut.shape[1]} masked {masked:.0%}",
            lambda: call(bottleneck_reference, cx, cd, cut, cp, cs), flops=flops)  # fmt: skip
