"""What a search costs next to the one LoRA training it replaces (performance issue, part 2).

all-MiniLM-L6-v2 on a real task: (1) ``prunepeft.search`` at the library's defaults (warm-up + rounds
+ ``steps`` final steps of the found configuration), timed end to end; (2) peft LoRA r=8 on query,value
trained ``steps`` steps with the same loop, batches and schedule (peft's own LoRA modules, wrapped by
``peft.get_peft_model``); (3) prunepeft's uniform LoRA r=8 q,v (``finetune``) for reference. Same task,
seed and learning rate, one process, one thread, in one run. Rows: the total ratio and the search's
breakdown (warm-up, rounds, scoring / compaction, validation checks, checkpoints, final training).

    python bench/bench_search_cost.py [--task SST-2] [--steps 200] [--seeds 0 1] [--repeat 1]

Appends to ``bench/results/search_cost.csv``; take the figures from a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks as T  # noqa: E402
from bench_quality import _load_model  # noqa: E402
from common import append_rows, versions  # noqa: E402

from prunepeft.api import BatchStream, SearchConfig, finetune, prepare_data, search  # noqa: E402
from prunepeft.finetune import loop_options  # noqa: E402
from prunepeft.space import SpaceConfig  # noqa: E402
from prunepeft.train import TrainState, train_steps  # noqa: E402

LORA_QV = SpaceConfig(lora_targets=("q", "v"), lora_rank=8, serial_adapter_targets=(), block_size=1)


def peft_lora_seconds(task, cfg: SearchConfig, seed: int) -> float:
    """peft LoRA r=8 (alpha 16) on query,value, trained with prunepeft's loop; returns seconds."""
    from peft import LoraConfig, get_peft_model

    model, tok = _load_model(task.num_labels if task.kind == "classification" else 1, seed)
    pm = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
    )
    data = prepare_data(pm, task, None, cfg, tok)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    train_steps(pm, lambda: params, opt, BatchStream(data.train_epoch), cfg.final_steps, TrainState(), lr=cfg.lr,
                total_steps=cfg.final_steps, warmup_steps=int(cfg.lr_warmup_ratio * cfg.final_steps),
                **loop_options(cfg))  # fmt: skip
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="SST-2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = T.load(args.task)
    rows = []
    for seed in args.seeds:
        cfg = SearchConfig(final_steps=args.steps, lr=args.lr, seed=seed, max_length=64, val_examples=400)
        peft_s = peft_lora_seconds(task, cfg, seed)
        model, tok = _load_model(task.num_labels if task.kind == "classification" else 1, seed)
        t0 = time.perf_counter()
        res = search(model, task, config=cfg, tokenizer=tok, log=None)
        total = time.perf_counter() - t0
        # the search's own parts (search() also evaluates the final model on the validation and eval sets)
        parts = dict(res.costs)
        search_s = sum(v for k, v in parts.items() if k != "final")
        model, tok = _load_model(task.num_labels if task.kind == "classification" else 1, seed)
        uni = finetune(model, task, config=cfg, space=LORA_QV, tokenizer=tok, log=None)
        row = {"task": args.task, "seed": seed, "steps": args.steps, "threads": args.threads,
               "peft_lora_qv_train_s": round(peft_s, 2), "prunepeft_lora_qv_train_s": round(uni["seconds"], 2),
               "search_s": round(search_s, 2), "final_s": round(parts.get("final", 0.0), 2),
               "search_plus_final_s": round(search_s + parts.get("final", 0.0), 2),
               "ratio_to_peft": round((search_s + parts.get("final", 0.0)) / peft_s, 3),
               "search_over_peft": round(search_s / peft_s, 3),
               "final_over_peft": round(parts.get("final", 0.0) / peft_s, 3),
               **{f"{k}_s": round(v, 2) for k, v in parts.items() if k != "final"},
               "params": res.params, "kept": len(res.kept), "wall_incl_evaluation_s": round(total, 1),
               "versions": versions()}  # fmt: skip
        print(row, flush=True)
        rows.append(row)
    print("wrote", append_rows("search_cost", rows))


if __name__ == "__main__":
    main()
