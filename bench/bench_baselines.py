"""Issue-5 benchmark: the search against its baselines, at equal budget, on real data (one command).

Model all-MiniLM-L6-v2 (offline). Tasks (../shared/data): GLUE RTE, STS-B (regression, Pearson), SST-2
(the first N train rows, the full dev set), AG News (the first N rows of ``agnews/alps/dev.tsv`` to
train, the first M rows of ``agnews/alps/test.tsv`` to evaluate) and BBC News
(``prunepeft.demo.bbc_task``). Budgets: ``r8`` = peft LoRA r=8 on query,value (73,728 parameters on
MiniLM) and ``r32`` = LoRA r=32 on query,value (4x). The classification / regression head trains in
every method and is not counted in ``params``.

Methods (``METHODS``):

- ``hybrid_module`` / ``hybrid_block`` / ``hybrid_both``: ``prunepeft.search``, hybrid strategy, at
  each granularity, from ``bench_search.SEARCH_SPACE`` (LoRA r=16 on q,k,v,o + serial adapters of
  width 16 after attention and FFN, block 4: 447,168 parameters), then the found configuration
  trains ``steps`` steps from re-initialised weights.
- ``crit_<name>`` (each of the 8 criteria) and ``random``: the same search with one criterion /
  random scores, at ``--ablation-granularity`` (default ``block``).
- ``no_prune``: the whole supernet trained as is (over budget: the paper's "without prune").
- ``lora_qv``: uniform LoRA on query,value at the rank of the budget (8 or 32).
- ``lora_all``: uniform LoRA on every linear of every layer (q,k,v,o,up,down), the largest rank
  whose parameter count fits the budget (rank 1 = 41,472 params at r8; rank 7 = 290,304 at r32).
- ``serial_adapter``: uniform serial (Houlsby) adapters after attention and after the FFN of every
  layer, the largest width that fits (7 = 69,204 params at r8; 31 = 290,676 at r32).
- ``adalora``: peft ``AdaLoraConfig`` on query,value with ``target_r`` = the budget's rank and
  ``init_r`` = 1.5x that (peft's 12 -> 8 ratio), so the final rank budget (target_r x modules) is
  the LoRA's: final parameters = the budget + one singular value per kept rank. Budget schedule:
  ``tinit`` = 10 %, ``tfinal`` = 30 % of the steps, ``deltaT`` = 1; ``lora_alpha`` = 2 x init_r (the
  same scale 2 as prunepeft's LoRA). Trained by ``prunepeft.train.train_steps`` (same batches, steps,
  schedule, clipping, evaluation) with ``update_and_allocate(step)`` after every optimizer step.
- ``full_ft``: every parameter trains (reference). Its learning rates are the grid times
  ``--full-ft-lr-scale`` (default 0.02: AdamW on all weights diverges at PEFT learning rates); set
  it to 1 for the literal same grid.

Every method trains ``steps`` final steps with the same loop, data order, learning-rate schedule and
evaluation as ``prunepeft.api.finetune``, and every method is run at every learning rate of the grid;
the reported learning rate is, per (method, task, budget), the one with the best mean dev metric over
the seeds -- the same rule for all methods (dev is also the reported set: GLUE test labels are not
public, so all numbers are equally optimistic).

Costs: ``seconds`` = search + final training; ``search_s`` includes the per-round evaluations on
``eval_max_examples`` examples; ``step_ms`` = final-training time per step; ``round_step_ms`` = mean
step time in each search round; ``peak_rss_mb`` = ``ru_maxrss`` of a fresh worker process per method
(it runs all of that method's rows, so it is the peak over them; every method loads the same model
and data in the same order, so the figures compare). ``--in-process`` skips the workers.

    python bench/bench_baselines.py --quick            # ~15 min on 2 cores: 1 seed, RTE + SST-2, r8, 1 lr
    python bench/bench_baselines.py                    # full: 3 seeds, 5 tasks, 2 budgets, 2 lrs (hours)
    python bench/bench_baselines.py --resume           # continue an interrupted run (skips rows in the CSV)
    python bench/bench_baselines.py --report-only      # rebuild the .md and .png from the CSV

Output: ``bench/results/baselines_<mode>.csv`` (one row per method, task, budget, seed and lr,
appended as soon as it finishes), ``baselines_<mode>.md`` (tables) and ``baselines_<mode>_*.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_search import SEARCH_SPACE  # noqa: E402
from common import RESULTS, append_rows, load_minilm, peak_rss_mb, read_rows, versions  # noqa: E402

from prunepeft.api import (  # noqa: E402
    BatchStream,
    SearchConfig,
    _prepare_data,
    default_budget,
    evaluate,
    finetune,
    search,
)
from prunepeft.criteria import CRITERIA  # noqa: E402
from prunepeft.space import SearchSpace, SpaceConfig  # noqa: E402
from prunepeft.train import TrainState, train_steps  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
HYBRID = ["hybrid_module", "hybrid_block", "hybrid_both"]
SINGLE = [f"crit_{c}" for c in CRITERIA]
PRUNEPEFT = [*HYBRID, *SINGLE, "random"]
# lora_qv first: every other method's wall time is reported as a ratio of its training time
METHODS = ["lora_qv", *PRUNEPEFT, "no_prune", "lora_all", "serial_adapter", "adalora", "full_ft"]
TASKS = ["RTE", "STS-B", "SST-2", "AGNews", "BBC"]
BUDGETS = {"r8": 8, "r32": 32}  # LoRA rank on query,value whose parameter count is the budget


@dataclass
class BaselineConfig:
    """Sizes of one benchmark run (the same for every method)."""

    mode: str = "full"
    tasks: Sequence[str] = tuple(TASKS)
    methods: Sequence[str] = tuple(METHODS)
    budgets: Sequence[str] = ("r8", "r32")
    seeds: Sequence[int] = (0, 1, 2)
    lrs: Sequence[float] = (5e-4, 2e-3)
    steps: int = 300  # final-training steps of every method
    train_examples: int = 2000  # first N train rows (SST-2, STS-B, RTE: 2490 rows, AG News)
    eval_examples: int = 2000  # AG News test rows evaluated (GLUE: the full dev set; BBC: 400 docs)
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 128
    warmup_steps: int = 16
    rounds: int = 4
    steps_per_round: int = 8
    eval_max_examples: int = 128
    ablation_granularity: str = "block"
    full_ft_lr_scale: float = 0.02
    threads: int = 0  # torch threads per worker (0: torch's default)
    search: dict = field(default_factory=dict)  # extra SearchConfig fields for every prunepeft method


# quick: 1 torch thread, because on a shared 2-core machine two OpenMP threads that spin-wait for each
# other were 8x slower per MiniLM step than one (measured 4.0 s vs 0.5 s at 16 x 64 tokens, load 5.5)
QUICK = BaselineConfig(mode="quick", tasks=("RTE", "SST-2"), budgets=("r8",), seeds=(0,), lrs=(2e-3,), steps=30,
                       train_examples=1000, eval_examples=500, batch_size=16, max_length=64, warmup_steps=4,
                       rounds=2, steps_per_round=3, eval_max_examples=16, threads=1)  # fmt: skip


# ---------------------------------------------------------------------------- tasks
def load_bench_task(name: str, cfg: BaselineConfig):
    """One of :data:`TASKS` as a :class:`prunepeft.data.Task` (fixed subsets, see the module doc)."""
    from prunepeft.data import load_task

    glue = os.path.join(SHARED, "glue")
    if name in ("RTE", "STS-B", "SST-2"):
        return load_task(train=os.path.join(glue, name, "train.tsv"), eval=os.path.join(glue, name, "dev.tsv"),
                         max_examples=cfg.train_examples)  # fmt: skip
    if name == "AGNews":
        ag = os.path.join(SHARED, "agnews", "alps")
        return load_task(train=os.path.join(ag, "dev.tsv"), eval=os.path.join(ag, "test.tsv"), header=False,
                         text_columns=("0",), label_column="1", max_examples=cfg.train_examples,
                         max_eval_examples=cfg.eval_examples)  # fmt: skip
    if name == "BBC":
        from prunepeft.demo import DemoConfig, bbc_task

        return bbc_task(DemoConfig(train_docs=min(cfg.train_examples, 1600), test_docs=400, seed=0))
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")


# ---------------------------------------------------------------------------- methods
def budget_params(model, budget_name: str) -> int:
    """The budget in parameters: LoRA of the budget's rank on the model's query and value."""
    return default_budget(SearchSpace.from_model(model, SpaceConfig())) * BUDGETS[budget_name] // 8


def fit_width(model, make_space: Callable[[int], SpaceConfig], budget: int, limit: int = 4096):
    """The largest width ``w`` whose ``make_space(w)`` has at most ``budget`` parameters: (w, space, params)."""
    best = None
    for w in range(1, limit + 1):
        space = make_space(w)
        n = SearchSpace.from_model(model, space).supernet_params()
        if n > budget:
            break
        best = (w, space, n)
    if best is None:
        raise ValueError(f"even width 1 of {make_space(1)} is over the budget {budget:,}")
    return best


UNIFORM = {  # method -> (SpaceConfig fields as a function of the width, what the width is)
    "lora_qv": (lambda r: dict(lora_targets=("q", "v"), lora_rank=r, serial_adapter_targets=()), "rank"),
    "lora_all": (lambda r: dict(lora_targets=("all",), lora_rank=r, serial_adapter_targets=()), "rank"),
    "serial_adapter": (
        lambda w: dict(lora_targets=(), serial_adapter_targets=("attn", "ffn"), adapter_width=w),
        "width",
    ),
}


def _uniform_space(method: str, model, budget: int) -> tuple[SpaceConfig, str]:
    if method == "no_prune":
        return SEARCH_SPACE, "full supernet (over budget)"
    fields_of, what = UNIFORM[method]
    w, space, n = fit_width(model, lambda w: SpaceConfig(block_size=1, **fields_of(w)), budget)
    return space, f"{what} {w} ({n:,} params)"


def search_config(
    cfg: BaselineConfig, *, lr: float, seed: int, budget: int, task_kind=None, **kw
) -> SearchConfig:
    """The SearchConfig every method's training uses (only ``strategy``/``granularity`` differ)."""
    return SearchConfig(space=SEARCH_SPACE, budget=budget, lr=lr, final_steps=cfg.steps, seed=seed,
                        batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, max_length=cfg.max_length,
                        warmup_steps=cfg.warmup_steps, rounds=cfg.rounds, steps_per_round=cfg.steps_per_round,
                        eval_max_examples=cfg.eval_max_examples, task_kind=task_kind, **{**cfg.search, **kw})  # fmt: skip


def _own_loop(model, params, data, sc: SearchConfig, lr: float, after_step=None) -> float:
    """``prunepeft.api.finetune``'s training (same stream, schedule, clipping); returns seconds."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=sc.weight_decay)
    state = TrainState()
    stream = BatchStream(data.train_epoch)
    t0 = time.perf_counter()
    train_steps(model, lambda: params, opt, stream, sc.final_steps, state, lr=lr, total_steps=sc.final_steps,
                warmup_steps=int(sc.lr_warmup_ratio * sc.final_steps), grad_accum=sc.grad_accum,
                max_grad_norm=sc.max_grad_norm, precision=sc.precision, max_bad_steps=sc.max_bad_steps,
                after_step=after_step)  # fmt: skip
    return time.perf_counter() - t0


def _adalora(model, data, sc: SearchConfig, lr: float, budget: int) -> dict:
    from peft import AdaLoraConfig, get_peft_model

    qv = [s for s in SearchSpace.from_model(model, SpaceConfig()).sites if s.role in ("q", "v")]
    target_r = budget // sum(s.in_dim + s.out_dim for s in qv)
    init_r = math.ceil(1.5 * target_r)
    steps = sc.final_steps
    acfg = AdaLoraConfig(task_type="SEQ_CLS", target_modules=sorted({s.name.rsplit(".", 1)[-1] for s in qv}),
                         init_r=init_r, target_r=target_r, lora_alpha=2 * init_r, tinit=int(0.1 * steps),
                         tfinal=int(0.3 * steps), deltaT=1, total_step=steps)  # fmt: skip
    pm = get_peft_model(model, acfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    seconds = _own_loop(pm, params, data, sc, lr, after_step=lambda s: pm.base_model.update_and_allocate(s))
    metrics = evaluate(pm, data, None)
    kept, n = 0, 0
    for mod in pm.modules():
        e = getattr(mod, "lora_E", None)
        if e is not None and "default" in e:
            k = int((e["default"] != 0).sum())
            kept += k
            n += k * (mod.in_features + mod.out_features + 1)
    note = f"init_r {init_r} -> target_r {target_r} x {len(qv)} modules; {kept} ranks kept"
    return {"metrics": metrics, "params": n, "final_s": seconds, "note": note}


def run_method(method: str, make_model: Callable[[], torch.nn.Module], train, eval_data=None, *, cfg: BaselineConfig,
               budget: int, lr: float, seed: int, tokenizer=None, task_kind: str | None = None) -> dict:  # fmt: skip
    """Train (and for prunepeft methods, search) one method once; returns its metrics and costs.

    ``make_model()`` returns a fresh model with its head; ``train``/``eval_data`` are anything
    ``prunepeft.search`` accepts (a Task, files, or lists of batches with ``task_kind``).
    Returns ``{"metrics", "primary", "params", "search_s", "final_s", "round_step_s", "note"}``.
    """
    torch.manual_seed(seed)
    model = make_model()
    out = {"search_s": 0.0, "round_step_s": [], "note": ""}
    if method in PRUNEPEFT:
        if method in HYBRID:
            strategy, gran = "hybrid", method.split("_", 1)[1]
        else:
            strategy, gran = method.removeprefix("crit_"), cfg.ablation_granularity
        sc = search_config(cfg, lr=lr, seed=seed, budget=budget, task_kind=task_kind, strategy=strategy,
                           granularity=gran)  # fmt: skip
        res = search(model, train, eval_data, config=sc, tokenizer=tokenizer, log=None)
        out.update(metrics=res.final["metrics"], params=res.params, search_s=res.search_seconds,
                   final_s=res.final["seconds"], round_step_s=[h["step_seconds"] for h in res.history],
                   note=f"{len(res.kept)} modules kept", primary=res.task["primary_metric"])  # fmt: skip
        return out
    sc = search_config(cfg, lr=lr, seed=seed, budget=budget, task_kind=task_kind)
    if method in ("lora_qv", "lora_all", "serial_adapter", "no_prune"):
        space, note = _uniform_space(method, model, budget)
        r = finetune(model, train, eval_data, config=sc, space=space, tokenizer=tokenizer, log=None)
        out.update(metrics=r["metrics"], params=r["params"], final_s=r["seconds"], note=note)
    elif method == "adalora":
        data = _prepare_data(model, train, eval_data, sc, tokenizer)
        out.update(_adalora(model, data, sc, lr, budget))
    elif method == "full_ft":
        data = _prepare_data(model, train, eval_data, sc, tokenizer)
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        flr = lr * cfg.full_ft_lr_scale
        seconds = _own_loop(model, params, data, sc, flr)
        out.update(metrics=evaluate(model, data, None), params=sum(p.numel() for p in params), final_s=seconds,
                   note=f"lr {flr:g}")  # fmt: skip
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    data_kind = task_kind or getattr(train, "kind", "classification")
    out["primary"] = {"classification": "accuracy", "regression": "pearson"}.get(data_kind, "perplexity")
    return out


# ---------------------------------------------------------------------------- the run
def _key(row) -> tuple:
    return (row["method"], row["task"], row["budget_name"], str(row["seed"]), f"{float(row['lr']):g}")


def run_worker(cfg: BaselineConfig, method: str, resume: bool) -> None:
    """All rows of one method (one process, so ``ru_maxrss`` is this method's peak)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    name = f"baselines_{cfg.mode}"
    done = {_key(r) for r in read_rows(name)} if resume else set()
    tok = None
    for task_name in cfg.tasks:
        task = load_bench_task(task_name, cfg)
        if tok is None:
            tok = load_minilm(2)[1]
        make_model = lambda task=task: load_minilm(task.num_labels)[0]  # noqa: E731
        budgets = (
            {b: budget_params(make_model(), b) for b in cfg.budgets}
            if not done >= _keys(cfg, method, task_name)
            else {}
        )
        for bname, budget in budgets.items():
            for seed in cfg.seeds:
                for lr in cfg.lrs:
                    row_key = (method, task_name, bname, str(seed), f"{lr:g}")
                    if row_key in done:
                        continue
                    t0 = time.perf_counter()
                    r = run_method(
                        method, make_model, task, cfg=cfg, budget=budget, lr=lr, seed=seed, tokenizer=tok
                    )
                    wall = time.perf_counter() - t0
                    value = r["metrics"][r["primary"]]
                    rows = [{"method": method, "task": task_name, "seed": seed, "budget_name": bname, "budget": budget,
                             "lr": f"{lr:g}", "params": r["params"], "metric": r["primary"], "value": value,
                             "seconds": r["search_s"] + r["final_s"], "search_s": r["search_s"],
                             "final_s": r["final_s"], "steps": cfg.steps, "step_ms": 1e3 * r["final_s"] / max(1, cfg.steps),
                             "round_step_ms": ";".join(f"{1e3 * s:.1f}" for s in r["round_step_s"]),
                             "peak_rss_mb": round(peak_rss_mb(), 1), "wall_s": wall, "note": r["note"],
                             "versions": versions()}]  # fmt: skip
                    append_rows(name, rows)
                    print(f"  {method:<16} {task_name:<6} {bname} seed {seed} lr {lr:g}: {r['primary']} {value:.4f}, "
                          f"{r['params']:,} params, search {r['search_s']:.0f}s + final {r['final_s']:.0f}s "
                          f"(row {wall:.0f}s)", flush=True)  # fmt: skip


def _keys(cfg: BaselineConfig, method: str, task: str) -> set[tuple]:
    return {(method, task, b, str(s), f"{lr:g}") for b in cfg.budgets for s in cfg.seeds for lr in cfg.lrs}


def _worker_argv(cfg: BaselineConfig, method: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", method, "--mode", cfg.mode, "--resume",
            "--tasks", *cfg.tasks, "--budgets", *cfg.budgets, "--seeds", *map(str, cfg.seeds),
            "--lrs", *map(str, cfg.lrs), "--steps", str(cfg.steps)]  # fmt: skip


# ---------------------------------------------------------------------------- report
def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(rows: list[dict]) -> dict:
    """Per (method, task, budget): the dev-selected lr and its seeds' values, params, costs."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["task"], r["budget_name"]), {}).setdefault(r["lr"], []).append(r)
    out = {}
    for key, by_lr in groups.items():
        lr, rs = max(by_lr.items(), key=lambda kv: statistics.fmean(float(r["value"]) for r in kv[1]))
        vals = [float(r["value"]) for r in rs]
        m, s = _mean_std(vals)
        out[key] = {"lr": lr, "rows": rs, "mean": m, "std": s, "n": len(vals), "metric": rs[0]["metric"],
                    "params": statistics.fmean(float(r["params"]) for r in rs)}  # fmt: skip
    return out


def _fmt(v: float) -> str:
    return f"{100 * v:.1f}"


def write_report(
    cfg: BaselineConfig, rows: list[dict], total_wall: float | None = None, command: str = ""
) -> str:
    """``baselines_<mode>.md`` and the two plots from the CSV rows; returns the markdown."""
    summ = summarise(rows)
    methods = [m for m in METHODS if any(k[0] == m for k in summ)]
    tasks = [t for t in TASKS if any(k[1] == t for k in summ)]
    budgets = [b for b in BUDGETS if any(k[2] == b for k in summ)]
    stamp = rows[0] if rows else {}
    lines = [f"# prunepeft vs baselines — `{cfg.mode}` mode", "",
             f"Produced by `python bench/bench_baselines.py {command or ('--quick' if cfg.mode == 'quick' else '')}`"
             f" ({sum(float(r.get('wall_s') or 0) for r in rows) / 60:.1f} min of rows) "
             f"on {stamp.get('machine', '?')} ({stamp.get('threads', '?')} threads), {stamp.get('versions', '')}, "
             f"commit {stamp.get('commit', '?')}, {stamp.get('date', '')}.", "",
             f"Sizes: {cfg.steps} final steps for every method, batch {cfg.batch_size}, max length {cfg.max_length}, "
             f"first {cfg.train_examples} train rows; search: warm-up {cfg.warmup_steps} + {cfg.rounds} rounds x "
             f"{cfg.steps_per_round} steps; {cfg.threads or 'default'} torch thread(s) per worker; lr grid {', '.join(f'{x:g}' for x in cfg.lrs)} (full FT: x "
             f"{cfg.full_ft_lr_scale:g}), selected per method and task by the best mean dev metric over the seeds "
             f"(the same rule for every method); seeds {', '.join(map(str, cfg.seeds))}. "
             "Values: accuracy (RTE, SST-2, AG News, BBC) or Pearson r (STS-B) x 100 on the dev / held-out set, "
             "mean ± std over seeds; `params` = trainable PEFT parameters (head excluded).", ""]  # fmt: skip
    if total_wall is not None:
        lines += [f"Total wall time of this run: {total_wall / 60:.1f} min.", ""]
    for b in budgets:
        bud = next((int(r["budget"]) for r in rows if r["budget_name"] == b), 0)
        lines += [f"## Budget `{b}`: {bud:,} parameters (LoRA r={BUDGETS[b]} on query,value)", "",
                  "| method | params | " + " | ".join(tasks) + " | mean |",
                  "|---|---:|" + "---:|" * (len(tasks) + 1)]  # fmt: skip
        for m in methods:
            cells, means, params = [], [], []
            for t in tasks:
                s = summ.get((m, t, b))
                if s is None:
                    cells.append("–")
                    continue
                cells.append(f"{_fmt(s['mean'])} ± {_fmt(s['std'])}" if s["n"] > 1 else _fmt(s["mean"]))
                means.append(s["mean"])
                params.append(s["params"])
            p = f"{statistics.fmean(params):,.0f}" if params else "–"
            avg = _fmt(statistics.fmean(means)) if len(means) == len(tasks) else "–"
            lines.append(f"| {m} | {p} | " + " | ".join(cells) + f" | {avg} |")
        lines += ["", *_verdicts(summ, tasks, b, cfg), ""]
    lines += _cost_table(summ, methods, budgets)
    notes = sorted({(r["method"], r["budget_name"], r["note"]) for r in rows if r["note"] and r["method"] in
                    ("lora_qv", "lora_all", "serial_adapter", "adalora", "no_prune", "full_ft")})  # fmt: skip
    if notes:
        lines += ["", "How each baseline matched the budget:", ""]
        lines += [f"- `{m}` at `{b}`: {n}" for m, b, n in notes]
    lines += [
        "",
        f"Plots: `baselines_{cfg.mode}_metric_vs_params.png`, `baselines_{cfg.mode}_step_time.png`.",
    ]
    md = "\n".join(lines) + "\n"
    (RESULTS / f"baselines_{cfg.mode}.md").write_text(md)
    _plots(cfg, summ, methods, tasks, budgets)
    return md


EVAL_N = {"RTE": 277, "STS-B": 1500, "SST-2": 872, "BBC": 400}  # AGNews: cfg.eval_examples


def _noise(metric: str, value: float, n: int) -> float:
    """One standard error of the difference of two independent estimates on ``n`` eval examples."""
    se = (
        math.sqrt(max(value * (1 - value), 1e-6) / n)
        if metric == "accuracy"
        else (1 - value**2) / math.sqrt(n - 1)
    )
    return math.sqrt(2) * se


def _verdicts(summ: dict, tasks: list[str], b: str, cfg: BaselineConfig) -> list[str]:
    """Each hybrid granularity vs each baseline: wins / ties / losses over tasks, with the margins."""
    baselines = ["random", "no_prune", "lora_qv", "lora_all", "serial_adapter", "adalora", "full_ft"]
    out = ["Hybrid vs each baseline (difference of the means, in points). A tie is a difference within the larger "
           "of the two seed stds or within the eval set's sampling noise (one standard error of a "
           "difference of two accuracies / Pearson r on that many examples: RTE ±4.2, SST-2 ±2.3 points at 50 %), "
           "whichever is larger.", "",
           "| prunepeft | vs | " + " | ".join(tasks) + " | W/T/L |", "|---|---|" + "---:|" * (len(tasks) + 1)]  # fmt: skip
    for h in HYBRID:
        for base in baselines:
            cells, wtl = [], [0, 0, 0]
            for t in tasks:
                a, c = summ.get((h, t, b)), summ.get((base, t, b))
                if a is None or c is None:
                    cells.append("–")
                    continue
                d = a["mean"] - c["mean"]
                n = EVAL_N.get(t, cfg.eval_examples)
                tol = max(a["std"], c["std"], _noise(a["metric"], (a["mean"] + c["mean"]) / 2, n))
                wtl[0 if d > tol else 2 if d < -tol else 1] += 1
                cells.append(f"{100 * d:+.1f}")
            if any(c != "–" for c in cells):
                out.append(f"| {h} | {base} | " + " | ".join(cells) + f" | {wtl[0]}/{wtl[1]}/{wtl[2]} |")
    return out


def _cost_table(summ: dict, methods: list[str], budgets: list[str]) -> list[str]:
    out = ["## Cost", "",
           "Per method (budget `" + budgets[0] + "`, mean over tasks, seeds and learning rates): total wall time "
           "(search + final) / uniform LoRA q,v's training time on the same task, seed and lr; search / final "
           "training (the paper reports 0.30, 0.01 in its low-fidelity mode); step time in the first and last "
           "search round and in the final training; peak RSS of the method's worker process.", "",
           "| method | params | total / LoRA train | search / final | round step ms (first → last) | final step ms | peak RSS MB |",
           "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    b = budgets[0]
    lora = {(r["task"], r["seed"], r["lr"]): float(r["final_s"]) for (m, _, bb), s in summ.items()
            if m == "lora_qv" and bb == b for r in s["rows"]}  # fmt: skip
    for m in methods:
        rs = [r for (mm, _, bb), s in summ.items() if mm == m and bb == b for r in s["rows"]]
        if not rs:
            continue
        ratio = [float(r["seconds"]) / lora[(r["task"], r["seed"], r["lr"])] for r in rs
                 if (r["task"], r["seed"], r["lr"]) in lora]  # fmt: skip
        sf = [float(r["search_s"]) / float(r["final_s"]) for r in rs if float(r["search_s"]) > 0]
        rounds = [[float(x) for x in r["round_step_ms"].split(";")] for r in rs if r["round_step_ms"]]
        rs_txt = (f"{statistics.fmean(x[0] for x in rounds):.0f} → {statistics.fmean(x[-1] for x in rounds):.0f}"
                  if rounds else "–")  # fmt: skip
        out.append(f"| {m} | {statistics.fmean(float(r['params']) for r in rs):,.0f} | "
                   f"{statistics.fmean(ratio):.2f} | " + (f"{statistics.fmean(sf):.2f}" if sf else "–") +
                   f" | {rs_txt} | {statistics.fmean(float(r['step_ms']) for r in rs):.0f} | "
                   f"{max(float(r['peak_rss_mb']) for r in rs):,.0f} |")  # fmt: skip
    return out


def _plots(cfg: BaselineConfig, summ: dict, methods: list[str], tasks: list[str], budgets: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        for i, m in enumerate(methods):
            pts = sorted((summ[(m, t, b)]["params"], summ[(m, t, b)]["mean"], summ[(m, t, b)]["std"])
                         for b in budgets if (m, t, b) in summ)  # fmt: skip
            if not pts:
                continue
            xs, ys, es = zip(*pts, strict=True)
            marker = "o" if m in HYBRID else "s" if m in PRUNEPEFT else "^"
            ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], marker=marker, ms=5, lw=1,
                        color=cmap(i % 20), label=m, capsize=2)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (head excluded)")
        ax.set_ylabel("dev metric x 100")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"metric vs trainable parameters ({cfg.mode} mode)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"baselines_{cfg.mode}_metric_vs_params.png", dpi=110)
    plt.close(fig)

    b = budgets[0]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, m in enumerate(methods):
        rounds = [[float(x) for x in r["round_step_ms"].split(";")] for (mm, _, bb), s in summ.items()
                  if mm == m and bb == b for r in s["rows"] if r["round_step_ms"]]  # fmt: skip
        if rounds:
            n = min(len(x) for x in rounds)
            ys = [statistics.fmean(x[j] for x in rounds) for j in range(n)]
            ax.plot(range(1, n + 1), ys, marker="o" if m in HYBRID else ".", color=cmap(i % 20), label=m)
    for m, style in (("lora_qv", "--"), ("no_prune", ":")):
        st = [
            float(r["step_ms"]) for (mm, _, bb), s in summ.items() if mm == m and bb == b for r in s["rows"]
        ]
        if st:
            ax.axhline(statistics.fmean(st), ls=style, color="k", label=f"{m} (final training)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("search round")
    ax.set_ylabel("ms per training step (mean over tasks)")
    ax.set_title(f"step time per round as pruning proceeds (budget {b}, {cfg.mode} mode)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(RESULTS / f"baselines_{cfg.mode}_step_time.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="1 seed, RTE + SST-2, budget r8, 1 lr, 30 steps (~15 min)"
    )
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help="skip rows already in the CSV")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the .md and .png from the CSV")
    ap.add_argument(
        "--in-process", action="store_true", help="no worker processes (peak memory is then cumulative)"
    )
    ap.add_argument("--methods", nargs="+", choices=METHODS)
    ap.add_argument("--tasks", nargs="+", choices=TASKS)
    ap.add_argument("--budgets", nargs="+", choices=list(BUDGETS))
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--lrs", nargs="+", type=float)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--ablation-granularity", choices=["module", "block", "both"])
    ap.add_argument("--full-ft-lr-scale", type=float)
    ap.add_argument("--threads", type=int, help="torch threads per worker (0: torch default; quick: 1)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    mode = args.mode or ("quick" if args.quick else "full")
    cfg = replace(QUICK if mode == "quick" else BaselineConfig(), mode=mode)
    for name in (
        "methods",
        "tasks",
        "budgets",
        "seeds",
        "lrs",
        "steps",
        "ablation_granularity",
        "full_ft_lr_scale",
        "threads",
    ):
        v = getattr(args, name)
        if v is not None:
            cfg = replace(cfg, **{name: tuple(v) if isinstance(v, list) else v})
    name = f"baselines_{mode}"
    if args.worker:
        run_worker(cfg, args.worker, args.resume)
        return
    if args.report_only:
        print(write_report(cfg, read_rows(name)))
        return
    csv_path = RESULTS / f"{name}.csv"
    if csv_path.exists() and not args.resume:
        os.replace(csv_path, csv_path.with_suffix(".csv.bak"))
        print(f"moved the previous {csv_path.name} to {csv_path.name}.bak (use --resume to continue it)")
    print(f"bench_baselines ({mode}): {len(cfg.methods)} methods x {len(cfg.tasks)} tasks x {len(cfg.budgets)} "
          f"budgets x {len(cfg.seeds)} seeds x {len(cfg.lrs)} lrs; config {asdict(cfg)}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    for i, method in enumerate(cfg.methods):
        print(
            f"[{i + 1}/{len(cfg.methods)}] {method} ({(time.perf_counter() - t0) / 60:.1f} min elapsed)",
            flush=True,
        )
        if args.in_process:
            run_worker(cfg, method, resume=True)
        else:
            argv_w = _worker_argv(cfg, method)
            if args.ablation_granularity:
                argv_w += ["--ablation-granularity", args.ablation_granularity]
            if args.full_ft_lr_scale is not None:
                argv_w += ["--full-ft-lr-scale", str(args.full_ft_lr_scale)]
            if args.threads is not None:
                argv_w += ["--threads", str(args.threads)]
            subprocess.run(argv_w, check=True)
    total = time.perf_counter() - t0
    print(f"done in {total / 60:.1f} min")
    print(write_report(cfg, read_rows(name), total_wall=total, command=" ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
