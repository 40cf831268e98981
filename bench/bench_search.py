"""Issue-3 figures: the found configuration vs uniform LoRA at the same budget, on real GLUE data.

all-MiniLM-L6-v2 (offline), tasks from ../shared/data (RTE, SST-2; a fixed first-N subset of train,
the full dev set). Budget: peft LoRA r=8 on query,value. prunepeft searches (defaults unless given)
then trains the found configuration for --steps steps; the baseline (LoRA r=8 on q,v) trains the
same steps with the same loop, data order and learning rate. Reports dev metric per seed, the
search's wall time / final training's wall time, and the step time in the first and last round.

    python bench/bench_search.py [--tasks RTE SST-2] [--seeds 0 1] [--steps 400] [--train 2490]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import append_rows, load_minilm  # noqa: E402

import prunepeft  # noqa: E402
from prunepeft.api import SearchConfig, finetune, search  # noqa: E402
from prunepeft.data import load_task  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
SEARCH_SPACE = prunepeft.SpaceConfig(lora_targets=("q", "k", "v", "o"), lora_rank=16,
                                     serial_adapter_targets=("attn", "ffn"), adapter_width=16, block_size=4)  # fmt: skip
LORA_QV_R8 = prunepeft.SpaceConfig(lora_targets=("q", "v"), lora_rank=8, serial_adapter_targets=())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["RTE", "SST-2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=400, help="final-training steps (and the baseline's)")
    ap.add_argument("--train", type=int, default=2490, help="first N training examples")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--granularity", default="block")
    args = ap.parse_args()
    for task_name in args.tasks:
        task = load_task(train=os.path.join(SHARED, task_name, "train.tsv"), eval=os.path.join(SHARED, task_name, "dev.tsv"),
                         max_examples=args.train)  # fmt: skip
        for seed in args.seeds:
            cfg = SearchConfig(space=SEARCH_SPACE, granularity=args.granularity, final_steps=args.steps, seed=seed,
                               max_length=args.max_length)  # fmt: skip
            model, tok = load_minilm(task.num_labels)
            res = search(model, task, config=cfg, tokenizer=tok, log=None)
            primary = task.primary_metric
            first, last = res.history[0]["step_seconds"], res.history[-1]["step_seconds"]
            ratio = res.search_seconds / res.final["seconds"]
            rows = [{"task": task_name, "seed": seed, "method": f"prunepeft_hybrid_{args.granularity}",
                         "params": res.params, "budget": res.budget, "metric": primary,
                         "value": res.final["metrics"][primary], "search_s": res.search_seconds,
                         "final_s": res.final["seconds"], "search_over_final": ratio,
                         "first_round_step_ms": first * 1e3, "last_round_step_ms": last * 1e3,
                         "steps": args.steps, "kept": len(res.kept)}]  # fmt: skip
            print(f"{task_name} seed {seed}: prunepeft {primary} {res.final['metrics'][primary]:.4f} "
                  f"({res.params:,} params, {len(res.kept)} modules), search/final {ratio:.3f}, "
                  f"step {first * 1e3:.0f} -> {last * 1e3:.0f} ms")  # fmt: skip
            model, tok = load_minilm(task.num_labels)
            base = finetune(model, task, config=cfg, space=LORA_QV_R8, tokenizer=tok, log=None)
            rows.append({"task": task_name, "seed": seed, "method": "uniform_lora_qv_r8", "params": base["params"],
                         "budget": res.budget, "metric": primary, "value": base["metrics"][primary], "search_s": 0.0,
                         "final_s": base["seconds"], "search_over_final": "", "first_round_step_ms": "",
                         "last_round_step_ms": "", "steps": args.steps, "kept": ""})  # fmt: skip
            print(
                f"{task_name} seed {seed}: uniform LoRA {primary} {base['metrics'][primary]:.4f} ({base['params']:,} params)"
            )
            print("wrote", append_rows("search_vs_lora", rows))  # per (task, seed): an interrupted run keeps its rows


if __name__ == "__main__":
    main()
