"""The `prunepeft` command: info and the embedded walk-through (quick mode) on the real MiniLM + BBC News."""

from __future__ import annotations

import subprocess
import sys

from prunepeft.cli import main
from prunepeft.demo import DemoConfig, load_bbc_news, run


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends: reference" in out and "llama" in out


def test_bbc_news_loads_in_a_fixed_order():
    texts, labels, classes = load_bbc_news()
    assert len(texts) == 2225 and classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert sorted(set(labels)) == [0, 1, 2, 3, 4]
    assert load_bbc_news()[0][:3] == texts[:3]


def test_quick_demo_respects_the_budget():
    lines = []
    cfg = DemoConfig(train_docs=48, test_docs=16, max_length=48, batch_size=8, warmup_steps=2, rounds=2,
                     steps_per_round=2, final_steps=2)  # fmt: skip
    out = run(cfg, log=lines.append)
    assert out["params"] <= out["budget"]
    assert [h["round"] for h in out["history"]] == [1, 2]
    assert out["history"][0]["params"] > out["history"][1]["params"]
    assert 0.0 <= out["accuracy"] <= 1.0 and out["kept"]
    assert any(line.startswith("held-out accuracy") for line in lines)


def test_help_is_readable():
    res = subprocess.run(
        [sys.executable, "-m", "prunepeft", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in res.stdout and "hybrid pruning" in res.stdout
