"""What a search costs next to the one LoRA training it replaces (performance issue, part 2).

all-MiniLM-L6-v2 on a real task: (1) ``prunepeft.search`` at the library's defaults (warm-up + rounds
+ ``steps`` final steps of the found configuration), timed end to end; (2) peft LoRA r=8 on query,value
trained ``steps`` steps with the same loop, batches and schedule (peft's own LoRA modules, wrapped by
``peft.get_peft_model``); (3) prunepeft's uniform LoRA r=8 q,v (``finetune``) for reference. Same task,
seed and learning rate, one process, one thread, in one run. Rows: the total ratio and the search's
breakdown (warm-up, rounds, scoring / compaction, validation checks, checkpoints, final training).

    python bench/bench_search_cost.py [--task SST-2] [--steps 200] [--seeds 0 1] [--concurrent]
        [--variant NAME --search JSON]

Appends to ``bench/results/search_cost.csv``; take the figures from a quiet machine.

``--concurrent`` is a paired design against the machine's drift: sequential jobs two minutes apart
see different loads (prunepeft's uniform LoRA, the same work as peft's, measured 0.95-1.06x of it that
way). Here each comparison's two jobs run at the same time in two processes, one core each, built
first and started together; a job that ends first keeps its core busy until the other ends. (1)
against (2) is one pair, (3) against a second peft run another (its ratio, ``control_ratio``, should be
near the sequential design's 0.97 and shows how much the design itself wanders). Both jobs are slower
than alone (they share the memory bus); the ratio is what it reports. Rows go to
``bench/results/search_cost_concurrent.csv``.

``--variant NAME --search JSON`` times a search schedule that is not the default (``SearchConfig``
fields, e.g. ``{"steps_per_round": 2}``; they reach the search job only) before a quality rule decides
on it; its rows go to ``<the csv>_<NAME>.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
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


def _model(task, seed: int):
    """A fresh all-MiniLM-L6-v2 (and its tokenizer) with ``task``'s head, seeded."""
    return _load_model(task.num_labels if task.kind == "classification" else 1, seed)


def _peft_lora_job(task, cfg: SearchConfig, seed: int):
    """peft LoRA r=8 (alpha 16) on query,value, built now; the returned call trains it with prunepeft's loop."""
    from peft import LoraConfig, get_peft_model

    model, tok = _model(task, seed)
    pm = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
    )
    data = prepare_data(pm, task, None, cfg, tok)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def run() -> dict:
        t0 = time.perf_counter()
        train_steps(pm, lambda: params, opt, BatchStream(data.train_epoch), cfg.final_steps, TrainState(),
                    lr=cfg.lr, total_steps=cfg.final_steps,
                    warmup_steps=int(cfg.lr_warmup_ratio * cfg.final_steps), **loop_options(cfg))  # fmt: skip
        return {"peft_lora_qv_train_s": time.perf_counter() - t0}

    return run


def _search_job(task, cfg: SearchConfig, seed: int):
    """``prunepeft.search`` at the defaults on a model loaded now; the call returns its cost breakdown."""
    model, tok = _model(task, seed)

    def run() -> dict:
        t0 = time.perf_counter()
        res = search(model, task, config=cfg, tokenizer=tok, log=None)
        total = time.perf_counter() - t0
        # the search's own parts (search() also evaluates the final model on the validation and eval sets)
        parts = dict(res.costs)
        return {"parts": parts, "params": res.params, "kept": len(res.kept), "wall_incl_evaluation_s": total}

    return run


def _prunepeft_lora_job(task, cfg: SearchConfig, seed: int):
    """prunepeft's uniform LoRA r=8 q,v (``finetune``) on a model loaded now; the call returns its seconds."""
    model, tok = _model(task, seed)

    def run() -> dict:
        uni = finetune(model, task, config=cfg, space=LORA_QV, tokenizer=tok, log=None)
        return {"prunepeft_lora_qv_train_s": uni["seconds"]}

    return run


JOBS = {"peft": _peft_lora_job, "search": _search_job, "lora": _prunepeft_lora_job}


def _config(steps: int, lr: float, seed: int, search: dict | None = None) -> SearchConfig:
    """The runs' config; ``search``: ``SearchConfig`` overrides (a variant's schedule)."""
    try:
        return SearchConfig(
            final_steps=steps, lr=lr, seed=seed, max_length=64, val_examples=400, **(search or {})
        )
    except TypeError as e:
        raise SystemExit(f"--search: {e} (its keys must be SearchConfig fields)") from None


def _job_config(kind: str, steps: int, lr: float, seed: int, search: dict | None) -> SearchConfig:
    """A variant's overrides reach only the search: peft's and the uniform LoRA's runs stay the same."""
    return _config(steps, lr, seed, search if kind == "search" else None)


def _row(task_name: str, seed: int, steps: int, threads: int, got: dict) -> dict:
    parts = got["parts"]
    peft_s = got["peft_lora_qv_train_s"]
    search_s = sum(v for k, v in parts.items() if k != "final")
    final_s = parts.get("final", 0.0)
    return {"task": task_name, "seed": seed, "steps": steps, "threads": threads,
            "peft_lora_qv_train_s": round(peft_s, 2),
            "prunepeft_lora_qv_train_s": round(got["prunepeft_lora_qv_train_s"], 2),
            "search_s": round(search_s, 2), "final_s": round(final_s, 2),
            "search_plus_final_s": round(search_s + final_s, 2),
            "ratio_to_peft": round((search_s + final_s) / peft_s, 3),
            "search_over_peft": round(search_s / peft_s, 3), "final_over_peft": round(final_s / peft_s, 3),
            **{f"{k}_s": round(v, 2) for k, v in parts.items() if k != "final"},
            "params": got["params"], "kept": got["kept"],
            "wall_incl_evaluation_s": round(got["wall_incl_evaluation_s"], 1), "versions": versions()}  # fmt: skip


def _worker(kind, task_name, steps, lr, seed, threads, search, ready, start, stop, out) -> None:
    """One timed job of the concurrent design: build, wait for the start, run timed, then keep a core
    busy until the other job ends too (so neither job's tail runs on a machine the other has left)."""
    torch.set_num_threads(threads)
    run = JOBS[kind](T.load(task_name), _job_config(kind, steps, lr, seed, search), seed)
    ready.set()
    start.wait()
    out.put((kind, run()))
    a, b = torch.randn(256, 1536), torch.randn(1536, 384)
    while not stop.is_set():
        for _ in range(20):
            torch.nn.functional.gelu(a @ b)


def _concurrent(
    task_name: str,
    steps: int,
    lr: float,
    seed: int,
    threads: int,
    kinds: tuple[str, str],
    search: dict | None = None,
) -> dict:
    """Run the two jobs ``kinds`` at the same time, one per core, started together; their results."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in kinds]
    procs = [ctx.Process(target=_worker, args=(k, task_name, steps, lr, seed, threads, search, r, start, stop, out))
             for k, r in zip(kinds, readies, strict=True)]  # fmt: skip
    for p in procs:
        p.start()
    got: dict[str, dict] = {}
    try:
        for k, r, p in zip(kinds, readies, procs, strict=True):
            while not r.wait(5):
                if not p.is_alive():
                    raise RuntimeError(f"the {k} job died while loading (exit code {p.exitcode})")
        start.set()
        while len(got) < len(kinds):
            try:
                kind, res = out.get(timeout=5)
            except queue.Empty:
                dead = [k for k, p in zip(kinds, procs, strict=True) if k not in got and not p.is_alive()]
                if dead:
                    raise RuntimeError(f"the {dead[0]} job died before it reported") from None
                continue
            got[kind] = res
    finally:
        stop.set()
        for p in procs:
            p.join(60 if len(got) == len(kinds) else 0)
            if p.is_alive():
                p.terminate()
    return {k: v for res in got.values() for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="SST-2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--concurrent",
        action="store_true",
        help="run each comparison's two jobs at the same time, one per core (see the module doc)",
    )
    ap.add_argument("--variant", help="name of a non-default search schedule (rows go to <csv>_<NAME>.csv)")
    ap.add_argument("--search", help="JSON: SearchConfig overrides of the variant (the search job only)")
    args = ap.parse_args()
    if bool(args.variant) != bool(args.search):
        ap.error("--variant and --search go together")
    search = json.loads(args.search) if args.search else None
    if search is not None:
        _config(args.steps, args.lr, 0, search)  # a bad key fails here, not in a worker
    torch.set_num_threads(args.threads)
    task = None if args.concurrent else T.load(args.task)  # concurrent jobs load it in their own process
    rows = []
    for seed in args.seeds:
        if args.concurrent:
            got = _concurrent(args.task, args.steps, args.lr, seed, args.threads, ("peft", "search"), search)
            control = _concurrent(args.task, args.steps, args.lr, seed, args.threads, ("peft", "lora"))
            got["prunepeft_lora_qv_train_s"] = control["prunepeft_lora_qv_train_s"]
            row = _row(args.task, seed, args.steps, args.threads, got)
            row["control_peft_lora_qv_train_s"] = round(control["peft_lora_qv_train_s"], 2)
            row["control_ratio"] = round(
                control["prunepeft_lora_qv_train_s"] / control["peft_lora_qv_train_s"], 3
            )
        else:
            got = {}
            for kind in ("peft", "search", "lora"):
                got.update(JOBS[kind](task, _job_config(kind, args.steps, args.lr, seed, search), seed)())
            row = _row(args.task, seed, args.steps, args.threads, got)
        print(row, flush=True)
        rows.append(row)
    name = "search_cost_concurrent" if args.concurrent else "search_cost"
    print("wrote", append_rows(f"{name}_{args.variant}" if args.variant else name, rows))


if __name__ == "__main__":
    main()
