"""End-to-end searches on tiny models: budgets, determinism, callback == loop, resume, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from conftest import tiny_model

from prunepeft import SpaceConfig
from prunepeft.api import SearchConfig, SearchError, SearchResult, search
from prunepeft.criteria import CRITERIA
from prunepeft.hybrid import BALANCES
from prunepeft.pruner import Pruner
from prunepeft.scheduler import lr_at, resolve_budget, round_targets

SPACE = SpaceConfig(lora_targets=("q", "k", "v", "o"), serial_adapter_targets=("ffn",), parallel_adapter_targets=("up",),
                    adapter_width=8, trainable_modules=())  # fmt: skip


def _batches(n=6, bs=8, seq=12, seed=0, labels=3, causal=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (bs, seq), generator=g)
        if causal:
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        else:
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.randint(0, labels, (bs,), generator=g)})  # fmt: skip
    return out


def _cfg(**kw):
    base = dict(space=SPACE, budget=2000, rounds=3, steps_per_round=3, warmup_steps=3, final_steps=3,
                round_eval_examples=None, lr=1e-2)  # fmt: skip
    base.update(kw)
    return SearchConfig(**base)


def _max_unit(result, granularity):
    specs = result.handle.bank.specs
    if granularity == "module":
        return max(s.width * (s.in_dim + s.out_dim + s.bias) + (s.out_dim if s.bias else 0) for s in specs)
    return max(s.block_size * (s.in_dim + s.out_dim + s.bias) + (s.out_dim if s.bias else 0) for s in specs)


@pytest.mark.parametrize("granularity", ["module", "block", "both"])
def test_budget_respected_at_every_granularity(granularity):
    model, _ = tiny_model("bert")
    data = _batches()
    res = search(model, data, data[:2], _cfg(granularity=granularity), log=None)
    assert res.params <= res.budget == 2000
    last = "block" if granularity == "both" else granularity
    assert res.budget - res.params < _max_unit(res, last)
    assert [h["round"] for h in res.history] == [1, 2, 3]
    params = [h["params"] for h in res.history]
    assert params == sorted(params, reverse=True)
    for h in res.history:
        assert h["params"] <= h["target"]
    assert (
        res.handle.num_trainable()
        == res.params
        == sum(res.handle.bank.candidate_params(c) for c in range(res.handle.bank.num_candidates))
    )
    # pruned blocks stop costing memory: the bank holds exactly the kept parameters
    assert res.handle.bank.num_params(effective=False) == res.params
    assert res.final["metrics"]["accuracy"] >= 0


def test_same_seed_same_result():
    results = []
    for _ in range(2):
        model, _ = tiny_model("bert")
        data = _batches()
        results.append(search(model, data, data[:2], _cfg(granularity="block"), log=None))
    a, b = results
    assert a.kept == b.kept and a.assignment == b.assignment
    assert [h["pruned"] for h in a.history] == [h["pruned"] for h in b.history]
    assert a.final["metrics"] == b.final["metrics"]


@pytest.mark.parametrize("strategy", ["random", "taylor", "zeros", "activation", "adalora"])
def test_single_criterion_and_random_strategies(strategy):
    model, _ = tiny_model("bert")
    data = _batches()
    res = search(model, data, None, _cfg(strategy=strategy, final_steps=0), log=None)
    assert res.params <= res.budget and res.assignment is None


@pytest.mark.parametrize("balance", BALANCES)
def test_every_balance_reaches_the_budget(balance):
    model, _ = tiny_model("bert")
    data = _batches()
    res = search(model, data, None, _cfg(balance=balance, final_steps=0), log=None)
    assert res.params <= res.budget and len(res.history) == 3
    assert res.config["balance"] == balance


def test_causal_lm_llama():
    model, _ = tiny_model("llama")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(model.config).eval()
    data = _batches(causal=True)
    cfg = _cfg(task_kind="causal_lm", space=SpaceConfig(lora_targets=("q", "v", "gate"), serial_adapter_targets=("ffn",),
                                                        adapter_width=8))  # fmt: skip
    res = search(model, data, data[:2], cfg, log=None)
    assert res.params <= res.budget
    assert res.final["metrics"]["perplexity"] > 1


def test_4bit_base_search(tmp_path):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    model, _ = tiny_model("bert", hidden=64)
    model.save_pretrained(tmp_path / "base")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"])  # fmt: skip
    qmodel = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", quantization_config=q)
    data = _batches()
    res = search(qmodel, data, data[:2], _cfg(budget=6000, granularity="block"), log=None)
    assert res.params <= 6000 and res.kept


def test_callback_path_equals_loop_path(tmp_path):
    from transformers import Trainer, TrainingArguments

    from prunepeft.callback import TRAINER_OWNS, PrunePEFTCallback

    data = _batches(n=5)
    cfg = _cfg(granularity="both", final_steps=0, lr_warmup_ratio=0.0, weight_decay=0.0, precision="fp32")
    model, _ = tiny_model("bert")
    loop = search(model, data, None, cfg, log=None)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield from data

    model2, _ = tiny_model("bert")
    # the Trainer owns the learning rate, schedule and steps: the callback takes only the search's fields
    trainer_fields = {k: getattr(SearchConfig(), k) for k in TRAINER_OWNS}
    cb = PrunePEFTCallback(model2, dataclasses.replace(cfg, **trainer_fields))
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=cfg.search_steps, learning_rate=cfg.lr,
                             lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                             per_device_train_batch_size=1, report_to=[], save_strategy="no", logging_steps=1000,
                             use_cpu=True, seed=0, dataloader_num_workers=0, optim="adamw_torch")  # fmt: skip
    trainer = Trainer(
        model=model2, args=args, train_dataset=Stream(), data_collator=lambda xs: xs[0], callbacks=[cb]
    )
    trainer.train()
    # same configuration: the same units pruned in every round (their order within a round can
    # differ where scores tie to float rounding, since Trainer and loop sum the loss differently)
    assert [sorted(h.pruned) for h in cb.history] == [sorted(h["pruned"]) for h in loop.history]
    assert cb.kept() == {k["name"]: k["width"] for k in loop.kept}
    assert cb.pruner.assignment.to_dict() == loop.assignment


def test_resume_after_kill_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = _cfg(granularity="block", final_steps=2)
    data = _batches()
    model, _ = tiny_model("bert")
    full = search(model, data, data[:2], cfg, output_dir=tmp_path / "full", log=None)

    calls = {"n": 0}
    original = Pruner._prune_round

    def dying(self, optimizer):
        calls["n"] += 1
        if calls["n"] == 2:  # the process dies in round 2, after round 1's state was written
            raise KeyboardInterrupt
        return original(self, optimizer)

    monkeypatch.setattr(Pruner, "_prune_round", dying)
    model, _ = tiny_model("bert")
    with pytest.raises(KeyboardInterrupt):
        search(model, data, data[:2], cfg, output_dir=tmp_path / "run", log=None)
    monkeypatch.setattr(Pruner, "_prune_round", original)
    state = json.loads((tmp_path / "run" / "state" / "progress.json").read_text())
    assert len(state["pruner"]["history"]) == 1
    assert not (tmp_path / "run" / "result.json").exists()  # no partial result that looks complete

    model, _ = tiny_model("bert")
    resumed = search(model, data, data[:2], cfg, output_dir=tmp_path / "run", resume=True, log=None)
    assert resumed.kept == full.kept
    assert [h["pruned"] for h in resumed.history] == [h["pruned"] for h in full.history]
    torch.testing.assert_close(
        torch.tensor(list(resumed.final["metrics"].values())),
        torch.tensor(list(full.final["metrics"].values())),
    )
    assert not (tmp_path / "run" / "state").exists()
    loaded = SearchResult.load(tmp_path / "run")
    assert loaded.kept == resumed.kept
    for f in ("result.json", "report.md", "report.png"):
        assert (tmp_path / "run" / f).exists()


def test_non_finite_steps_are_skipped_then_stop(monkeypatch):
    model, _ = tiny_model("bert")
    data = _batches()
    real_forward = type(model).forward
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        calls["n"] += 1
        if self.training and calls["n"] in (2, 3):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(type(model), "forward", flaky)
    res = search(model, data, None, _cfg(final_steps=0), log=None)
    assert res.params <= res.budget
    stats = res.handle.bank.stats
    assert stats is None or bool(torch.isfinite(stats).all())

    model, _ = tiny_model("bert")

    def broken(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(type(model), "forward", broken)
    with pytest.raises(SearchError, match="3 steps in a row had a non-finite loss"):
        search(model, data, None, _cfg(max_bad_steps=3), log=None)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(budget=10**7), "above the supernet"),
        (dict(budget=5), "below one block"),
        (dict(budget=0), "is not an integer number of parameters"),
        (dict(budget="abc"), r"is not an integer number of parameters \(73728\), a percentage"),
        (dict(budget="150%"), "'150%' is not an integer"),
        (dict(budget=1.5), "or a fraction below 1"),
        (dict(granularity="layer"), "granularity must be one of"),
        (dict(strategy="magic"), "strategy must be one of"),
        (dict(rounds=0), "rounds must be an integer >= 1"),
        (dict(final_init="warm"), "final_init must be one of"),
    ],
)
def test_bad_search_inputs(kw, match):
    model, _ = tiny_model("bert")
    with pytest.raises(ValueError, match=match):
        search(model, _batches(n=2), None, _cfg(**kw), log=None)
    assert not hasattr(model, "prunepeft_bank")  # nothing left attached


def test_empty_data_and_unwritable_output(tmp_path):
    model, _ = tiny_model("bert")
    with pytest.raises(ValueError, match="train_data must be"):
        search(model, [], None, _cfg(), log=None)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a file instead
            target = tmp_path / "file"
            target.write_text("x")
            target = target / "out"
        else:
            target = ro / "out"
        with pytest.raises(ValueError, match="not writable"):
            search(model, _batches(n=2), None, _cfg(), output_dir=target, log=None)
    finally:
        os.chmod(ro, 0o700)


def test_scheduler_is_pure_and_lands_on_budget():
    assert round_targets(1000, 100, 3) == [700, 400, 100]
    cubic = round_targets(1000, 100, 3, "cubic")
    assert cubic[-1] == 100 and cubic[0] < 700
    assert (
        resolve_budget("0.5%", 10_000)
        == 50
        == resolve_budget(0.005, 10_000)
        == resolve_budget("0.005", 10_000)
    )
    assert resolve_budget("1,000", 10) == 1000
    assert lr_at(0, 10, 2, 1.0) == 0.0 and lr_at(2, 10, 2, 1.0) == 1.0 and lr_at(10, 10, 2, 1.0) == 0.0
    with pytest.raises(ValueError):
        round_targets(100, 1000, 2)


def test_every_criterion_is_computed_together():
    from prunepeft import attach
    from prunepeft.criteria import criterion_values

    model, batch = tiny_model("bert")
    h = attach(model, SPACE)
    h.bank.collect_activations = True
    model(**batch).loss.backward()
    h.bank.accumulate_stats(adalora=(0.85, 0.85))
    vals = criterion_values(h.bank)
    assert set(vals) == set(CRITERIA)
    for name, (vb, vc) in vals.items():
        assert vb.shape == (h.bank.num_blocks,) and vc.shape == (h.bank.num_candidates,)
        assert bool(torch.isfinite(vb).all()), name


def test_result_reports_the_cost_of_every_part(tmp_path):
    model, _ = tiny_model("bert")
    data = _batches()
    res = search(model, data, data[:2], _cfg(granularity="block", val_examples=8, round_eval_examples=8),
                 output_dir=tmp_path / "run", log=None)  # fmt: skip
    assert {"warmup", "rounds", "scoring", "evaluation", "state", "final"} <= set(res.costs)
    assert all(v >= 0 for v in res.costs.values()) and res.costs["final"] == pytest.approx(
        res.final["seconds"], abs=1e-3
    )
    # the search's wall time is its parts (plus loop overhead); checkpoint writes are not part of it
    parts = sum(v for k, v in res.costs.items() if k not in ("final", "state"))
    assert parts <= res.search_seconds * 1.05 + 0.05
    assert "## Cost" in (tmp_path / "run" / "report.md").read_text()
    assert SearchResult.load(tmp_path / "run").costs == res.costs


def test_in_search_evaluation_is_off_by_default_and_decides_nothing():
    """round_eval_examples only adds a report: the same search with and without it keeps the same units,
    assignment and losses (evaluation draws no random numbers and touches no statistic)."""
    assert SearchConfig().round_eval_examples == 0
    data = _batches()
    runs = []
    for n in (0, 8):
        model, _ = tiny_model("bert")
        runs.append(search(model, data, data[:2], _cfg(granularity="block", val_examples=8, round_eval_examples=n),
                           log=None))  # fmt: skip
    off, on = runs
    assert off.kept == on.kept and off.assignment == on.assignment
    assert [h["loss"] for h in off.history] == [h["loss"] for h in on.history]
    assert off.final["loss"] == on.final["loss"] and off.final["val_metrics"] == on.final["val_metrics"]
    assert all(not h["eval"] for h in off.history) and all(h["eval"] for h in on.history)
    assert "evaluation" not in off.costs or off.costs["evaluation"] == 0.0


def test_a_final_training_at_a_constant_predictions_level_is_warned_about(monkeypatch):
    """search and finetune warn, naming the metric and the learning rate, when the trained
    configuration's validation metrics are those of a constant prediction (diverged or learned nothing)."""
    import importlib
    import warnings

    finetune_module = importlib.import_module("prunepeft.finetune")  # `prunepeft.finetune` is the function
    searcher_module = importlib.import_module("prunepeft.searcher")
    from prunepeft.evaluation import warn_if_constant

    assert warn_if_constant({"accuracy": 0.9, "matthews": 0.8}, 1e-3) is None
    assert warn_if_constant({}, 1e-3) is None  # no validation split
    assert warn_if_constant({"perplexity": 9.0}, 1e-3) is None  # causal LM: no such level
    for metrics in (
        {"accuracy": 0.52, "f1": 0.0, "matthews": 0.0},
        {"pearson": float("nan"), "spearman": 0.0},
    ):
        with pytest.warns(RuntimeWarning, match="constant prediction"):
            assert "smaller learning rate than 0.003" in warn_if_constant(metrics, 3e-3)
    constant = lambda model, data, split="eval", limit=None: {"accuracy": 0.5, "f1": 0.0, "matthews": 0.0}  # noqa: E731
    data = _batches()
    for module, run in ((searcher_module, lambda m: search(m, data, data[:2], _cfg(val_examples=8), log=None)),
                        (finetune_module, lambda m: finetune_module.finetune(m, data, data[:2], _cfg(val_examples=8),
                                                                             space=SPACE, log=None))):  # fmt: skip
        monkeypatch.setattr(module, "evaluate", constant)
        with pytest.warns(RuntimeWarning, match=r"matthews 0\.000 on the validation split.*than 0\.01"):
            run(tiny_model("bert")[0])
    with warnings.catch_warnings():  # a configuration that learned: no warning
        warnings.simplefilter("error", RuntimeWarning)
        monkeypatch.setattr(
            finetune_module, "evaluate", lambda *a, **k: {"accuracy": 0.9, "f1": 0.9, "matthews": 0.8}
        )
        finetune_module.finetune(
            tiny_model("bert")[0], data, data[:2], _cfg(val_examples=8), space=SPACE, log=None
        )
