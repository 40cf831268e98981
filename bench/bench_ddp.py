"""One process vs two (torch.distributed, gloo on CPU) for the same search (several-processes issue).

all-MiniLM-L6-v2 on a real task's training pool, the library's default search with ``--final-steps``
final steps and a global batch of 16: once in one process, once in two (each trains on its 8-row
shard of every global batch; gradients averaged). Reports both kept sets, the round losses and the
wall time of each, and appends a row per run to ``bench/results/ddp.csv``.

MiniLM trains with dropout 0.1: each process draws the masks of its own shard, so one process and two
do not see the same masks (as with any data-parallel training) and their runs drift apart like two
seeds. ``--no-dropout`` sets every dropout probability to 0: then the two runs compute the same
gradients up to the order of the sums, and should keep the same set.

    python bench/bench_ddp.py [--task SST-2] [--final-steps 20] [--threads 1] [--no-dropout]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _run(out: str, task_name: str, final_steps: int, threads: int, dropout: bool = True) -> None:
    import tasks as T
    import torch
    from bench_quality import _load_model

    from prunepeft import distributed as dist
    from prunepeft.api import SearchConfig, search

    torch.set_num_threads(threads)
    task = T.load(task_name)
    model, tok = _load_model(task.num_labels if task.kind == "classification" else 1, 0)
    if not dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    cfg = SearchConfig(
        final_steps=final_steps, lr=1e-3, seed=0, max_length=64, val_examples=400, batch_size=16
    )
    t0 = time.perf_counter()
    res = search(model, task, config=cfg, tokenizer=tok, log=None)
    wall = time.perf_counter() - t0
    rank, n = dist.world()
    Path(out).write_text(json.dumps({"rank": rank, "processes": n, "wall_s": wall, "kept": res.kept,
                                     "losses": [h["loss"] for h in res.history], "final_loss": res.final["loss"],
                                     "params": res.params, "metrics": res.final["metrics"],
                                     "checksum": dist.checksum(res.handle.bank.flat)}))  # fmt: skip


def _rank(
    rank: int, port: int, out_dir: str, task: str, final_steps: int, threads: int, dropout: bool
) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _run(os.path.join(out_dir, f"rank{rank}.json"), task, final_steps, threads, dropout)
    finally:
        torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="SST-2")
    ap.add_argument("--final-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-dropout", action="store_true", help="every dropout probability 0")
    args = ap.parse_args()
    dropout = not args.no_dropout
    from common import append_rows, versions

    tmp = tempfile.mkdtemp()
    single = os.path.join(tmp, "single.json")
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_run, args=(single, args.task, args.final_steps, args.threads, dropout))
    p.start()
    p.join()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_rank, args=(r, port, tmp, args.task, args.final_steps, args.threads, dropout))
        for r in range(2)
    ]
    for q in procs:
        q.start()
    for q in procs:
        q.join()
    one = json.loads(Path(single).read_text())
    two = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
    same = all(t["kept"] == one["kept"] for t in two)
    print(
        f"1 process : {one['wall_s']:.1f} s, round losses {[round(x, 4) for x in one['losses']]}, {one['params']:,} params"
    )
    for t in two:
        print(
            f"2 processes, rank {t['rank']}: {t['wall_s']:.1f} s, round losses {[round(x, 4) for x in t['losses']]}"
        )
    diff = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], two[0]["losses"], strict=True))
    print(f"same kept set: {same}; ranks bit-identical: {two[0]['checksum'] == two[1]['checksum']}; "
          f"largest relative round-loss difference 1 vs 2 processes: {diff:.2e}")  # fmt: skip
    rows = [{"task": args.task, "processes": r["processes"], "rank": r["rank"], "wall_s": round(r["wall_s"], 1),
             "round_losses": ";".join(f"{x:.5f}" for x in r["losses"]), "final_loss": round(r["final_loss"], 5),
             "params": r["params"], "same_kept_as_1": all(t["kept"] == one["kept"] for t in two),
             "threads_per_process": args.threads, "final_steps": args.final_steps, "dropout": dropout,
             "ranks_bit_identical": two[0]["checksum"] == two[1]["checksum"], "max_loss_rel_diff": f"{diff:.2e}", "versions": versions()}
            for r in (one, *two)]  # fmt: skip
    print("wrote", append_rows("ddp", rows))


if __name__ == "__main__":
    main()
