"""Are the criteria's scores stable, and comparable across depths and kinds? (quality issue, "find out
whether the scores are comparable ... before anything else").

all-MiniLM-L6-v2 with a rich supernet (LoRA r=8 on q,k,v,o,up,down; serial adapters of width 8 after
attention and FFN; block 4) trains ``windows`` x ``window`` steps on a task's training pool; after
every window it takes every criterion's per-candidate value. It reports (a) the Spearman rank
correlation of each criterion between consecutive windows (is a round long enough for the
statistics to settle?), and (b) each criterion's mean value per layer and per kind, relative to the
overall mean (does a criterion prefer the top layers, or one kind, whatever the task?).

    python bench/study_scores.py [--task SST-2] [--window 8] [--windows 6] [--seed 0]

Writes ``bench/results/score_study_<task>.md``. Reads the training pool only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks as T  # noqa: E402
from bench_quality import _load_model  # noqa: E402
from common import RESULTS, stamp  # noqa: E402

from prunepeft import SpaceConfig, attach  # noqa: E402
from prunepeft.api import BatchStream, SearchConfig, prepare_data  # noqa: E402
from prunepeft.criteria import CRITERIA, criterion_values  # noqa: E402
from prunepeft.finetune import loop_options  # noqa: E402
from prunepeft.train import TrainState, train_steps  # noqa: E402

SPACE = SpaceConfig(lora_targets=("q", "k", "v", "o", "up", "down"), lora_rank=8,
                    serial_adapter_targets=("attn", "ffn"), adapter_width=8, block_size=4)  # fmt: skip


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="SST-2")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = T.load(args.task)
    model, tok = _load_model(task.num_labels if task.kind == "classification" else 1, args.seed)
    h = attach(model, SPACE)
    cfg = SearchConfig(max_length=64, val_examples=400, lr=args.lr, seed=args.seed)
    data = prepare_data(model, task, None, cfg, tok)
    opt = torch.optim.AdamW(list(h.parameters()), lr=args.lr)
    bank = h.bank
    bank.collect_activations = True
    stream, state = BatchStream(data.train_epoch), TrainState()
    steps = args.window * args.windows
    snaps = []
    for _ in range(args.windows):
        bank.reset_stats()
        bank.reset_activations()
        train_steps(model, lambda: list(h.parameters()), opt, stream, args.window, state, lr=args.lr,
                    total_steps=steps, warmup_steps=0, on_grads=lambda: bank.accumulate_stats(1e-3, adalora=(0.85, 0.85)),
                    **loop_options(cfg))  # fmt: skip
        snaps.append({c: v[1].clone() for c, v in criterion_values(bank).items()})
    specs = bank.specs
    lines = [f"# Criteria: stability and depth / kind bias ({args.task})", "",
             f"`python bench/study_scores.py --task {args.task} --window {args.window} --windows {args.windows} "
             f"--seed {args.seed}` ({stamp()['machine']}, commit {stamp()['commit']}). Supernet: {h.space.describe()}; "
             f"lr {args.lr}; statistics per window of {args.window} steps.", "",
             "## (a) Spearman correlation of candidate values between consecutive windows", "",
             "| criterion | " + " | ".join(f"w{i}→w{i + 1}" for i in range(args.windows - 1)) + " |",
             "|---|" + "---:|" * (args.windows - 1)]  # fmt: skip
    for c in CRITERIA:
        cells = []
        for i in range(args.windows - 1):
            a, b = snaps[i][c], snaps[i + 1][c]
            ok = torch.isfinite(a) & torch.isfinite(b)
            same = bool((a[ok] == a[ok][0]).all()) if ok.any() else True
            cells.append("const" if same else f"{spearman(a[ok], b[ok]):+.2f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    layers = sorted({s.layer for s in specs})
    kinds = sorted({f"{s.kind}:{s.role}" for s in specs})
    last = snaps[-1]
    lines += ["", "## (b) Mean value per layer and per kind / site, relative to the overall mean (last window)", "",
              "A criterion comparable across depths would show no trend over layers for every task; values "
              "above 1 mean the criterion keeps that layer / kind preferentially.", "",
              "| criterion | " + " | ".join(f"L{layer}" for layer in layers) + " | " + " | ".join(kinds) + " |",
              "|---|" + "---:|" * (len(layers) + len(kinds))]  # fmt: skip
    for c, crit in CRITERIA.items():
        v = last[c]
        ok = torch.isfinite(v)
        if not ok.any():
            continue
        mean = float(v[ok].mean()) or 1.0
        per_layer = [statistics.fmean(float(v[i]) for i, s in enumerate(specs) if s.layer == layer and ok[i]) / mean
                     for layer in layers]  # fmt: skip
        per_kind = [statistics.fmean(float(v[i]) for i, s in enumerate(specs) if f"{s.kind}:{s.role}" == k and ok[i]) / mean
                    for k in kinds]  # fmt: skip
        flip = " (prune-high: low = keep)" if crit.prune_high else ""
        lines.append(f"| {c}{flip} | " + " | ".join(f"{x:.2f}" for x in per_layer + per_kind) + " |")
    path = RESULTS / f"score_study_{args.task}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
