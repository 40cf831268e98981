"""Training-step time of the quality protocol's found configurations against peft LoRA (issue 8's cost
goal, issue 12): what a found configuration's final training costs per step, next to the uniform LoRA
it should replace.

    python bench/bench_found_step.py [--task SST-2] [--seed 0] [--repeat 7] [--batches 8]

Configurations, each on a fresh all-MiniLM-L6-v2 with the protocol's task head:

- every (variant, search method) of ``results/quality.csv`` that has a run on ``--task`` and ``--seed``
  at its selected learning rate: its ``kept`` configuration cut out of the default space with blocks of
  one unit (so every width is exact) and compacted, as a final training trains it; once with the
  fused residual (the library's path: each site's bottleneck added inside its up-projection GEMM) and
  once without (``_unfused``, the ablation of ``bench_step.py``);
- prunepeft's uniform LoRA r8 on q,v and LoRA r1 on every linear (the protocol's ``lora_qv`` and
  ``lora_all``);
- peft LoRA r8 on query, value and peft LoRA r1 on every linear (alpha = 2 r).

Step: forward, backward, AdamW step on the task's first ``--batches`` training batches (batch 16, the
protocol's max length; dynamic padding), 1 thread. The configurations take turns, one pass over the
batches each per round, ``--repeat`` rounds; the first round is warm-up; medians of the rest. Rows
(ms per step and the ratio to peft LoRA q,v in this run) go to ``results/found_step.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_quality as B  # noqa: E402
import tasks as T  # noqa: E402
import torch  # noqa: E402
from bench_step import _unfused_residual  # noqa: E402
from common import RESULTS, append_rows  # noqa: E402
from quality_probe import configuration  # noqa: E402

ALL_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def found_configurations(task: str, seed: int) -> list[tuple[str, str, str]]:
    """(variant, method, kept) of every search run on ``task`` / ``seed`` at its selected learning rate."""
    rows = list(csv.DictReader(open(RESULTS / "quality.csv")))
    out = []
    for v in sorted({r["variant"] for r in rows} - set(B.SUPERSEDED)):
        fin = B.final_rows(rows, dataclasses.replace(B.QualityConfig(), variant=v))
        for m in B.SEARCH:
            r = fin.get((task, B.SELECT_BUDGET, m), {}).get(seed)
            if r and r["kept"]:
                out.append((v, m, r["kept"]))
    return out


def main(argv=None) -> None:
    from peft import LoraConfig, get_peft_model

    from prunepeft import attach
    from prunepeft.api import prepare_data
    from prunepeft.config import default_search_space

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="SST-2", choices=T.TASKS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--batches", type=int, default=8)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = B.QualityConfig()
    task = T.load(a.task, cfg.pool, cfg.eval_cap)
    block1 = dataclasses.replace(default_search_space(), block_size=1)

    def ours(space=None, kept=None):
        model, _ = B.model_for(task, a.seed, cfg)
        handle = configuration(model, kept, a.seed, block1) if kept else attach(model, space)
        return model, list(handle.parameters()) + handle.head_parameters()

    def peft(rank: int, targets: list[str]):
        model, _ = B.model_for(task, a.seed, cfg)
        pm = get_peft_model(
            model, LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=targets)
        )
        return pm, [p for p in pm.parameters() if p.requires_grad]

    plain, tok = B.model_for(task, a.seed, cfg)
    budget = B.budget_params(plain, "r8")
    confs: dict[str, tuple] = {}  # name -> (model, params, unfused, (variant, method, kept))
    for v, m, kept in found_configurations(a.task, a.seed):
        built = ours(kept=kept)
        for unfused in (False, True):
            confs[f"{v}:{m}" + ("_unfused" if unfused else "")] = (*built, unfused, (v, m, kept))
    for name in ("lora_qv", "lora_all"):
        space = B.uniform_space(name, plain, budget)[0]
        confs[f"prunepeft_{name}"] = (*ours(space), False, ("uniform", name, ""))
    confs["peft_lora_qv"] = (*peft(8, ["query", "value"]), False, ("peft", "lora_qv", ""))
    confs["peft_lora_all_r1"] = (*peft(1, ALL_LINEARS), False, ("peft", "lora_all_r1", ""))

    sc = B.search_config(cfg, lr=1e-3, seed=a.seed, budget=None, steps=1)
    data = prepare_data(confs["peft_lora_qv"][0], task, None, sc, tok)
    batches = []
    for b in data.train_epoch(0):
        batches.append(b)
        if len(batches) == a.batches:
            break
    opts = {k: torch.optim.AdamW(c[1], lr=1e-3) for k, c in confs.items()}
    times: dict[str, list[float]] = {k: [] for k in confs}
    for _ in range(a.repeat):
        for k, (model, _, unfused, _) in confs.items():
            model.train()
            t0 = time.perf_counter()
            with _unfused_residual() if unfused else contextlib.nullcontext():
                for b in batches:
                    model(**b).loss.backward()
                    opts[k].step()
                    opts[k].zero_grad(set_to_none=True)
            times[k].append((time.perf_counter() - t0) / len(batches))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    peft_qv = med["peft_lora_qv"]
    rows = []
    for k, (_, params, unfused, (v, m, kept)) in confs.items():
        sites = len(B._kept_sites(kept)) if kept else ""
        rows.append(dict(task=a.task, seed=a.seed, config=k, variant=v, method=m, fused=not unfused, sites=sites,
                         params=sum(p.numel() for p in params), ms=round(1e3 * med[k], 1),
                         ratio_to_peft_lora_qv=round(med[k] / peft_qv, 3), batches=a.batches, repeat=a.repeat,
                         threads=1))  # fmt: skip
        print(
            f"{k:32s} {rows[-1]['params']:>9,} params {rows[-1]['ms']:7.1f} ms  x{rows[-1]['ratio_to_peft_lora_qv']:.3f}"
        )
    print("wrote", append_rows("found_step", rows))


if __name__ == "__main__":
    main()
