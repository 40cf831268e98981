"""SmolLM2-135M-Instruct in 4-bit (the real-LLM issue, figures): step time and peak memory of the
supernet against peft LoRA r=8 on q,v on the same 4-bit base, and quality rows of the LLM demo.

``--part step``: one process loads the 4-bit base twice (NF4, double quant, fp32 compute) and
builds on one the demo's supernet (``prunepeft.demo.LLM_SPACE``: LoRA r=16 on q, k, v, o, gate, up,
down and serial adapters w=16 after attention and the FFN, every layer) and on the other peft
``LoraConfig(r=8, target_modules=["q_proj", "v_proj"])``; a training step (AdamW, batch 4 x 80
tokens, random token ids as inputs and labels: the time depends on the shapes only) of each, taking
turns, median of ``--repeat`` after 2 warm-up steps. Peak memory: each variant in a fresh worker
process, the peak RSS (``VmHWM`` reset through ``/proc/self/clear_refs``) of 3 training steps above
the RSS before them, and the process's whole peak RSS.

``--part quality``: ``prunepeft demo --llm`` (``prunepeft.demo.run_llm`` at its defaults) for each
``--seeds``: exact match of greedy one-word answers on 40 held-out BBC articles for the found
configuration and uniform LoRA r=8 q,v, with parameters and seconds. How far this is from the
encoder protocol of the quality issue: one task, 16 final steps of 4 examples (the encoder protocol:
200 of 16), 40 test articles (one answer moves the score by 2.5 points), the demo's learning rate
2e-3 for both methods (no grid, no validation choice), 2 seeds.

    python bench/bench_llm.py --part step [--repeat 7]
    python bench/bench_llm.py --part quality [--seeds 0 1]

Rows go to ``results/llm_step.csv`` and ``results/llm_quality.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_step import _peak_kb, _reset_peak, _rss_kb  # noqa: E402
from common import append_rows, stamp  # noqa: E402

BATCH, LENGTH = 4, 80


def _model():
    from prunepeft.models import load_model

    model, _ = load_model("smollm2", "causal_lm", load_in_4bit=True, seed=0)
    return model


def build(kind: str):
    """``(model, trainable parameters, params to optimise)`` of variant ``kind`` on a fresh 4-bit base."""
    model = _model()
    if kind == "supernet":
        from prunepeft import attach
        from prunepeft.demo import LLM_SPACE

        handle = attach(model, LLM_SPACE)
        params = list(handle.parameters())
        return model, handle.num_trainable(), params
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, sum(p.numel() for p in params), params


def make_step(model, params):
    torch.manual_seed(0)
    ids = torch.randint(10, 40000, (BATCH, LENGTH))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    return step


def worker(kind: str) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, trainable, params = build(kind)
    step = make_step(model, params)
    before = _rss_kb() or 0
    _reset_peak()
    for _ in range(3):
        step()
    print("MEM " + json.dumps({"peak_train_mb": round((_peak_kb() - before) / 1024, 1),
                               "process_peak_mb": round(_peak_kb() / 1024, 1), "trainable": trainable}))  # fmt: skip


def part_step(repeat: int, threads: int) -> None:
    torch.set_num_threads(threads)
    variants = {}
    for kind in ("supernet", "peft_lora_qv_r8"):
        model, trainable, params = build(kind)
        variants[kind] = (make_step(model, params), trainable)
    for _ in range(2):
        for step, _ in variants.values():
            step()
    times = {k: [] for k in variants}
    for _ in range(repeat):
        for k, (step, _) in variants.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    del variants
    rows = []
    for kind, ts in times.items():
        out = subprocess.run([sys.executable, __file__, "--worker", kind], capture_output=True, text=True,
                             env={**os.environ, "BENCH_THREADS": str(threads)})  # fmt: skip
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("MEM ")), None)
        if line is None:
            raise SystemExit(f"memory worker for {kind} failed:\n{out.stderr[-3000:]}")
        mem = json.loads(line[4:])
        rows.append({"variant": kind, "trainable": mem["trainable"], "batch": f"{BATCH}x{LENGTH}",
                     "step_ms": round(statistics.median(ts) * 1e3, 1), "repeat": repeat,
                     "peak_train_mb": mem["peak_train_mb"], "process_peak_mb": mem["process_peak_mb"],
                     **stamp(), "threads": threads})  # fmt: skip
    ref = next(r for r in rows if r["variant"] == "peft_lora_qv_r8")
    for r in rows:
        print(f"{r['variant']:>16}: {r['trainable']:>10,} trainable, {r['step_ms']:8.1f} ms/step "
              f"({r['step_ms'] / ref['step_ms']:.2f}x peft), +{r['peak_train_mb']} MB in training, "
              f"process peak {r['process_peak_mb']} MB")  # fmt: skip
    append_rows("llm_step", rows)


def part_quality(seeds: list[int]) -> None:
    from prunepeft.demo import LLMDemoConfig, run_llm

    for seed in seeds:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", str(torch.get_num_threads()))))
        out = run_llm(LLMDemoConfig(seed=seed), log=lambda *a: None)
        base = {
            "task": "BBC topics (one word)",
            "seed": seed,
            "test_articles": len(out["targets"]),
            **stamp(),
        }
        rows = [
            {**base, "method": "prunepeft", "exact_match": out["accuracy"], "params": out["params"],
             "search_s": round(out["search_seconds"], 1), "final_s": round(out["final_seconds"], 1),
             "kept": len(out["kept"])},
            {**base, "method": "lora_qv_r8", "exact_match": out["baseline_accuracy"],
             "params": out["baseline_params"], "search_s": 0.0, "final_s": round(out["baseline_seconds"], 1),
             "kept": ""},
        ]  # fmt: skip
        print(f"seed {seed}: prunepeft {out['accuracy']:.3f} ({out['params']:,}) vs LoRA q,v r8 "
              f"{out['baseline_accuracy']:.3f} ({out['baseline_params']:,}); {out['seconds'] / 60:.1f} min")  # fmt: skip
        append_rows("llm_quality", rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["step", "quality"], default="step")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker)
    elif a.part == "step":
        part_step(a.repeat, a.threads)
    else:
        part_quality(a.seeds)


if __name__ == "__main__":
    main()
