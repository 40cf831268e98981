"""Figure 2 of the foundation issue: training step time on all-MiniLM-L6-v2, batch 16 x 128 tokens.

Times one AdamW training step (forward, backward, step) for: peft LoRA (query, value, r=8); the full
prunepeft supernet (``common.minilm_supernet_config``); that supernet with blocks *masked* down to
the LoRA's trainable-parameter count; the same after *compaction*; and the supernet compacted to
exactly the LoRA's shape (q, v, rank 8, every layer), which isolates prunepeft's own overhead. Median of ``--repeat`` steps
after 2 warm-up steps, each model fresh; the classification head trains in every variant.

    python bench/bench_step.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_rows, load_minilm, median_time, minilm_supernet_config  # noqa: E402

from prunepeft import attach  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def batch(tokenizer, n=16, length=128):
    with open(os.path.join(SHARED, "glue", "SST-2", "train.tsv"), encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]
    enc = tokenizer(
        [r[0] for r in rows], truncation=True, max_length=length, padding="max_length", return_tensors="pt"
    )
    enc["labels"] = torch.tensor([int(r[1]) for r in rows])
    return dict(enc)


def step_fn(model, opt, b):
    def step():
        opt.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, tok = load_minilm()
    b = batch(tok)
    rows = []

    peft_model = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
    )
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    t_lora = median_time(step_fn(peft_model, opt, b), args.repeat)
    rows.append(
        {"variant": "peft_lora_qv_r8", "trainable": lora_params, "seconds": t_lora, "ratio_to_lora": 1.0}
    )
    print(f"peft LoRA q,v r=8: {lora_params:,} params, {t_lora * 1e3:.0f} ms/step")

    model, _ = load_minilm()
    handle = attach(model, minilm_supernet_config())
    opt = handle.optimizer(lr=1e-4)
    t_full = median_time(step_fn(model, opt, b), args.repeat)
    rows.append({"variant": "supernet_full", "trainable": handle.num_trainable(), "seconds": t_full,
                 "ratio_to_lora": t_full / t_lora})  # fmt: skip
    print(
        f"supernet full: {handle.num_trainable():,} params, {t_full * 1e3:.0f} ms/step ({t_full / t_lora:.2f}x LoRA)"
    )

    stats = handle.bank.accumulate_stats()
    nb = handle.bank.num_blocks
    handle.prune_to_budget(lora_params, stats[:nb, 2] / stats[:nb, 7], compact=False)
    t_mask = median_time(step_fn(model, opt, b), args.repeat)
    rows.append({"variant": "supernet_masked", "trainable": handle.num_trainable(), "seconds": t_mask,
                 "ratio_to_lora": t_mask / t_lora})  # fmt: skip
    print(
        f"supernet masked to budget: {handle.num_trainable():,} params, {t_mask * 1e3:.0f} ms/step ({t_mask / t_lora:.2f}x)"
    )

    handle.compact(optimizer=opt)
    alive = sum(1 for w in handle.bank.widths() if w)
    t_comp = median_time(step_fn(model, opt, b), args.repeat)
    rows.append({"variant": "supernet_compacted", "trainable": handle.num_trainable(), "seconds": t_comp,
                 "ratio_to_lora": t_comp / t_lora})  # fmt: skip
    print(f"supernet compacted: {handle.num_trainable():,} params in {alive} candidates, "
          f"{t_comp * 1e3:.0f} ms/step ({t_comp / t_lora:.3f}x LoRA)")  # fmt: skip

    # The same comparison with the survivors laid out exactly like the peft LoRA (q and v, rank 8, in
    # every layer): this isolates prunepeft's own overhead, since a search's survivors may sit only in
    # late layers (then backward stops early and the comparison flatters prunepeft).
    model, _ = load_minilm()
    handle = attach(model, minilm_supernet_config())
    bank = handle.bank
    keep = torch.zeros(bank.num_blocks, dtype=torch.float64)
    for c, spec in enumerate(bank.specs):
        if spec.kind == "lora" and spec.role in ("q", "v"):
            for j, blk in enumerate(bank.candidate_blocks(c)):
                keep[blk] = 1.0 if j * spec.block_size < 8 else 0.0
    opt = handle.optimizer(lr=1e-4)
    handle.prune_to_budget(lora_params, keep, optimizer=opt)
    t_same = median_time(step_fn(model, opt, b), args.repeat)
    rows.append({"variant": "supernet_compacted_lora_shape", "trainable": handle.num_trainable(), "seconds": t_same,
                 "ratio_to_lora": t_same / t_lora})  # fmt: skip
    print(f"supernet compacted to LoRA's shape (q,v r=8 in every layer): {handle.num_trainable():,} params, "
          f"{t_same * 1e3:.0f} ms/step ({t_same / t_lora:.3f}x LoRA)")  # fmt: skip
    print("wrote", append_rows("step_time", rows))


if __name__ == "__main__":
    main()
