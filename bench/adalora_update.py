"""How far AdaLoRA's update moves in the quality protocol's training, next to LoRA's (issue 8).

    python bench/adalora_update.py [--task SST-2] [--seed 0] [--lr 3e-3]

In the protocol (``bench_quality.py``, 200 final steps) peft's AdaLoRA scores far below uniform LoRA
at the same budget. This script checks that the cause is the method's start, not a broken setup: it
trains peft AdaLoRA exactly as the protocol does (``bench_quality._adalora``: ``init_r`` 1.5x
``target_r``, its budget schedule, ``update_and_allocate`` after every optimizer step, the
orthogonality term in the loss) and peft LoRA r8 on query, value (alpha 16) with the same loop, data,
seed and learning rate, then reports the mean over the adapted layers of ``||dW||_F / ||W||_F``, where
``dW`` is the update the adapter adds to the frozen weight ``W``:

- LoRA: ``B A * alpha / r``; B starts at zero, A at Kaiming, so B moves from the first step;
- AdaLoRA: ``B (A * E) * alpha / (ranknum + 1e-5)`` (peft's forward); E starts at zero and A, B at
  N(0, 0.02), so every factor of the product starts small.

Rows go to ``results/adalora_update.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_quality as B  # noqa: E402
import tasks as T  # noqa: E402
import torch  # noqa: E402
from common import append_rows  # noqa: E402


def update_norms(model) -> list[float]:
    """``||dW|| / ||W||`` of every peft LoRA or AdaLoRA layer of ``model`` (adapter ``default``)."""
    out = []
    with torch.no_grad():
        for mod in model.modules():
            if "default" in getattr(mod, "lora_E", {}):
                a, b, e = mod.lora_A["default"], mod.lora_B["default"], mod.lora_E["default"]
                dw = b @ (a * e) * mod.scaling["default"] / (mod.ranknum["default"] + 1e-5)
            elif "default" in getattr(mod, "lora_A", {}) and hasattr(mod.lora_A["default"], "weight"):
                dw = mod.lora_B["default"].weight @ mod.lora_A["default"].weight * mod.scaling["default"]
            else:
                continue
            out.append(float(dw.norm() / mod.base_layer.weight.norm()))
    return out


def main(argv=None) -> None:
    from peft import LoraConfig, get_peft_model

    from prunepeft.api import evaluate, prepare_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="SST-2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, help="final steps (default: the protocol's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = B.QualityConfig()
    steps = args.steps or cfg.steps
    task = T.load(args.task, cfg.pool, cfg.eval_cap)
    rows = []
    for method in ("adalora", "lora_qv"):
        model, tok = B.model_for(task, args.seed, cfg)
        budget = B.budget_params(model, "r8")
        sc = B.search_config(cfg, lr=args.lr, seed=args.seed, budget=budget, steps=steps)
        data = prepare_data(model, task, None, sc, tok)
        if method == "adalora":
            pm = B._adalora(model, data, sc, budget)["model"]
        else:
            lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
            pm = get_peft_model(model, lora)
            B._loop(pm, [p for p in pm.parameters() if p.requires_grad], data, sc, args.lr)
        norms = update_norms(pm)
        val = evaluate(pm, data, "val")[task.primary_metric]
        row = {"task": args.task, "seed": args.seed, "lr": f"{args.lr:g}", "steps": steps, "method": method,
               "layers": len(norms), "mean_rel_update": round(sum(norms) / len(norms), 5),
               "max_rel_update": round(max(norms), 5), "val": round(val, 4)}  # fmt: skip
        print(row, flush=True)
        rows.append(row)
    append_rows("adalora_update", rows)


if __name__ == "__main__":
    main()
