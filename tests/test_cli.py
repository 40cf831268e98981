"""The `prunepeft` command on the real all-MiniLM-L6-v2 and real GLUE / BBC News data (small runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SHARED_DATA

from prunepeft.cli import main
from prunepeft.demo import DemoConfig, load_bbc_news, run

RTE = SHARED_DATA / "glue" / "RTE"
SMALL = ["--max-examples", "48", "--max-length", "32", "--batch-size", "8", "--rounds", "2", "--steps-per-round", "2",
         "--warmup-steps", "2", "--final-steps", "2", "--quiet"]  # fmt: skip


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends: reference" in out and "llama" in out and "taylor" in out


def test_help_is_readable():
    res = subprocess.run(
        [sys.executable, "-m", "prunepeft", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in res.stdout and "search" in res.stdout and "hybrid pruning" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "prunepeft", "search", "--help"], capture_output=True, text=True, check=True
    )
    assert "--budget" in res.stdout and "--resume" in res.stdout and "granularity" in res.stdout


def test_bbc_news_loads_in_a_fixed_order():
    texts, labels, classes = load_bbc_news()
    assert len(texts) == 2225 and classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert sorted(set(labels)) == [0, 1, 2, 3, 4]
    assert load_bbc_news()[0][:3] == texts[:3]


def test_quick_demo_runs_a_real_search_and_a_baseline():
    lines = []
    cfg = DemoConfig(train_docs=64, test_docs=24, max_length=32, batch_size=8, final_steps=2,
                     search={"warmup_steps": 2, "rounds": 2, "steps_per_round": 2, "round_eval_examples": 8})  # fmt: skip
    out = run(cfg, log=lines.append)
    assert out["params"] <= out["budget"] == out["baseline_params"] == 73_728
    assert [h["round"] for h in out["history"]] == [1, 2]
    assert 0.0 <= out["accuracy"] <= 1.0 and 0.0 <= out["baseline_accuracy"] <= 1.0 and out["kept"]
    assert any(line.startswith("held-out accuracy: prunepeft") for line in lines)


def test_search_export_eval_train_report(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["search", "--model", "minilm", "--train", str(RTE / "train.tsv"), "--eval", str(RTE / "dev.tsv"),
               "--out", str(out), "--granularity", "block", *SMALL])  # fmt: skip
    assert rc == 0
    for f in ("result.json", "report.md", "report.png", "weights/prunepeft_config.json"):
        assert (out / f).exists(), f
    result = json.loads((out / "result.json").read_text())
    assert result["params"] <= result["budget"] and result["task"]["label_names"] == [
        "entailment",
        "not_entailment",
    ]
    assert "Kept modules" in (out / "report.md").read_text()
    # the default space has serial adapters: auto export picks prunepeft's format
    assert main(["export", "--model", "minilm", "--result", str(out), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "prunepeft_config.json").exists()
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                "minilm",
                "--result",
                str(out),
                "--eval",
                str(RTE / "dev.tsv"),
                "--max-length",
                "32",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(result["final"]["metrics"]["accuracy"], abs=1e-6)
    assert main(["train", "--model", "minilm", "--result", str(out), "--train", str(RTE / "train.tsv"),
                 "--out", str(tmp_path / "trained"), "--steps", "2", "--max-examples", "16", "--max-length", "32",
                 "--batch-size", "8"]) == 0  # fmt: skip
    assert (tmp_path / "trained" / "weights" / "prunepeft_config.json").exists()
    (out / "report.png").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.png").exists()


def test_lora_only_search_exports_to_peft(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prunepeft.demo import _minilm

    out = tmp_path / "run"
    rc = main(["search", "--model", "minilm", "--train", str(RTE / "train.tsv"), "--eval", str(RTE / "dev.tsv"),
               "--out", str(out), "--serial-adapters", "--lora-targets", "q", "k", "v", "o", "--lora-rank", "8",
               "--granularity", "both", *SMALL])  # fmt: skip
    assert rc == 0
    assert main(["export", "--model", "minilm", "--result", str(out), "--out", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["target_modules"] and 0 not in cfg["rank_pattern"].values()
    path = _minilm()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["A man is playing a guitar."], ["Someone plays music."], return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    import prunepeft

    ours_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    prunepeft.load(ours_model, out / "weights")
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(**enc).logits, ours_model.eval()(**enc).logits, rtol=1e-5, atol=1e-5
        )


def test_resume_via_cli(tmp_path, monkeypatch):
    from prunepeft.pruner import Pruner

    out = tmp_path / "run"
    args = ["search", "--model", "minilm", "--train", str(RTE / "train.tsv"), "--eval", str(RTE / "dev.tsv"),
            "--out", str(out), *SMALL]  # fmt: skip
    original = Pruner._prune_round
    calls = {"n": 0}

    def ctrl_c(self, optimizer):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, optimizer)

    monkeypatch.setattr(Pruner, "_prune_round", ctrl_c)
    assert main(args) == 130
    assert (out / "state" / "progress.json").exists() and not (out / "result.json").exists()
    monkeypatch.setattr(Pruner, "_prune_round", original)
    assert main(["search", "--resume", str(out)]) == 0
    assert (out / "result.json").exists() and not (out / "state").exists()


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--label-column", "nope"], "nope"),
        (["--budget", "99999999"], "above the supernet"),
        (["--budget", "3"], "below one block"),
    ],
)
def test_search_bad_inputs_exit_cleanly(tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    rc = main(
        ["search", "--model", "minilm", "--train", str(RTE / "train.tsv"), "--out", str(out), *SMALL, *extra]
    )
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not (out / "result.json").exists()


def test_single_class_and_missing_model(tmp_path, capsys):
    data = tmp_path / "one.tsv"
    data.write_text("sentence\tlabel\na\t1\nb\t1\n")
    rc = main(["search", "--model", "minilm", "--train", str(data), "--out", str(tmp_path / "o"), *SMALL])
    assert rc == 2 and "at least 2 classes" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a local directory"):
        main(["search", "--model", "no/such/model", "--train", str(data), "--out", str(tmp_path / "o2")])
