"""Figure 1 of the foundation issue: one-pass block scoring, C++ vs the pure-torch reference.

On the full supernet bank of all-MiniLM-L6-v2 (see ``common.minilm_supernet_config``) with random
parameters and gradients, times ``block_stats`` (every criterion's statistics, plus the AdaLoRA
sensitivity/uncertainty update) in the native C++ backend and in the reference backend, and a plain
memory copy of the same bytes in the same run. GB/s counts the bytes the pass must touch:
params + grads read (8 B/element), plus sens/unc read+written (16 B/element) when AdaLoRA is on.

    python bench/bench_scoring.py [--repeat 9]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_rows, load_minilm, median_time, minilm_supernet_config  # noqa: E402

from prunepeft import attach, get_backend  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    model, _ = load_minilm()
    handle = attach(model, minilm_supernet_config())
    bank = handle.bank
    n = bank.num_params(effective=False)
    g = torch.Generator().manual_seed(0)
    param = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g)
    seg = bank.plan["seg"]
    owners = bank.num_blocks + bank.num_candidates
    print(f"bank: {n:,} parameters, {bank.num_blocks:,} blocks, {seg.shape[0]:,} segments")

    dst = torch.empty(2 * n)
    src = torch.cat([param, grad])
    t_copy = median_time(lambda: dst.copy_(src), args.repeat)
    copy_gbs = 2 * src.numel() * 4 / t_copy  # read + write
    rows = [{"op": "memcpy", "backend": "torch", "adalora": False, "params": n, "seconds": t_copy,
             "gb_per_s": copy_gbs / 1e9, "ratio_to_reference": ""}]  # fmt: skip
    print(
        f"memcpy {src.numel() * 4 / 1e6:.1f} MB: {t_copy * 1e3:.2f} ms, {copy_gbs / 1e9:.2f} GB/s (read+write)"
    )
    for adalora in (False, True):
        times = {}
        for name in ("reference", "native"):
            be = get_backend(name)
            sens = torch.zeros(n) if adalora else None
            unc = torch.zeros(n) if adalora else None

            def run(be=be, sens=sens, unc=unc):
                be.block_stats(param, grad, seg, owners, 1e-3, sens, unc, 0.85, 0.85, None, -1.0)

            times[name] = median_time(run, args.repeat)
        nbytes = n * (8 + (16 if adalora else 0))
        for name, t in times.items():
            gbs = nbytes / t / 1e9
            ratio = times["reference"] / t
            rows.append({"op": "block_stats", "backend": name, "adalora": adalora, "params": n, "seconds": t,
                         "gb_per_s": gbs, "ratio_to_reference": ratio})  # fmt: skip
            print(f"block_stats adalora={adalora!s:5} {name:9}: {t * 1e3:8.2f} ms  {gbs:6.2f} GB/s  "
                  f"{gbs / (copy_gbs / 1e9):.2f}x memcpy  speed-up vs reference {ratio:.1f}x")  # fmt: skip
    print("wrote", append_rows("scoring", rows))


if __name__ == "__main__":
    main()
