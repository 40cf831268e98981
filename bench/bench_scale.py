"""Bank bookkeeping at the 7B-supernet scale: ``plan``, ``compact`` and ``select_prune`` per round,
the native C++ backend vs the pure-torch reference.

The candidate set is Llama-7B-shaped (``llama_spec``): 32 layers, LoRA rank 16 on q, k, v, o
(4096 -> 4096), gate, up (4096 -> 11008) and down (11008 -> 4096), serial adapters of width 16 (with
biases) after attention and after the FFN; q/k/v and gate/up share their input (layout groups).
At block size 4 that is 288 candidates, 1,152 blocks, 48.4M parameters; ``--block-size 1`` gives
4,608 blocks (the same parameters), the finest selection a round can face.

One pruning round does: ``select_prune`` over every block (random scores; costs = the block's
parameters; a candidate's bias ``bu`` is freed with its last block; target = 90% of the current
size), ``compact`` with the selection's keep mask (returns the new plan and the int64 gather over
every kept element), and ``plan`` of the new widths. The goal (issue 12) is < 10 ms per round for
``select_prune`` and ``plan``; ``compact`` streams the whole bank and is reported as GB/s of gather
written.

    python bench/bench_scale.py [--repeat 21] [--block-size 4 1] [--quick] [--no-reference]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_rows, median_time, versions  # noqa: E402

from prunepeft import get_backend  # noqa: E402
from prunepeft.layout import Block  # noqa: E402

HIDDEN, INTER = 4096, 11008
# site -> (in_dim, out_dim, layout group within the layer, has_bias)
LLAMA_SITES = {
    "q": (HIDDEN, HIDDEN, "x", False), "k": (HIDDEN, HIDDEN, "x", False), "v": (HIDDEN, HIDDEN, "x", False),
    "o": (HIDDEN, HIDDEN, "o", False),
    "gate": (HIDDEN, INTER, "h", False), "up": (HIDDEN, INTER, "h", False),
    "down": (INTER, HIDDEN, "down", False),
    "adapter_attn": (HIDDEN, HIDDEN, "adapter_attn", True), "adapter_ffn": (HIDDEN, HIDDEN, "adapter_ffn", True),
}  # fmt: skip


def interleaved_medians(fns: dict[str, Callable[[], object]], repeat: int, warmup: int) -> dict[str, float]:
    """Median wall time of each fn over ``repeat`` rounds in which the fns run one after another
    (round-robin), so that load changes on a shared machine hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass
class ScaleConfig:
    """The candidate set: ``n_layers`` Llama-7B layers, every candidate ``width`` wide."""

    n_layers: int = 32
    width: int = 16  # LoRA rank = adapter width
    block_size: int = 4


def llama_spec(cfg: ScaleConfig) -> tuple[torch.Tensor, ...]:
    """(in_dim, out_dim, width, block_size, group, has_bias) of the Llama-7B-shaped candidate set."""
    rows = []
    for layer in range(cfg.n_layers):
        names = list(dict.fromkeys(g for *_, g, _ in LLAMA_SITES.values()))
        for i, o, g, bias in LLAMA_SITES.values():
            rows.append((i, o, cfg.width, cfg.block_size, layer * len(names) + names.index(g), bias))
    cols = list(zip(*rows, strict=True))
    return (*(torch.tensor(c, dtype=torch.int64) for c in cols[:5]), torch.tensor(cols[5], dtype=torch.bool))


@dataclass
class RoundInputs:
    """The arguments of one pruning round's select_prune and compact."""

    scores: torch.Tensor
    costs: torch.Tensor
    group: torch.Tensor
    group_extra: torch.Tensor
    eligible: torch.Tensor
    current: int
    target: int

    def args(self) -> tuple:
        """The positional arguments of ``select_prune`` (no copies, unlike ``dataclasses.astuple``)."""
        return tuple(getattr(self, f.name) for f in fields(self))


def round_inputs(spec: tuple[torch.Tensor, ...], plan: dict, seed: int = 0) -> RoundInputs:
    """select_prune over blocks, as ``prune_to_budget(granularity='block')`` builds it."""
    in_dim, out_dim, _, block_size, _, has_bias = spec
    cand_of = plan["block"][:, Block.CAND]
    costs = block_size[cand_of] * (in_dim[cand_of] + out_dim[cand_of] + has_bias[cand_of].long())
    extra = torch.where(has_bias, out_dim, torch.zeros_like(out_dim))
    g = torch.Generator().manual_seed(seed)
    current = int(plan["total"])
    return RoundInputs(torch.rand(cand_of.numel(), generator=g, dtype=torch.float64), costs, cand_of.clone(),
                       extra, torch.ones(cand_of.numel(), dtype=torch.bool), current, current * 9 // 10)  # fmt: skip


@dataclass
class ScaleResult:
    op: str
    backend: str
    candidates: int
    blocks: int
    params: int
    ms: float
    note: str = ""


def run(cfg: ScaleConfig, repeat: int, backends: tuple[str, ...]) -> list[ScaleResult]:
    spec = llama_spec(cfg)
    ref = get_backend("reference")
    plan0 = ref.plan(*spec)
    n_cand, n_blocks, total = spec[0].numel(), plan0["block"].shape[0], int(plan0["total"])
    print(f"candidate set: {cfg.n_layers} layers, width {cfg.width}, block size {cfg.block_size}: "
          f"{n_cand:,} candidates, {n_blocks:,} blocks, {total / 1e6:.1f}M parameters")  # fmt: skip
    ri = round_inputs(spec, plan0)
    sel_args = ri.args()
    picked = ref.select_prune(*sel_args)
    keep = torch.ones(n_blocks, dtype=torch.bool)
    keep[picked] = False
    new_width = spec[2].clone()
    for b in picked.tolist():
        new_width[int(plan0["block"][b, Block.CAND])] -= int(plan0["block"][b, Block.BLOCK_SIZE])
    new_spec = (*spec[:2], new_width, *spec[3:])

    # Run each op once per backend: the backends must agree on what is timed.
    outputs = {}
    for name in backends:
        be = get_backend(name)
        outputs[name] = (be.select_prune(*sel_args), be.compact(*spec, keep), be.plan(*new_spec))
    if len(outputs) == 2:
        (s1, (p1, g1, b1), q1), (s2, (p2, g2, b2), q2) = outputs.values()
        assert torch.equal(s1, s2) and torch.equal(g1, g2) and torch.equal(b1, b2), "backends disagree"
        assert all(torch.equal(p1[k], p2[k]) and torch.equal(q1[k], q2[k]) for k in ("cand", "block", "seg"))
    for sel, (cp, _, _), q in outputs.values():
        assert torch.equal(sel, picked) and all(torch.equal(cp[k], q[k]) for k in ("cand", "block", "seg"))
    kept = int(q["total"])
    del outputs  # ~350 MB of gather per backend

    cheap: dict[str, Callable[[], object]] = {}  # "op backend" -> fn, timed interleaved
    for name in backends:
        be = get_backend(name)
        cheap[f"select_prune {name}"] = lambda be=be: be.select_prune(*sel_args)
        cheap[f"plan {name}"] = lambda be=be: be.plan(*new_spec)
    times = interleaved_medians(cheap, repeat, warmup=2)
    for name in backends:  # compact: seconds per call for the reference, timed on its own
        be = get_backend(name)
        times[f"compact {name}"] = median_time(
            lambda be=be: be.compact(*spec, keep),
            repeat if name == "native" else max(1, repeat // 3),
            warmup=1,
        )

    results: list[ScaleResult] = []
    notes = {"select_prune": f"{len(picked)} of {n_blocks} picked", "plan": "the widths after the round"}
    for key, t in times.items():
        op, name = key.split()
        note = notes.get(op, f"gather of {kept / 1e6:.1f}M int64: {kept * 8 / t / 1e9:.2f} GB/s written")
        results.append(ScaleResult(op, name, n_cand, n_blocks, total, t * 1e3, note))
        print(f"{op:12} {name:9}: {t * 1e3:9.3f} ms  {note}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--repeat", type=int, default=21, help="timed runs per op (median); compact reference: /3"
    )
    ap.add_argument("--block-size", type=int, nargs="+", default=[4, 1], help="one candidate set per value")
    ap.add_argument("--quick", action="store_true", help="3 runs, block size 4 only")
    ap.add_argument("--no-reference", action="store_true", help="time the native backend only")
    args = ap.parse_args()
    repeat, sizes = (5, [4]) if args.quick else (args.repeat, args.block_size)
    backends = ("native",) if args.no_reference else ("native", "reference")
    rows = []
    for bs in sizes:
        for r in run(ScaleConfig(block_size=bs), repeat, backends):
            rows.append(
                {
                    **asdict(r),
                    "repeat": repeat,
                    "loadavg": round(os.getloadavg()[0], 2),
                    "versions": versions(),
                }
            )
    print("wrote", append_rows("scale", rows))


if __name__ == "__main__":
    main()
