"""Several processes (gloo on CPU, 2 processes spawned by the test): a data-parallel search decides what
one process decides with the same global batch, every rank holds bit-identical parameters after every
round, ranks that disagree fail loudly on every rank, and the Trainer callback keeps the same set."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(n=6, bs=8, seq=12, seed=0, labels=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (bs, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, labels, (bs,), generator=g)})  # fmt: skip
    return out


def _config():
    from prunepeft import SpaceConfig
    from prunepeft.api import SearchConfig

    space = SpaceConfig(lora_targets=("q", "k", "v", "o"), serial_adapter_targets=("ffn",), adapter_width=8,
                        trainable_modules=())  # fmt: skip
    return SearchConfig(space=space, budget=2000, granularity="block", rounds=3, steps_per_round=3, warmup_steps=3,
                        final_steps=3, round_eval_examples=None, lr=1e-2, val_examples=8)  # fmt: skip


def _search(
    out_path: str,
    inject: bool = False,
    output_dir: str | None = None,
    kill: bool = False,
    resume: bool = False,
) -> None:
    """One rank's (or the only process's) search; writes what it decided to ``out_path``."""
    sys.path.insert(0, str(HERE))
    from conftest import tiny_model

    from prunepeft import distributed as dist
    from prunepeft.api import search
    from prunepeft.pruner import Pruner

    torch.set_num_threads(1)
    rank, _ = dist.world()
    checksums = []
    orig = Pruner._prune_round

    def recorded(self, optimizer):
        if kill and len(self.history) == 1:
            raise KeyboardInterrupt  # every rank dies at the same point, after round 1's state was written
        if inject and rank == 1 and len(self.history) == 1:
            with torch.no_grad():
                self.handle.bank.flat.add_(1e-3)  # one rank drifts: the next check must catch it
        rec = orig(self, optimizer)
        checksums.append(dist.checksum(self.handle.bank.flat))
        return rec

    Pruner._prune_round = recorded
    model, _ = tiny_model("bert")
    data = _batches()
    try:
        res = search(model, data, data[:2], _config(), log=None, output_dir=output_dir, resume=resume)
        out = {"kept": res.kept, "assignment": res.assignment, "losses": [h["loss"] for h in res.history],
               "final_loss": res.final["loss"], "checksums": checksums, "params": res.params}  # fmt: skip
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the test reads what happened
        out = {"error": type(e).__name__, "message": str(e)}
    Path(out_path).write_text(json.dumps(out))


def _rank_main(rank: int, world: int, port: int, out_dir: str, inject: bool, kw: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _search(os.path.join(out_dir, f"rank{rank}.json"), inject, **kw)
    finally:
        torch.distributed.destroy_process_group()


def _run_ranks(tmp_path: Path, inject: bool = False, **kw) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(tmp_path), inject, kw)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_process_search_equals_one_process(tmp_path):
    _search(str(tmp_path / "single.json"))
    single = json.loads((tmp_path / "single.json").read_text())
    ranks = _run_ranks(tmp_path)
    for r in ranks:
        assert "error" not in r, r
        assert r["kept"] == single["kept"] and r["assignment"] == single["assignment"]
        assert r["params"] == single["params"] <= 2000
        torch.testing.assert_close(
            torch.tensor(r["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-5
        )
    # both ranks hold bit-identical bank parameters after every round
    assert ranks[0]["checksums"] == ranks[1]["checksums"] and len(ranks[0]["checksums"]) == 3
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["final_loss"] == ranks[1]["final_loss"]


def test_two_process_resume_after_kill(tmp_path):
    out = str(tmp_path / "search")
    killed = _run_ranks(tmp_path, output_dir=out, kill=True)
    assert all(r.get("error") == "KeyboardInterrupt" for r in killed)
    assert (tmp_path / "search" / "state" / "progress.json").exists()  # rank 0 wrote it
    resumed = _run_ranks(tmp_path, output_dir=out, resume=True)
    single = tmp_path / "single.json"
    _search(str(single))
    want = json.loads(single.read_text())
    for r in resumed:
        assert "error" not in r, r
        assert r["kept"] == want["kept"] and r["assignment"] == want["assignment"]
    assert (tmp_path / "search" / "result.json").exists() and not (tmp_path / "search" / "state").exists()


def test_ranks_that_disagree_fail_on_every_rank(tmp_path):
    ranks = _run_ranks(tmp_path, inject=True)
    for r in ranks:
        assert r.get("error") == "RankMismatchError", r
        assert "ranks disagree on the bank's parameters after round 2" in r["message"]


def test_sharded_models_are_refused():
    from torch import nn

    from prunepeft import distributed as dist

    class FSDPModule(nn.Module):  # what FSDP2's fully_shard mixes into a module's class
        pass

    m = nn.Sequential(FSDPModule(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="FSDP is not supported"):
        dist.reject_sharded(m)
    lin = nn.Linear(2, 2)
    lin.weight.ds_id = 3  # DeepSpeed ZeRO-3 marks its partitioned parameters
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3"):
        dist.reject_sharded(lin)


def test_batch_that_does_not_split_is_a_clear_error():
    from prunepeft import distributed as dist

    with pytest.raises(ValueError, match="divisible by the number of processes"):
        list(dist.shard(_batches(n=1, bs=5), 0, 2))


def test_torchrun_launch(tmp_path, nproc=2):
    """``torchrun --nproc_per_node N`` on a script that calls search(): the process group comes from the
    environment, rank 0 alone writes the output directory."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, json, torch\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from test_distributed import _batches, _config\n"
        "from conftest import tiny_model\n"
        "from prunepeft.api import search\n"
        "torch.set_num_threads(1)\n"
        "model, _ = tiny_model('bert')\n"
        "data = _batches()\n"
        f"res = search(model, data, data[:2], _config(), output_dir={str(tmp_path / 'out')!r}, log=print)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
           str(_free_port()), str(script)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "result.json").exists()
    assert res.stdout.count("prunepeft search:") == 1  # rank 0 alone prints
    assert not list((tmp_path / "out").glob(".prunepeft_write_test*"))


_TRAINER_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {here!r})
from conftest import tiny_model
from test_callback import _batches, _cfg
from transformers import Trainer, TrainingArguments
from prunepeft.callback import PrunePEFTCallback
from prunepeft import distributed as dist

torch.set_num_threads(1)
nproc = {nproc}
full = _batches()
# global batches of 8 rows; with 2 processes accelerate hands batch i to rank i % 2, so the dataset
# lists each global batch's two halves in turn: step t trains rank 0 on rows 0-3, rank 1 on rows 4-7
data = full if nproc == 1 else [{{k: v[h * 4:(h + 1) * 4] for k, v in b.items()}} for b in full for h in (0, 1)]

class Sequential(Trainer):
    def _get_train_sampler(self, *a, **k):
        return torch.utils.data.SequentialSampler(self.train_dataset)

model, _ = tiny_model("bert")
cb = PrunePEFTCallback(model, _cfg(space=_cfg().space.__class__(lora_targets=("q", "k", "v", "o"),
                       serial_adapter_targets=("ffn",), adapter_width=8)))  # the classifier trains too
args = TrainingArguments(output_dir={out!r}, max_steps=3 + 3 * 3 + 1, learning_rate=1e-2, warmup_steps=0,
                         per_device_train_batch_size=1, report_to=[], save_strategy="no", logging_steps=1000,
                         use_cpu=True, seed=0, dataloader_num_workers=0, ddp_backend="gloo",
                         # transformers scales a loss by the number of processes unless told not to (for token
                         # counts across devices); off, 2 processes see exactly the 1-process gradients
                         average_tokens_across_devices=False)
Sequential(model=model, args=args, train_dataset=data, data_collator=lambda xs: xs[0], callbacks=[cb]).train()
rank = dist.world()[0]
json.dump({{"kept": cb.kept(), "assignment": cb.pruner.assignment.to_dict(),
           "pruned": [h.pruned for h in cb.history], "checksum": dist.checksum(cb.handle.bank.flat)}},
          open({out!r} + f"/rank{{rank}}.json", "w"))
if torch.distributed.is_initialized():  # the Trainer's group: ended by the script, as torch asks
    torch.distributed.destroy_process_group()
"""


def test_trainer_callback_under_two_processes_keeps_the_same_set(tmp_path):
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        out.mkdir()
        script = tmp_path / f"trainer{nproc}.py"
        script.write_text(_TRAINER_SCRIPT.format(here=str(HERE), nproc=nproc, out=str(out)))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
               str(_free_port()), str(script)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        results[nproc] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    one, (r0, r1) = results[1][0], results[2]
    assert r0["checksum"] == r1["checksum"]  # replicas stayed identical through every compaction
    for r in (r0, r1):
        assert (
            r["kept"] == one["kept"] and r["pruned"] == one["pruned"] and r["assignment"] == one["assignment"]
        )


def test_cli_search_under_torchrun(tmp_path, glue_dir):
    """``torchrun -m prunepeft search``: two ranks, one output directory written by rank 0."""
    import transformers as T
    from conftest import minilm_path

    model_dir = tmp_path / "tiny"
    torch.manual_seed(0)
    T.BertForSequenceClassification(T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64,
                                                 max_position_embeddings=64)).save_pretrained(model_dir)  # fmt: skip
    T.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model_dir)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "prunepeft", "search", "--model", str(model_dir), "--train", str(glue_dir / "RTE" / "train.tsv"),
           "--eval", str(glue_dir / "RTE" / "dev.tsv"), "--out", str(out), "--max-examples", "64",
           "--max-length", "32", "--batch-size", "8", "--rounds", "2", "--steps-per-round", "2",
           "--warmup-steps", "2", "--final-steps", "2", "--budget", "3000", "--quiet"]  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["params"] <= 3000 and (out / "cli_args.json").exists()
    assert res.stdout.count("found configuration:") == 1  # rank 0 alone prints the summary


def test_the_group_init_from_env_creates_is_destroyed_at_exit(monkeypatch):
    """Left to interpreter teardown, gloo's threads can abort a finished run ("terminate called without
    an active exception"): the group prunepeft initialised is destroyed by an exit handler; a group
    that exists already is not prunepeft's to end."""
    from prunepeft import distributed as dist

    state = {"up": False, "destroyed": 0}
    handlers = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "initialized", lambda: state["up"])
    monkeypatch.setattr(dist, "world", lambda: (0, 2))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: state.update(up=True))
    monkeypatch.setattr(
        torch.distributed, "destroy_process_group", lambda: state.update(up=False, destroyed=1)
    )
    monkeypatch.setattr(dist.atexit, "register", handlers.append)
    assert dist.init_from_env() and state["up"] and handlers == [dist._destroy_at_exit]
    handlers[0]()
    assert state == {"up": False, "destroyed": 1}
    handlers[0]()  # already destroyed (or by the user's script): nothing more happens
    assert state["destroyed"] == 1
    state["up"] = True
    monkeypatch.setattr(sys, "last_value", RuntimeError("a rank failed"), raising=False)
    handlers[0]()  # after an uncaught exception: no destroy (other ranks may wait in a collective)
    assert state == {"up": True, "destroyed": 1}
    monkeypatch.delattr(sys, "last_value")
    # a group someone else created: no handler
    assert dist.init_from_env() and len(handlers) == 1
