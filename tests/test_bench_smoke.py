"""Smoke test of the baseline benchmark's machinery (bench/bench_baselines.py): every method runs
end to end on a tiny BERT built from a config, one step per search phase and two final steps
(peft's AdaLoRA cannot allocate ranks in a 1-step run), and the report is written."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bb():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_baselines
    finally:
        sys.path.remove(str(BENCH))
    return bench_baselines


def _batches(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (4, 12), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 3, (4,), generator=g)})  # fmt: skip
    return out


@pytest.fixture
def one_thread():
    """Tiny GEMMs on an oversubscribed machine: OpenMP's spinning threads cost more than they give."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_method_runs_and_reports(bb, tmp_path, monkeypatch, one_thread):
    cfg = replace(bb.QUICK, mode="smoke", steps=2, warmup_steps=1, rounds=1, steps_per_round=1, lrs=(1e-3,),
                  round_eval_examples=4)  # fmt: skip
    make_model = lambda: tiny_model("bert")[0]  # noqa: E731
    budget = bb.budget_params(make_model(), "r8")
    train, dev = _batches(3, 0), _batches(2, 1)
    rows = []
    for method in bb.METHODS:
        r = bb.run_method(method, make_model, train, dev, cfg=cfg, budget=budget, lr=1e-3, seed=0,
                          task_kind="classification")  # fmt: skip
        assert r["primary"] == "accuracy" and 0.0 <= r["metrics"]["accuracy"] <= 1.0, method
        assert r["params"] > 0 and r["final_s"] > 0, method
        if method in bb.PRUNEPEFT:
            assert r["params"] <= budget and len(r["round_step_s"]) == 1, method
        if method in ("lora_all", "serial_adapter", "lora_qv"):
            assert r["params"] <= budget, method
        rows.append({"method": method, "task": "RTE", "seed": 0, "budget_name": "r8", "budget": budget,
                     "lr": "0.001", "params": r["params"], "metric": "accuracy", "value": r["metrics"]["accuracy"],
                     "seconds": r["search_s"] + r["final_s"], "search_s": r["search_s"], "final_s": r["final_s"],
                     "steps": 2, "step_ms": 1e3 * r["final_s"],
                     "round_step_ms": ";".join(f"{1e3 * s:.1f}" for s in r["round_step_s"]), "peak_rss_mb": 1.0,
                     "wall_s": 1.0, "note": r["note"], "machine": "test", "threads": "1", "versions": "", "commit": "",
                     "date": ""})  # fmt: skip
    monkeypatch.setattr(bb, "RESULTS", tmp_path)
    md = bb.write_report(cfg, rows)
    assert "| hybrid_block |" in md and "## Cost" in md
    assert (tmp_path / "baselines_smoke.md").exists()
    assert (tmp_path / "baselines_smoke_metric_vs_params.png").exists()
    assert (tmp_path / "baselines_smoke_step_time.png").exists()
