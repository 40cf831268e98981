"""One-off training runs behind the quality protocol's decisions (``bench_quality.py``), with its data,
model, batching and validation split. Prints one JSON line: validation and eval metric.

    python bench/quality_probe.py uniform STS-B --lr 1e-3 --head-bias zero   # the regression-head probe
    python bench/quality_probe.py uniform RTE --lr 1e-3 --steps 600          # is RTE learnable if longer?
    python bench/quality_probe.py config SST-2 --lr 3e-3 --kept "lora:o@0=8;lora:up@0=4;..."

``uniform``: LoRA r=8 on q,v (the protocol's ``lora_qv``). ``config``: a configuration as the
``kept`` column of ``quality.csv`` writes it, cut out of the default search space and re-initialised
as a search's final training does (``final_init="reinit"``), then trained like ``finetune``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_quality as B  # noqa: E402
import tasks as T  # noqa: E402


def configuration(model, kept: str, seed: int, space=None):
    """``space`` (default: the default search space) attached to ``model`` with every block outside
    ``kept`` pruned; a width that is not a multiple of the space's block size is rounded down."""
    from prunepeft import attach
    from prunepeft.config import default_search_space

    want = dict((k, int(w)) for k, w in (item.split("=") for item in kept.split(";")))
    handle = attach(model, space or default_search_space())
    bank, pruned = handle.bank, []
    for c, spec in enumerate(bank.specs):
        width = want.pop(f"{spec.kind}:{spec.role}@{spec.layer}", 0)
        pruned += list(bank.candidate_blocks(c))[width // spec.block_size :]
    if want:
        raise ValueError(f"not in the default search space: {sorted(want)}")
    handle.mask_blocks(pruned)
    handle.compact()
    bank.reset_parameters([c for c, w in enumerate(bank.widths()) if w], seed=seed + 1)
    return handle


def main(argv=None) -> None:
    import torch

    from prunepeft.api import finetune

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("uniform", "config"))
    ap.add_argument("task", choices=T.TASKS)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=B.QualityConfig.steps)
    ap.add_argument("--kept", help="config: kind:role@layer=width;...")
    ap.add_argument("--head-bias", choices=("mean", "zero"), default="mean", help="a regression head's start")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = B.QualityConfig()
    task = T.load(a.task, cfg.pool, cfg.eval_cap)
    model, tok = B.model_for(task, a.seed, cfg, head_mean=a.head_bias == "mean")
    budget = B.budget_params(model, "r8")
    sc = B.search_config(cfg, lr=a.lr, seed=a.seed, budget=budget, steps=a.steps)
    if a.what == "config":
        if not a.kept:
            ap.error("config needs --kept")
        run = dict(handle=configuration(model, a.kept, a.seed))
    else:
        run = dict(space=B.uniform_space("lora_qv", model, budget)[0])
    t0 = time.perf_counter()
    r = finetune(model, task, config=sc, tokenizer=tok, log=None, **run)
    pm = task.primary_metric
    print(json.dumps({**vars(a), "params": r["params"], "val": r["val_metrics"][pm], "eval": r["metrics"][pm],
                      "loss": r["loss"], "seconds": round(time.perf_counter() - t0, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
