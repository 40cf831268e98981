"""The quality protocol's machinery (bench/bench_quality.py): every method runs end to end on a tiny
BERT (built from a config, with the real MiniLM tokenizer) and real text; learning rates are chosen on
the validation split only; the report pairs runs by (task, seed) and writes its tables."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import bench_module, minilm_path

from prunepeft.data import Example, Task


@pytest.fixture(scope="module")
def bq():
    return bench_module("bench_quality")


def _tiny(num_labels, seed):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)  # fmt: skip
    return T.BertForSequenceClassification(cfg), T.AutoTokenizer.from_pretrained(minilm_path())


def _task(name, pool, eval_cap):
    from prunepeft.demo import load_bbc_news

    texts, labels, classes = load_bbc_news()
    ex = [
        Example(t.splitlines()[0], label=int(y > 2)) for t, y in zip(texts[::40], labels[::40], strict=True)
    ]
    return Task("classification", ex[:40], ex[40:], ["a", "b"], ("text",), "label")


@pytest.fixture
def tiny(bq, monkeypatch, tmp_path):
    monkeypatch.setattr(bq, "_load_model", _tiny)
    monkeypatch.setattr(bq.T, "load", _task)
    monkeypatch.setattr(bq, "RESULTS", tmp_path)
    monkeypatch.setattr(bq, "budget_params", lambda model, name: {"r8": 1536, "r2": 384}[name])
    cfg = bq.QualityConfig(tasks=("BBC",), steps=3, val_examples=8, batch_size=8, max_length=16, csv="smoke",
                           search={"warmup_steps": 1, "rounds": 1, "steps_per_round": 1})  # fmt: skip
    return bq, cfg


def test_every_method_runs_and_the_report_pairs_them(tiny):
    bq, cfg = tiny
    rows = []
    for method in bq.DEFAULT_METHODS:
        budget = "full" if method == "full_ft" else "r8"
        for seed, lr in ((0, 1e-3), (0, 3e-3), (1, 1e-3)):
            job = {"task": "BBC", "budget": budget, "method": method, "seed": seed, "lr": lr}
            row = bq.run_job(job, cfg)
            assert set(row) == set(bq.COLUMNS)
            assert 0 <= row["val"] <= 1 and 0 <= row["value"] <= 1, method
            if method in bq.SEARCH:
                assert int(row["params"]) <= 1536 and row["kept"], method
            elif method in bq.UNIFORM:
                assert int(row["params"]) <= 1536, method
            elif method in bq.DIAGNOSTIC:
                assert int(row["params"]) <= 1536 and row["kept"], method
            elif method in bq.ALLOCATION:
                assert 0 < int(row["params"]) <= 1536 and row["kept"].startswith("lora:"), method
            rows.append({k: str(v) for k, v in row.items()} | {"machine": "test", "commit": "x"})
    md = bq.write_report(cfg, rows)
    assert "| hybrid |" in md and "hybrid − lora_qv" in md and "best uniform in hindsight" in md
    # the paper's ablation order, hybrid > single > random, needs every one of these pairs
    for single in ("taylor", "gradient", "activation", "weight"):
        assert f"hybrid − {single} |" in md and f"{single} − lora_qv |" in md and f"{single} − random |" in md
    for uniform in ("lora_qkvo", "lora_all", "serial_ffn"):  # is the space the problem? uniform peers
        assert f"{uniform} − lora_qv |" in md and f"hybrid − {uniform} |" in md
    assert "spectral − lora_qv |" in md and "spectral − random |" in md and "hybrid − spectral |" in md
    assert "hybrid_inverted − hybrid |" in md and "| default | hybrid_inverted |" in md
    assert "## `hybrid_inverted`: does the criteria's order matter?" in md
    # one task and no r2 runs: the rule cannot decide yet
    assert "`spectral`: the pre-registered rule" in md and "Decision: **pending**" in md
    assert "### `spectral`" in md and "| default | spectral |" in md  # its configurations, its budget spread
    assert "## Cost" in md and "What the found configurations look like" in md
    assert (bq.RESULTS / "smoke.md").exists() and (bq.RESULTS / "smoke.png").exists()


def test_learning_rate_is_chosen_on_the_validation_split_only(bq):
    cfg = bq.QualityConfig(tasks=("SST-2",), methods=("lora_qv",), lrs=(1e-3, 3e-3))
    base = {"variant": "default", "task": "SST-2", "budget_name": "r8", "method": "lora_qv", "seed": "0"}
    rows = [base | {"lr": "0.001", "val": "0.80", "value": "0.99"}]
    assert bq.selected_lr(rows, cfg, "SST-2", "lora_qv") is None  # the grid is not complete yet
    jobs = bq.pending_jobs(rows, cfg)
    assert jobs == [{"task": "SST-2", "budget": "r8", "method": "lora_qv", "seed": 0, "lr": 0.003}]
    rows.append(base | {"lr": "0.003", "val": "0.85", "value": "0.10"})  # worse on eval: must not matter
    assert bq.selected_lr(rows, cfg, "SST-2", "lora_qv") == "0.003"
    jobs = bq.pending_jobs(rows, cfg)
    assert {(j["budget"], j["seed"], j["lr"]) for j in jobs} == {
        ("r8", 1, 0.003), ("r8", 2, 0.003), ("r2", 0, 0.003), ("r2", 1, 0.003), ("r2", 2, 0.003)}  # fmt: skip


def test_oracle_is_the_best_uniform_configuration_on_the_seeds_all_of_them_share(bq):
    def row(v):
        return {"value": str(v)}

    cfg = bq.QualityConfig(seeds=(0, 1, 2, 3, 4))
    fin = {("T", "r8", "lora_qv"): {s: row(0.80) for s in range(5)},
           ("T", "r8", "lora_all"): {0: row(0.82), 1: row(0.82), 2: row(0.79)},  # mean 81.0 over seeds 0-2
           ("T", "r8", "serial_ffn"): {0: row(0.99), 1: row(0.99)},  # lacks seed 2: cannot compete
           ("T", "r8", "hybrid"): {s: row(0.81) for s in range(5)}}  # fmt: skip
    m, mean = bq.oracle_choice(fin, "T", "r8", cfg)
    assert m == "lora_all" and mean == pytest.approx(81.0)
    pairs = bq._oracle_pairs(fin, ["T"], "r8", "hybrid", cfg)
    assert [(s, round(x, 6)) for _, s, x in pairs] == [(0, -1.0), (1, -1.0), (2, 2.0)]
    assert "81.0 (lora_all)" in bq._oracle_row(fin, ["T"], "r8", cfg)[0]
    assert bq.oracle_choice({}, "T", "r8", cfg) is None


def test_val_choice_reads_the_validation_split_at_the_first_seed_only(bq):
    def row(val, value):
        return {"val": str(val), "value": str(value)}

    cfg = bq.QualityConfig(seeds=(0, 1, 2))
    fin = {("T", "r8", "lora_qv"): {s: row(0.70, 0.80) for s in range(3)},
           # best on the eval set but not on the validation split at seed 0: not chosen
           ("T", "r8", "lora_all"): {0: row(0.69, 0.95), 1: row(0.99, 0.95), 2: row(0.99, 0.95)},
           ("T", "r8", "lora_qkvo"): {0: row(0.75, 0.70), 1: row(0.1, 0.76), 2: row(0.1, 0.73)},
           ("T", "r8", "serial_ffn"): {0: row(0.99, 0.99)},  # lacks seeds 1, 2: cannot compete
           ("T", "r8", "hybrid"): {s: row(0.5, 0.74) for s in range(3)}}  # fmt: skip
    m, mean = bq.val_choice(fin, "T", "r8", cfg)
    assert m == "lora_qkvo" and mean == pytest.approx(73.0)
    assert bq.oracle_choice(fin, "T", "r8", cfg)[0] == "lora_all"
    pairs = bq._oracle_pairs(fin, ["T"], "r8", "lora_qv", cfg, bq.val_choice, flip=True)
    assert [(s, round(x, 6)) for _, s, x in pairs] == [(0, -10.0), (1, -4.0), (2, -7.0)]
    tied = {k: {s: row(0.70, r["value"]) for s, r in v.items()} for k, v in fin.items()}
    assert bq.val_choice(tied, "T", "r8", cfg)[0] == "lora_qv"  # ties: LoRA q,v, the default
    assert "seed 0;" in bq.val_choice_label(cfg) and "seed 1;" in bq.val_choice_label(
        bq.QualityConfig(seeds=(1, 2, 3))
    )
    assert (
        "73.0 (lora_qkvo)"
        in bq._oracle_row(fin, ["T"], "r8", cfg, bq.val_choice, bq.val_choice_label(cfg))[0]
    )


def test_bootstrap_interval(bq):
    lo, hi = bq.bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    assert 1.0 <= lo < 2.5 < hi <= 4.0
    assert bq.bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_report_shows_the_headline_without_chance_tasks_and_keeps_superseded_runs_apart(
    bq, monkeypatch, tmp_path
):
    monkeypatch.setattr(bq, "RESULTS", tmp_path)
    cfg = bq.QualityConfig(tasks=("SST-2", "RTE", "STS-B"), methods=("hybrid", "lora_qv"), budgets=("r8",),
                           seeds=(0, 1), lrs=(1e-3,), chance_tasks=("RTE",))  # fmt: skip
    values = {("SST-2", "hybrid"): (0.84, 0.86), ("SST-2", "lora_qv"): (0.82, 0.83),
              ("RTE", "hybrid"): (0.50, 0.48), ("RTE", "lora_qv"): (0.55, 0.57),
              ("STS-B", "hybrid"): (0.80, 0.81), ("STS-B", "lora_qv"): (0.79, 0.79)}  # fmt: skip
    rows = []
    for variant in ("default", "default-stsb-head0"):
        for (task, method), vs in values.items():
            if variant != "default" and task != "STS-B":
                continue
            for seed, v in enumerate(vs):
                v = v - 0.5 * (method == "hybrid") if variant != "default" else v  # the old runs: far worse
                rows.append({"variant": variant, "task": task, "budget_name": "r8", "budget": "73728", "method": method,
                             "seed": str(seed), "lr": "0.001", "val": "0.5", "value": str(v), "params": "73728",
                             "search_s": "1", "final_s": "10", "total_s": "11", "wall_s": "12", "peak_rss_mb": "900",
                             "kept": "lora:q@0=8" if method == "hybrid" else "", "machine": "test", "commit": "x"})  # fmt: skip
    md = bq.write_report(cfg, rows)
    line = next(ln for ln in md.splitlines() if ln.startswith("| hybrid − lora_qv |"))
    assert line.startswith("| hybrid − lora_qv | +2.5 | -7.0 | +1.5 |")  # per task: SST-2, RTE, STS-B
    # all six pairs: (+2, +3, -5, -9, +1, +2) / 6 = -1.0; without RTE: (+2, +3, +1, +2) / 4 = +2.0
    assert "| -1.00 |" in line and line.rstrip().endswith("4/0/2 |")
    chance = next(
        ln for ln in md.splitlines() if ln.startswith("| hybrid − lora_qv, without RTE (at chance) |")
    )
    assert "| +2.00 |" in chance and chance.rstrip().endswith("4/0/0 |")
    assert "## Earlier protocol versions" in md
    old = next(ln for ln in md.splitlines() if ln.startswith("- `default-stsb-head0`"))
    assert "4 runs" in old and "-48.50 points over 2 pairs (-49.0, -48.0)" in old


def test_probe_cuts_a_kept_configuration_out_of_the_default_space():
    from conftest import tiny_model

    quality_probe = bench_module("quality_probe")
    model, _ = tiny_model("bert")
    handle = quality_probe.configuration(model, "lora:q@0=4;lora:down@1=8;serial_adapter:o@1=4", seed=0)
    widths = {
        f"{s.kind}:{s.role}@{s.layer}": w
        for s, w in zip(handle.bank.specs, handle.bank.widths(), strict=True)
    }
    assert {k: w for k, w in widths.items() if w} == {
        "lora:q@0": 4,
        "lora:down@1": 8,
        "serial_adapter:o@1": 4,
    }
    with pytest.raises(ValueError, match=r"not in the default search space: \['lora:q@7'\]"):
        quality_probe.configuration(tiny_model("bert")[0], "lora:q@7=4", seed=0)


def test_report_pairs_a_protocol_variant_with_this_reports_uniform_lora_on_eval_and_validation(
    bq, monkeypatch, tmp_path
):
    monkeypatch.setattr(bq, "RESULTS", tmp_path)
    cfg = bq.QualityConfig(tasks=("SST-2", "BBC"), methods=("hybrid", "random", "lora_qv"), budgets=("r8",),
                           seeds=(0, 1), lrs=(1e-3,))  # fmt: skip
    # (variant, method) -> per (task, seed): (val, eval)
    runs = {("default", "lora_qv"): [(0.80, 0.80), (0.82, 0.81), (0.90, 0.90), (0.92, 0.91)],
            ("default", "hybrid"): [(0.78, 0.79), (0.80, 0.80), (0.89, 0.89), (0.90, 0.90)],
            ("v2", "hybrid"): [(0.83, 0.82), (0.84, 0.83), (0.93, 0.92), (0.95, 0.93)],
            ("v2", "random"): [(0.81, 0.81), (0.83, 0.82), (0.91, 0.91), (0.93, 0.92)]}  # fmt: skip
    rows = []
    for (variant, method), vs in runs.items():
        for i, (val, ev) in enumerate(vs):
            rows.append({"variant": variant, "task": ("SST-2", "BBC")[i // 2], "budget_name": "r8", "budget": "73728",
                         "method": method, "seed": str(i % 2), "lr": "0.001", "val": str(val), "value": str(ev),
                         "params": "73728", "search_s": "1", "final_s": "10", "total_s": "11", "wall_s": "12",
                         "peak_rss_mb": "900", "kept": "lora:up@1=4" if method == "hybrid" else "", "machine": "t",
                         "commit": "x"})  # fmt: skip
    md = bq.write_report(cfg, rows)
    assert "## Search variants through the whole protocol" in md and "**`v2`**" in md
    lines = md.splitlines()
    row = next(ln for ln in lines if ln.startswith("| v2:hybrid − default:lora_qv |"))
    # eval: SST-2 (+2, +2), BBC (+2, +2) -> +2.00 over 4 pairs, all wins; val: (+3, +2, +3, +3) -> +2.75
    assert (
        row.startswith("| v2:hybrid − default:lora_qv | +2.0 | +2.0 | +2.00 |") and "| 4/0/0 | +2.75 |" in row
    )
    vs_old = next(ln for ln in lines if ln.startswith("| v2:hybrid − default:hybrid |"))
    assert "| +3.00 |" in vs_old and vs_old.rstrip().endswith(
        "| +4.50 | [+4.00, +5.00] |"
    )  # eval +3 each; val 5,4,4,5
    vs_random = next(ln for ln in lines if ln.startswith("| v2:hybrid − v2:random |"))
    assert "| +1.00 |" in vs_random  # eval (+1, +1, +1, +1)
    # the variant's own found configurations (v2:hybrid kept LoRA on up of layer 1, width 4 on every seed)
    assert any(ln.startswith("| lora:up | ") and "4.0" in ln for ln in lines[lines.index("**`v2`**") :])


def test_budget_spread_counts_sites_kind_shares_and_depth_of_the_found_configurations(
    bq, monkeypatch, tmp_path
):
    monkeypatch.setattr(bq, "RESULTS", tmp_path)
    cfg = bq.QualityConfig(tasks=("SST-2", "RTE"), methods=("hybrid", "lora_qv"), budgets=("r8",), seeds=(0, 1),
                           lrs=(1e-3,), chance_tasks=("RTE",))  # fmt: skip
    kept = {0: "lora:q@0=4;lora:up@1=2;serial_adapter:o@1=2", 1: "lora:v@1=6;lora:down@0=2;lora:k@1=0"}
    rows = []
    for task in ("SST-2", "RTE"):
        for method, vals in (("lora_qv", (0.80, 0.82)), ("hybrid", (0.83, 0.81))):
            for seed, v in enumerate(vals):
                rows.append({"variant": "default", "task": task, "budget_name": "r8", "budget": "73728",
                             "method": method, "seed": str(seed), "lr": "0.001", "val": str(v - 0.01),
                             "value": str(v), "params": "73728", "search_s": "1", "final_s": "10", "total_s": "11",
                             "wall_s": "12", "peak_rss_mb": "900", "kept": kept[seed] if method == "hybrid" else "",
                             "machine": "t", "commit": "x"})  # fmt: skip
    md = bq.write_report(cfg, rows)
    row = next(ln for ln in md.splitlines() if ln.startswith("| default | hybrid |"))
    # RTE (a chance task) is left out: 2 runs. Sites 3 and 2 (a width-0 site is not kept). Attention LoRA
    # (4/8 + 6/8) / 2 = 62 %; FFN LoRA (2/8 + 2/8) / 2 = 25 %; serial adapters (2/8 + 0) / 2 = 12 %; lower
    # half (layer 0 of 0-1): (4/8 + 2/8) / 2 = 38 %; eval (+3, -1) -> +1.00, val the same pairs.
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "default",
        "hybrid",
        "2",
        "2.5 (2–3)",
        "62%",
        "25%",
        "12%",
        "0%",
        "38%",
        "+1.00",
        "+1.00",
    ]


def test_found_step_bench_times_each_search_runs_configuration_at_its_selected_learning_rate(
    monkeypatch, tmp_path
):
    fs = bench_module("bench_found_step")
    monkeypatch.setattr(fs, "RESULTS", tmp_path)
    base = {"budget_name": "r8", "budget": "73728", "task": "SST-2", "params": "1", "search_s": "1", "final_s": "1",
            "total_s": "2", "wall_s": "2", "peak_rss_mb": "1", "machine": "t", "commit": "x", "value": "0.5"}  # fmt: skip
    rows = [  # seed 0: the grid (1e-3 wins on val), seed 1 at the chosen rate; a superseded variant is left out
        {**base, "variant": "v", "method": "hybrid", "seed": "0", "lr": "0.001", "val": "0.9", "kept": "lora:q@0=2"},
        {**base, "variant": "v", "method": "hybrid", "seed": "0", "lr": "0.003", "val": "0.8", "kept": "lora:k@0=2"},
        {**base, "variant": "v", "method": "hybrid", "seed": "1", "lr": "0.001", "val": "0.8", "kept": "lora:v@1=1"},
        {**base, "variant": "v", "method": "lora_qv", "seed": "0", "lr": "0.001", "val": "0.9", "kept": ""},
        {**base, "variant": "default-stsb-head0", "method": "hybrid", "seed": "0", "lr": "0.001", "val": "0.9",
         "kept": "lora:o@0=2"},
    ]  # fmt: skip
    with open(tmp_path / "quality.csv", "w", newline="") as f:
        import csv

        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert fs.found_configurations("SST-2", 0) == [("v", "hybrid", "lora:q@0=2")]
    assert fs.found_configurations("SST-2", 1) == [("v", "hybrid", "lora:v@1=1")]


def test_a_collapsed_run_is_retried_at_the_next_smaller_learning_rate_and_replaced(bq, monkeypatch, tmp_path):
    """A run whose validation metric is at a constant prediction's level gets a retry job at the next
    smaller rate of the grid, and once that exists it counts instead; chance tasks are exempt."""
    monkeypatch.setattr(bq, "RESULTS", tmp_path)
    floors = {"QNLI": 0.51, "RTE": 0.53}
    monkeypatch.setattr(bq, "_val_floor", lambda task, *a: floors[task])
    cfg = bq.QualityConfig(tasks=("QNLI", "RTE"), methods=("hybrid", "lora_qv"), budgets=("r8",), seeds=(0, 1),
                           lrs=(1e-3, 3e-3))  # fmt: skip
    base = {"variant": "default", "budget_name": "r8", "budget": "73728", "params": "73728", "search_s": "1",
            "final_s": "10", "total_s": "11", "wall_s": "12", "peak_rss_mb": "900", "kept": "", "machine": "t",
            "commit": "x"}  # fmt: skip
    rows = []
    for task in ("QNLI", "RTE"):
        for method in ("hybrid", "lora_qv"):
            for seed, lr, val, ev in (
                (0, "0.001", 0.70, 0.70),
                (0, "0.003", 0.75, 0.74),
                (1, "0.003", 0.76, 0.75),
            ):
                if method == "hybrid" and seed == 1:
                    val, ev = 0.51, 0.509  # collapsed: at QNLI's floor (and RTE's, which is exempt)
                rows.append({**base, "task": task, "method": method, "seed": str(seed), "lr": lr, "val": str(val),
                             "value": str(ev)})  # fmt: skip
    jobs = bq.pending_jobs(rows, cfg)
    assert jobs == [{"task": "QNLI", "budget": "r8", "method": "hybrid", "seed": 1, "lr": 0.001}]
    md = bq.write_report(cfg, rows)
    assert (
        "Collapsed and kept (no smaller learning rate, or its retry not run yet): hybrid QNLI seed 1 at 0.003"
        in md
    )
    rows.append(
        {
            **base,
            "task": "QNLI",
            "method": "hybrid",
            "seed": "1",
            "lr": "0.001",
            "val": "0.72",
            "value": "0.71",
        }
    )
    assert bq.pending_jobs(rows, cfg) == []
    fin = bq.final_rows(rows, cfg)
    assert (
        fin[("QNLI", "r8", "hybrid")][1]["lr"] == "0.001" and fin[("RTE", "r8", "hybrid")][1]["lr"] == "0.003"
    )
    assert bq.final_rows(rows, cfg, retry=False)[("QNLI", "r8", "hybrid")][1]["lr"] == "0.003"
    md = bq.write_report(cfg, rows)
    assert "hybrid QNLI seed 1 at 0.003 (val 51.0, eval 50.9) -> 0.001 (val 72.0, eval 71.0)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| hybrid − lora_qv |"))
    as_run = next(
        ln for ln in md.splitlines() if ln.startswith("| hybrid − lora_qv, as run (no collapse retry) |")
    )
    # QNLI pairs: seed 0 +0.0, seed 1 71.0 - 75.0 = -4.0 (as run: 50.9 - 75.0 = -24.1); RTE (exempt) 0.0, -24.1
    assert line.startswith("| hybrid − lora_qv | -2.0 | -12.0 | -7.03 |")
    assert as_run.startswith("| hybrid − lora_qv, as run (no collapse retry) | -12.0 | -12.0 | -12.05 |")


def test_adalora_update_bench_measures_each_adapters_update_against_its_frozen_weight(
    tiny, monkeypatch, tmp_path
):
    """``bench/adalora_update.py``: the update norm is B (A * E) * scale / ranknum for AdaLoRA and
    B A * scale for LoRA (checked by hand), and a run writes one row per method."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    bq, _ = tiny
    au, common = bench_module("adalora_update"), bench_module("common")
    model, _ = _tiny(2, 0)
    ada = get_peft_model(model, AdaLoraConfig(task_type="SEQ_CLS", target_modules=["query"], init_r=3, target_r=2,
                                              lora_alpha=4, total_step=10))  # fmt: skip
    layer = ada.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        for t in (layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]):
            t.fill_(0.5)
    want = (torch.full((32, 32), 3 * 0.5**3) * 4 / 3).norm() / layer.base_layer.weight.norm()
    assert au.update_norms(ada)[0] == pytest.approx(float(want), rel=1e-4)
    model, _ = _tiny(2, 0)
    lora = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["value"]))
    assert au.update_norms(lora) == [0.0, 0.0]  # B starts at zero

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(au.B, "QualityConfig", lambda: tiny[1])  # the tiny protocol (3 steps, BBC)
    au.main(["--task", "BBC", "--steps", "3"])
    rows = list(csv.DictReader(open(tmp_path / "adalora_update.csv")))
    assert [r["method"] for r in rows] == ["adalora", "lora_qv"]
    assert all(int(r["layers"]) == 4 and float(r["mean_rel_update"]) > 0 for r in rows)


def test_a_variant_name_keeps_one_search_setting(bq, monkeypatch, tmp_path):
    """The CSV's rows do not carry ``--search``: the first run of a variant records it, a later run of
    the same name with other overrides stops with an error naming both, other names are recorded."""
    monkeypatch.setattr(bq, "RESULTS", tmp_path)
    cfg = bq.QualityConfig(variant="v1", search={"balance": "spread"})
    bq.check_variant_search(cfg)
    bq.check_variant_search(cfg)  # the same setting again: fine
    with pytest.raises(SystemExit, match=r"'v1'.*\{\"balance\": \"spread\"\}.*\{\"rounds\": 2\}"):
        bq.check_variant_search(bq.QualityConfig(variant="v1", search={"rounds": 2}))
    bq.check_variant_search(bq.QualityConfig(variant="v2", search={"rounds": 2}))
    assert json.loads((tmp_path / "quality.search.json").read_text()) == {
        "v1": {"balance": "spread"},
        "v2": {"rounds": 2},
    }


def test_spectral_ranks_take_rank_units_by_singular_value_per_parameter(bq):
    # per-parameter values: a0 3, b0 2, a1 1, b1 0.25 -- taken best first while they fit
    spectra = {"a": (torch.tensor([3.0, 1.0]), 1), "b": (torch.tensor([4.0, 0.5]), 2)}
    assert bq.spectral_ranks(spectra, 4, 8) == {"a": 2, "b": 1}
    assert bq.spectral_ranks(spectra, 2, 8) == {"a": 2}  # b0 does not fit after a0; a1 still does
    assert bq.spectral_ranks(spectra, 100, 8) == {"a": 2, "b": 2}
    assert bq.spectral_ranks(spectra, 100, 1) == {"a": 1, "b": 1}  # at most max_rank per site
    assert bq.spectral_ranks(spectra, 0, 8) == {}
    # equal singular values of one site: its units still come in order (never rank 2 without rank 1)
    assert bq.spectral_ranks({"c": (torch.tensor([1.0, 1.0, 1.0]), 1)}, 2, 8) == {"c": 2}


def test_site_gradient_spectra_reads_each_linears_mean_gradient_and_leaves_the_model_as_it_was(bq):
    from prunepeft.space import SearchSpace, SpaceConfig

    model, _ = _tiny(2, 0)
    model.eval()
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(1000, 2000, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long),
                "labels": torch.randint(0, 2, (4,))} for _ in range(2)]  # fmt: skip
    sites = SearchSpace.from_model(model, SpaceConfig(lora_targets=("all",), serial_adapter_targets=())).sites
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    torch.manual_seed(2)
    got = bq.site_gradient_spectra(model, batches, sites)
    assert set(got) == {s.name for s in sites} and len(sites) == 12  # 2 layers x q, k, v, o, up, down
    for n, p in model.named_parameters():  # nothing updated, nothing left behind
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] and p.grad is None, n
    assert not model.training  # its mode is restored
    # by hand, with the same dropout draws: the mean of the two batches' gradients of one weight
    name = sites[2].name
    w = model.get_submodule(name).weight
    w.requires_grad_(True)
    model.train()
    torch.manual_seed(2)
    for b in batches:
        model(**b).loss.backward()
    want = torch.linalg.svdvals(w.grad.double() / 2)
    sv, cost = got[name]
    torch.testing.assert_close(sv, want)
    assert cost == w.shape[0] + w.shape[1]


def test_spectral_rule_reads_the_validation_split_and_waits_for_every_pair(bq):
    cfg = bq.QualityConfig(tasks=("A", "B"), seeds=(0, 1, 2))

    def rows(val, value):
        return {s: {"val": str(val + 0.001 * s), "value": str(value)} for s in cfg.seeds}

    fin = {}
    for t in cfg.tasks:
        fin[(t, "r8", "spectral")] = rows(0.80, 0.10)  # far worse on the eval set: must not matter
        fin[(t, "r8", "hybrid")] = rows(0.78, 0.90)
        fin[(t, "r8", "lora_qv")] = rows(0.79, 0.90)
        fin[(t, "r2", "lora_qv")] = rows(0.75, 0.90)
    md = "\n".join(bq._spectral_rule(fin, list(cfg.tasks), cfg))
    assert "pending" in md and "Decision: **pending**" in md  # no r2 spectral runs yet
    for t in cfg.tasks:
        fin[(t, "r2", "spectral")] = rows(0.74, 0.10)  # 1 point below: the CI's lower end is not above -1
    md = "\n".join(bq._spectral_rule(fin, list(cfg.tasks), cfg))
    assert md.count("| holds |") == 2 and md.count("| fails |") == 1 and "Decision: **not adopted**" in md
    for t in cfg.tasks:
        fin[(t, "r2", "spectral")] = rows(0.749, 0.10)
    md = "\n".join(bq._spectral_rule(fin, list(cfg.tasks), cfg))
    assert md.count("| holds |") == 3 and "Decision: **adopt**" in md


def test_hybrid_inverted_prunes_what_the_default_search_keeps(tiny):
    """``hybrid_inverted`` (the criteria's diagnostic) sees the same warm-up as ``hybrid`` (same seed), so
    its first round scores the same units (here under half of them go) and must prune units the default
    search keeps, never the ones it prunes; the patch is gone after the run."""
    from prunepeft import hybrid, pruner
    from prunepeft.api import search

    bq, cfg = tiny
    task = _task("BBC", 0, 0)
    pruned = {}
    for method in ("hybrid", "hybrid_inverted"):
        model, tok = _tiny(2, 0)
        sc = bq.search_config(cfg, lr=1e-3, seed=0, budget=6000, steps=0, strategy="hybrid", **cfg.search)
        with bq.inverted_scores() if method == "hybrid_inverted" else bq.contextlib.nullcontext():
            res = search(model, task, config=sc, tokenizer=tok, log=None)
        pruned[method] = set(res.history[0]["pruned"])
        assert pruned[method], method
    assert not pruned["hybrid"] & pruned["hybrid_inverted"]
    assert pruner.balanced_scores is hybrid.balanced_scores


def test_protocol_rows_keep_their_schedule_after_the_library_default_changed(bq):
    from prunepeft.api import SearchConfig

    assert SearchConfig().search_steps == 16  # cheap16, adopted by issue 12's rule
    cfg = bq.QualityConfig()
    sc = bq.search_config(cfg, lr=1e-3, seed=0, budget=None, steps=200)
    assert (sc.warmup_steps, sc.rounds, sc.steps_per_round, sc.search_steps) == (8, 4, 5, 28)
    cheap16 = json.loads(bq.PROTOCOL_VARIANTS["cheap16"].split("'")[1])
    assert bq.search_config(cfg, lr=1e-3, seed=0, budget=None, steps=200, **cheap16).search_steps == 16
