"""The `prunepeft` command on the real all-MiniLM-L6-v2 with real text: GLUE-layout files written from BBC
News by the ``glue_dir`` fixture, and small files in other GLUE / SuperGLUE layouts written here."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from prunepeft import cli
from prunepeft.cli import main
from prunepeft.config import SearchConfig
from prunepeft.demo import DemoConfig, load_bbc_news, run
from prunepeft.space import SpaceConfig

DATA = ["--max-examples", "48", "--max-length", "32", "--batch-size", "8"]
SMALL = [
    *DATA,
    "--rounds",
    "2",
    "--steps-per-round",
    "2",
    "--warmup-steps",
    "2",
    "--final-steps",
    "2",
    "--quiet",
]
LORA_QV = 2 * 6 * 8 * (384 + 384)  # LoRA r=8 on q,v of MiniLM's 6 layers: 73,728
BUDGET_MESSAGE = "is not an integer number of parameters (73728), a percentage ('0.5%') or a fraction below 1"


def _rte(glue_dir: Path) -> list[str]:
    return ["--train", str(glue_dir / "RTE" / "train.tsv"), "--eval", str(glue_dir / "RTE" / "dev.tsv")]


def _sst2(glue_dir: Path) -> list[str]:
    return ["--train", str(glue_dir / "SST-2" / "train.tsv"), "--eval", str(glue_dir / "SST-2" / "dev.tsv")]


def _printed_config(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def search_run(glue_dir, tmp_path_factory):
    """One tiny block-granularity search on the RTE-layout files (0.05% of MiniLM's parameters)."""
    out = tmp_path_factory.mktemp("search") / "run"
    rc = main(["search", "--model", "minilm", *_rte(glue_dir), "--out", str(out), "--granularity", "block",
               "--budget", "0.05%", *SMALL])  # fmt: skip
    assert rc == 0
    return out


# ------------------------------------------------------------------------------------------------ basics


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends: reference" in out and "llama" in out and "taylor" in out


def test_help_is_readable(capsys):
    for argv in (["--help"], ["search", "--help"], ["train", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "hybrid pruning" in out and "the uniform LoRA baseline" in out
    for flag in ("--budget", "--resume", "granularity", "--config", "--print-config", "--stats-ema", "--dtype",
                 "--load-in-4bit", "--no-load-in-4bit", "--steps", "--max-examples"):  # fmt: skip
        assert flag in out, flag


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
    assert out["params"] <= out["budget"] == out["baseline_params"] == LORA_QV
    assert [h["round"] for h in out["history"]] == [1, 2]
    assert 0.0 <= out["accuracy"] <= 1.0 and 0.0 <= out["baseline_accuracy"] <= 1.0 and out["kept"]
    assert any(line.startswith("held-out accuracy: prunepeft") for line in lines)


# ------------------------------------------------------------------------------------------------ search and the result


def test_search_export_eval_train_report(search_run, glue_dir, tmp_path, capsys, monkeypatch):
    out = search_run
    for f in ("result.json", "report.md", "report.png", "weights/prunepeft_config.json", "cli_args.json"):
        assert (out / f).exists(), f
    result = json.loads((out / "result.json").read_text())
    assert result["params"] <= result["budget"] == int(0.0005 * result["base_params"])
    assert result["task"]["label_names"] == ["entailment", "not_entailment"]
    assert result["config"]["max_length"] == 32 and result["config"]["budget"] == "0.05%"
    assert "Kept modules" in (out / "report.md").read_text()
    # auto export: peft's format when only LoRA survived, else prunepeft's
    assert main(["export", "--model", "minilm", "--result", str(out), "--out", str(tmp_path / "exp")]) == 0
    kinds = {k["kind"] for k in result["kept"]}
    assert kinds and kinds <= {"lora", "serial_adapter"}
    made = "adapter_config.json" if kinds == {"lora"} else "prunepeft_config.json"
    assert (tmp_path / "exp" / made).exists(), (kinds, sorted(p.name for p in (tmp_path / "exp").iterdir()))

    # eval reads the search's data settings (max_length 32, label order) from result.json
    import prunepeft.taskdata as taskdata

    seen = []
    real = taskdata.prepare_data
    monkeypatch.setattr(taskdata, "prepare_data", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    capsys.readouterr()
    assert (
        main(["eval", "--model", "minilm", "--result", str(out), "--eval", str(glue_dir / "RTE" / "dev.tsv")])
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(result["final"]["metrics"]["accuracy"], abs=1e-6)
    assert seen[-1].max_length == 32 and seen[-1].eval_batch_size == 64
    # --max-examples limits what is evaluated; one example of one class still evaluates (label order saved)
    assert main(["eval", "--model", "minilm", "--result", str(out), "--eval", str(glue_dir / "RTE" / "dev.tsv"),
                 "--max-examples", "1", "--max-length", "16"]) == 0  # fmt: skip
    one = json.loads(capsys.readouterr().out)
    assert one["accuracy"] in (0.0, 1.0) and seen[-1].max_length == 16

    # train the found configuration again: data settings default to the search's
    trained = tmp_path / "trained"
    assert main(["train", "--model", "minilm", "--result", str(out), "--train", str(glue_dir / "RTE" / "train.tsv"),
                 "--out", str(trained), "--steps", "2", "--max-examples", "16", "--quiet"]) == 0  # fmt: skip
    record = json.loads((trained / "train.json").read_text())
    assert (trained / "weights" / "prunepeft_config.json").exists()
    assert record["config"]["max_length"] == 32 and record["config"]["batch_size"] == 8
    assert record["config"]["final_steps"] == 2 and record["result"] == str(out)
    assert record["params"] == result["params"] and set(record["val_metrics"]) == {
        "accuracy",
        "f1",
        "matthews",
    }
    (out / "report.png").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.png").exists()


def test_lora_only_search_exports_to_peft(glue_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prunepeft.demo import _minilm

    out = tmp_path / "run"
    rc = main(["search", "--model", "minilm", *_rte(glue_dir), "--out", str(out), "--serial-adapters",
               "--lora-targets", "q", "k", "v", "o", "--lora-rank", "8", "--granularity", "both",
               "--budget", "0.003", *SMALL])  # fmt: skip
    assert rc == 0
    assert json.loads((out / "result.json").read_text())["budget"] == int(0.003 * 22_713_986)
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


def test_resume_via_cli(glue_dir, tmp_path, monkeypatch, capsys):
    from prunepeft.pruner import Pruner

    out = tmp_path / "run"
    args = ["search", "--model", "minilm", *_rte(glue_dir), "--out", str(out), *SMALL]
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
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(Pruner, "_prune_round", original)
    assert main(["search", "--resume", str(out), "--lr", "0.1"]) == 2  # the saved config is not changed
    assert "drop --lr" in capsys.readouterr().err
    assert main(args) == 2 and "holds an interrupted search" in capsys.readouterr().err
    assert main(["search", "--resume", str(out)]) == 0
    assert (out / "result.json").exists() and not (out / "state").exists()


# ------------------------------------------------------------------------------------------------ train a fixed configuration


def test_train_a_uniform_baseline_without_a_search(glue_dir, tmp_path):
    """The real command in a subprocess: uniform LoRA r=8 on q,v, no --result; then eval and export it."""
    out = tmp_path / "lora"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "prunepeft", "train", "--model", "minilm", *_sst2(glue_dir),
                          "--out", str(out), "--lora-targets", "q", "v", "--lora-rank", "8", "--steps", "2", *DATA],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"trained {LORA_QV:,} parameters" in res.stdout
    record = json.loads((out / "train.json").read_text())
    assert record["params"] == LORA_QV and record["result"] is None and record["steps"] == 2
    assert set(record["metrics"]) == set(record["val_metrics"]) == {"accuracy", "f1", "matthews"}
    assert record["config"]["space"]["serial_adapter_targets"] == []  # only the kinds named are attached
    assert record["task"]["label_names"] == ["0", "1"]
    assert main(["eval", "--model", "minilm", "--result", str(out), "--eval", str(glue_dir / "SST-2" / "dev.tsv"),
                 "--max-examples", "8"]) == 0  # fmt: skip
    assert main(["export", "--model", "minilm", "--result", str(out), "--out", str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 8


def test_train_needs_a_configuration_and_keeps_result_space(tmp_path, capsys):
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\na\t0\nb\t1\n")
    base = ["train", "--model", "minilm", "--train", str(data), "--out", str(tmp_path / "o")]
    assert main(base) == 2 and "nothing to train: give --result DIR" in capsys.readouterr().err
    fake = tmp_path / "search"
    fake.mkdir()
    task = {"kind": "classification", "label_names": ["0", "1"]}
    (fake / "result.json").write_text(json.dumps({"config": SearchConfig().to_dict(), "task": task}))
    assert main([*base, "--result", str(fake), "--lora-rank", "4"]) == 2
    assert "drop --lora-rank" in capsys.readouterr().err
    assert main([*base, "--result", str(tmp_path)]) == 2
    assert "not an output directory of `prunepeft search` or `prunepeft train`" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    cfg = _printed_config(capsys, [*base, "--result", str(fake), "--print-config", "--steps", "7", "--init",
                                   "continue"])  # fmt: skip
    assert cfg["final_steps"] == 7 and cfg["final_init"] == "continue"


def test_load_in_4bit_for_train_eval_export(glue_dir, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    loaded = []
    real = cli._load_model

    def spy(name, task, load_in_4bit=False, seed=0, val_examples=None):
        model, tok = real(name, task, load_in_4bit, seed, val_examples)
        loaded.append(any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()))
        return model, tok

    monkeypatch.setattr(cli, "_load_model", spy)
    out = tmp_path / "q4"
    assert main(["train", "--model", "minilm", *_sst2(glue_dir), "--out", str(out), "--lora-targets", "q", "v",
                 "--steps", "2", "--load-in-4bit", "--quiet", *DATA]) == 0  # fmt: skip
    assert json.loads((out / "train.json").read_text())["load_in_4bit"] is True
    eval_args = ["eval", "--model", "minilm", "--result", str(out), "--eval", str(glue_dir / "SST-2" / "dev.tsv"),
                 "--max-examples", "8"]  # fmt: skip
    assert main(eval_args) == 0  # 4-bit by default: the run was
    assert main([*eval_args, "--no-load-in-4bit"]) == 0
    assert main(["export", "--model", "minilm", "--result", str(out), "--out", str(tmp_path / "e"),
                 "--load-in-4bit"]) == 0  # fmt: skip
    assert loaded == [True, True, False, True]


# ------------------------------------------------------------------------------------------------ budget and config


@pytest.mark.parametrize("budget, value", [("0.5%", "0.5%"), ("0.005", "0.005"), ("73728", 73728),
                                           ("73,728", 73728), ("73_728", 73728)])  # fmt: skip
def test_budget_forms(capsys, budget, value):
    assert _printed_config(capsys, ["search", "--print-config", "--budget", budget])["budget"] == value


def test_search_defaults_are_the_apis(capsys):
    """With no flag, ``prunepeft search`` runs what ``search()`` runs: the same config, the same space."""
    cfg = _printed_config(capsys, ["search", "--print-config"])
    assert cfg == json.loads(json.dumps(SearchConfig().to_dict()))
    cfg = _printed_config(capsys, ["search", "--print-config", "--lora-targets", "q", "v"])
    assert cfg["space"]["lora_targets"] == ["q", "v"]  # a flag changes its field of the default space only
    assert cfg["space"]["serial_adapter_targets"] == list(SearchConfig().space.serial_adapter_targets)


@pytest.mark.parametrize("budget", ["lots", "1.5", "-3", "0", "150%", "abc%", "1e"])
def test_bad_budget_fails_before_writing(glue_dir, tmp_path, capsys, budget):
    out = tmp_path / "run"
    rc = main(["search", "--model", "minilm", *_rte(glue_dir), "--out", str(out), "--budget", budget, *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "prunepeft: error: budget " in err  # resolve_budget's message, naming the value
    assert BUDGET_MESSAGE in err and "invalid literal" not in err
    assert not out.exists()


def test_config_file_yaml_and_json_with_flags_overriding(tmp_path, capsys):
    yml = tmp_path / "c.yaml"
    yml.write_text("budget: 0.5%\nlr: 1e-3\nrounds: 3\nstrategy: taylor\nspace:\n  lora_targets: [q, k, v, o]\n"
                   "  lora_rank: 16\n  serial_adapter_targets: [attn, ffn]\n  depth_partitions: ['0.3', 0.6]\n")  # fmt: skip
    cfg = _printed_config(
        capsys, ["search", "--print-config", "--config", str(yml), "--rounds", "5", "--seed", "4"]
    )
    assert cfg["budget"] == "0.5%" and cfg["lr"] == 0.001 and cfg["strategy"] == "taylor"
    assert cfg["rounds"] == 5 and cfg["seed"] == 4 and cfg["space"]["seed"] == 4  # the flags given win
    assert cfg["space"]["lora_targets"] == ["q", "k", "v", "o"] and cfg["space"]["lora_rank"] == 16
    assert cfg["space"]["lora_alpha"] == 32.0 and cfg["space"]["depth_partitions"] == [0.3, 0.6]
    assert cfg["warmup_steps"] == SearchConfig().warmup_steps  # neither in the file nor given: the default
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"granularity": "both", "space": {"block_size": 2, "lora_rank": 4}}))
    cfg = _printed_config(capsys, ["search", "--print-config", "--config", str(js), "--lora-rank", "6"])
    assert cfg["granularity"] == "both" and cfg["space"]["block_size"] == 2 and cfg["space"]["lora_rank"] == 6


def test_config_file_errors_name_the_bad_keys(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.01\nrounds_: 3\nlora_rank: 4\nspace:\n  lora_rnk: 16\n")
    assert main(["search", "--print-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown SearchConfig keys" in err and "'rounds_' (did you mean 'rounds'?)" in err
    assert "'lora_rank' (a SpaceConfig field: put it under 'space:')" in err
    bad.write_text("space:\n  lora_rnk: 16\n")
    assert main(["search", "--print-config", "--config", str(bad)]) == 2
    assert "unknown space keys: 'lora_rnk' (did you mean 'lora_rank'?)" in capsys.readouterr().err
    bad.write_text("lr: [1, 2\n")
    assert main(["search", "--print-config", "--config", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    bad.write_text("lr: fast\n")
    assert main(["search", "--print-config", "--config", str(bad)]) == 2
    assert "config key 'lr': 'fast' is not a number" in capsys.readouterr().err
    assert main(["search", "--print-config", "--config", str(tmp_path / "none.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["search", "--print-config", "--granularity", "block", "--block-size", "3"]) == 2
    assert "not divisible by block_size 3" in capsys.readouterr().err


def test_every_config_field_is_reachable(tmp_path, capsys):
    """Every SearchConfig and SpaceConfig field has a flag, and a file setting all of them round-trips."""
    flags = {f.field for f in cli.CONFIG_FLAGS}
    assert flags == ({f.name for f in fields(SearchConfig)} | {f.name for f in fields(SpaceConfig)}) - {
        "space"
    }
    custom = SearchConfig(
        space=SpaceConfig(lora_targets=("q",), lora_rank=4, lora_alpha=3.0, serial_adapter_targets=("attn",),
                          parallel_adapter_targets=("up",), adapter_width=8, adapter_activation="gelu", block_size=2,
                          layers=[0, 1], depth_partitions=(0.4,), trainable_modules=["classifier"],
                          layers_path="encoder.layer", sites={"q": "attention.self.query"}, dtype="bfloat16", seed=5),
        budget="0.2%", strategy="random", granularity="both", rounds=2, steps_per_round=3, warmup_steps=4,
        schedule="cubic", threshold=0.01, stats_ema=0.5, adalora_betas=(0.5, 0.6), normalise="rank",
        hybrid_criteria=("taylor", "fisher"), seed=7, lr=0.02, weight_decay=0.1, lr_warmup_ratio=0.1,
        max_grad_norm=2.0, grad_accum=2, batch_size=4, eval_batch_size=8, max_length=16, precision="fp32",
        warmup_subset=10, final_steps=3, final_init="continue", final_lr=0.03, val_examples=0.2,
        round_eval_examples=5, max_bad_steps=3, task_kind="regression",
    )  # fmt: skip
    expected = json.loads(json.dumps(custom.to_dict()))
    path = tmp_path / "all.json"
    path.write_text(json.dumps(expected))
    assert _printed_config(capsys, ["search", "--print-config", "--config", str(path)]) == expected
    argv = ["search", "--print-config", "--budget", "0.2%", "--strategy", "random", "--granularity", "both",
            "--rounds", "2", "--steps-per-round", "3", "--warmup-steps", "4", "--schedule", "cubic",
            "--threshold", "0.01", "--stats-ema", "0.5", "--adalora-betas", "0.5", "0.6", "--normalise", "rank",
            "--hybrid-criteria", "taylor", "fisher", "--lr", "0.02", "--weight-decay", "0.1",
            "--lr-warmup-ratio", "0.1", "--max-grad-norm", "2", "--grad-accum", "2", "--batch-size", "4",
            "--eval-batch-size", "8", "--max-length", "16", "--precision", "fp32", "--warmup-subset", "10",
            "--final-steps", "3", "--final-init", "continue", "--final-lr", "0.03", "--val-examples", "0.2",
            "--round-eval-examples", "5", "--max-bad-steps", "3", "--task-kind", "regression",
            "--lora-targets", "q", "--lora-rank", "4", "--lora-alpha", "3", "--serial-adapters", "attn",
            "--parallel-adapters", "up", "--adapter-width", "8", "--adapter-activation", "gelu", "--block-size",
            "2", "--layers", "0", "1", "--depth-partitions", "0.4", "--trainable-modules", "classifier",
            "--layers-path", "encoder.layer", "--sites", "q=attention.self.query", "--dtype", "bfloat16",
            "--seed", "7"]  # fmt: skip
    by_flags = _printed_config(capsys, argv)
    assert by_flags == {
        **expected,
        "space": {**expected["space"], "seed": 7, "layers_path": ["encoder.layer"]},
    }


# ------------------------------------------------------------------------------------------------ failed starts


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--label-column", "nope"], "label column 'nope' not found"),  # data: before anything is written
        (["--lora-rank", "6"], "lora_rank 6 is not divisible by block_size 4"),  # config
        (["--budget", "99999999"], "above the supernet"),  # after the model loaded: cli_args.json removed
        (["--budget", "3"], "below one block"),
    ],
)
def test_failed_search_leaves_no_output_directory(glue_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "new" / "run"
    rc = main(["search", "--model", "minilm", *_rte(glue_dir), "--out", str(out), *SMALL, *extra])
    assert rc == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_failed_start_in_an_existing_directory_removes_only_its_own_files(glue_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = main(
        ["search", "--model", "minilm", *_rte(glue_dir), "--out", str(out), "--budget", "99999999", *SMALL]
    )
    assert rc == 2 and "above the supernet" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_bad_model_and_data_fail_before_writing(tmp_path, capsys):
    data = tmp_path / "one.tsv"
    data.write_text("sentence\tlabel\na\t1\nb\t1\n")
    out = tmp_path / "o"
    rc = main(["search", "--model", "minilm", "--train", str(data), "--out", str(out), *SMALL])
    assert rc == 2 and "at least 2 classes" in capsys.readouterr().err
    rc = main(["search", "--model", "no/such/model", "--train", str(data), "--out", str(out)])
    assert rc == 2 and "model 'no/such/model' is not a local directory" in capsys.readouterr().err
    not_a_model = tmp_path / "empty_dir"
    not_a_model.mkdir()
    rc = main(
        ["train", "--model", str(not_a_model), "--train", str(data), "--out", str(out), "--lora-targets", "q"]
    )
    assert rc == 2 and "is not a transformers model directory" in capsys.readouterr().err
    rc = main(["search", "--model", "minilm", "--train", str(tmp_path / "missing.tsv"), "--out", str(out)])
    assert rc == 2 and "train file not found" in capsys.readouterr().err
    assert main(["search", "--model", "minilm", "--out", str(out)]) == 2
    assert "search: --train required" in capsys.readouterr().err
    assert not out.exists()


def test_failed_training_removes_its_output(glue_dir, tmp_path, capsys, monkeypatch):
    finetune_module = importlib.import_module("prunepeft.finetune")  # `prunepeft.finetune` is the function

    def broken(*a, **k):
        raise ValueError("the training broke")

    monkeypatch.setattr(finetune_module, "finetune", broken)
    out = tmp_path / "t"
    rc = main(
        ["train", "--model", "minilm", *_sst2(glue_dir), "--out", str(out), "--lora-targets", "q", *DATA]
    )
    assert rc == 2 and "the training broke" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------------------ data layouts


def test_glue_and_superglue_layouts_through_the_command(tmp_path, capsys):
    """CoLA's headerless TSV and SuperGLUE BoolQ's JSONL train without any column option."""
    cola, boolq = tmp_path / "CoLA", tmp_path / "BoolQ"
    cola.mkdir()
    boolq.mkdir()
    texts, labels, _ = load_bbc_news()
    lines = [t.strip().splitlines()[0] for t in texts[:: len(texts) // 24]][:24]
    (cola / "train.tsv").write_text(
        "".join(f"bbc{i}\t{i % 2}\t{'' if i % 2 else '*'}\t{s}\n" for i, s in enumerate(lines))
    )
    rows = [{"question": f"is it about {s.split()[0]}", "passage": s, "label": bool(i % 2), "idx": i}
            for i, s in enumerate(lines)]  # fmt: skip
    (boolq / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (cola / "train.tsv", boolq / "train.jsonl"):
        out = tmp_path / f"out-{path.parent.name}"
        assert main(["train", "--model", "minilm", "--train", str(path), "--out", str(out), "--lora-targets", "q",
                     "--steps", "1", "--quiet", *DATA]) == 0  # fmt: skip
        record = json.loads((out / "train.json").read_text())
        assert record["task"]["label_names"] == (
            ["0", "1"] if path.parent.name == "CoLA" else ["False", "True"]
        )
    (cola / "test.tsv").write_text("index\tsentence\n0\tBill whistled past the house.\n")
    assert main(["train", "--model", "minilm", "--train", str(cola / "test.tsv"), "--out", str(tmp_path / "x"),
                 "--lora-targets", "q"]) == 2  # fmt: skip
    assert "CoLA test files carry no labels" in capsys.readouterr().err


def test_plan_command_reads_a_config_json_alone(tmp_path, capsys):
    import transformers as T

    T.LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000).save_pretrained(tmp_path)  # fmt: skip
    assert (
        main(["plan", "--model", str(tmp_path), "--load-in-4bit", "--batch-size", "2", "--max-length", "64"])
        == 0
    )
    out = capsys.readouterr().out
    assert "Candidates by kind" in out and "Per phase, as the bank shrinks" in out and "Peak:" in out
