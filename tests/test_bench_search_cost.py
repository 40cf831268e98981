"""bench/bench_search_cost.py: the row it writes, and the concurrent design's failure path.

A real comparison trains MiniLM for minutes (the committed rows are its test); here: the ratios a row
reports are the sums they name, and a job that cannot start ends the comparison with an error naming
it, leaving no process behind.
"""

from __future__ import annotations

import time

import pytest
from conftest import bench_module


@pytest.fixture(scope="module")
def bsc():
    return bench_module("bench_search_cost")


def test_row_ratios_are_the_search_parts_and_the_final_training_over_peft(bsc):
    got = {"peft_lora_qv_train_s": 100.0, "prunepeft_lora_qv_train_s": 97.0,
           "parts": {"warmup": 2.0, "rounds": 5.0, "scoring": 0.5, "final": 98.0},
           "params": 73728, "kept": 13, "wall_incl_evaluation_s": 120.0}  # fmt: skip
    row = bsc._row("SST-2", 3, 500, 1, got)
    assert row["search_s"] == 7.5 and row["final_s"] == 98.0
    assert row["ratio_to_peft"] == 1.055
    assert row["search_over_peft"] == 0.075 and row["final_over_peft"] == 0.98
    assert (row["warmup_s"], row["rounds_s"], row["scoring_s"]) == (2.0, 5.0, 0.5)
    assert "final_s" in row and "parts" not in row


def test_concurrent_job_that_cannot_load_names_itself_and_leaves_no_process(bsc):
    import multiprocessing as mp

    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="peft job died while loading"):
        bsc._concurrent("no-such-task", 10, 1e-3, 0, 1, ("peft", "search"))
    assert time.perf_counter() - t0 < 120
    time.sleep(0.5)
    assert not mp.active_children()


def test_a_variant_schedule_reaches_the_search_job_only_and_a_bad_key_is_named(bsc):
    search = {"warmup_steps": 8, "rounds": 4, "steps_per_round": 2}
    got = {k: bsc._job_config(k, 500, 1e-3, 0, search) for k in ("peft", "search", "lora")}
    assert (got["search"].steps_per_round, got["search"].search_steps) == (2, 16)
    default = bsc._config(500, 1e-3, 0)
    for k in ("peft", "lora"):
        assert got[k] == default
    assert got["search"].final_steps == default.final_steps == 500 and got["search"].lr == default.lr
    with pytest.raises(SystemExit, match="--search: .*steps_per_rnd"):
        bsc._config(500, 1e-3, 0, {"steps_per_rnd": 2})
